"""Pre-LayerNorm transformer layers with Megatron-DeepSpeed's MoE placement, and the stack.

Shapes: the letters of megatron/model/__init__.py.

A layer is  x = x + drop(attn(LN1(x)));  x = x + drop(ffn(LN2(x)))  where ffn is the dense MLP
or an MoE layer. Layer L (1-based) is MoE iff config.experts_for_layer(L) > 1, so
`--num-experts 1` builds a dense model.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.config import GPTConfig
from megatron.model.attention import CausalSelfAttention, KVCache, LayerKVCache
from megatron.model.init_methods import scaled_init_std, torch_dtype
from megatron.model.mlp import MLP
from megatron.model.moe import MoELayer, MoEStats


class LayerOutput(NamedTuple):
    hidden_states: torch.Tensor             # [B, S, D]
    aux_loss: Optional[torch.Tensor]        # fp32 scalar of an MoE layer, None for a dense one
    stats: Optional[MoEStats]               # None for a dense layer


class TransformerOutput(NamedTuple):
    hidden_states: torch.Tensor             # [B, S, D], after the final LayerNorm
    aux_loss: torch.Tensor                  # fp32 scalar, sum over MoE layers (0 when dense)
    stats: List[MoEStats]                   # one per MoE layer, in layer order


def build_ffn(config: GPTConfig, layer_number: int) -> nn.Module:
    """The dense MLP, or an MoE layer when layer `layer_number` (1-based) has > 1 experts; both
    with config.activation (the XMoE fork's experts are copies of its dense ParallelMLP)."""
    dtype = torch_dtype(config.params_dtype)
    output_std = scaled_init_std(config.init_method_std, config.num_layers)
    num_experts = config.experts_for_layer(layer_number)
    if num_experts > 1:
        return MoELayer(config.moe, config.hidden_size, num_experts,
                        init_std=config.init_method_std, output_init_std=output_std,
                        layer_number=layer_number,
                        dense_ffn_hidden_size=config.ffn_hidden_size, params_dtype=dtype,
                        activation=config.activation)
    return MLP(config.hidden_size, config.ffn_hidden_size, config.init_method_std, output_std,
               params_dtype=dtype, activation=config.activation)


class TransformerLayer(nn.Module):
    """One pre-LN block (Megatron's ParallelTransformerLayer): attention, then MLP or MoE."""

    def __init__(self, config: GPTConfig, layer_number: int) -> None:
        super().__init__()
        dtype = torch_dtype(config.params_dtype)
        self.layer_number = layer_number
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                            dtype=dtype)
        self.self_attention = CausalSelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size,
                                                     eps=config.layernorm_epsilon, dtype=dtype)
        self.num_experts = config.experts_for_layer(layer_number)
        self.mlp = build_ffn(config, layer_number)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: Optional[torch.Tensor] = None,
                kv_cache: Optional[LayerKVCache] = None, record_experts: bool = False
                ) -> LayerOutput:
        """kv_cache: this layer's keys/values (incremental decoding); record_experts: the MoE
        stats carry each token's experts (generation). Training passes neither."""
        attn_BSD = self.self_attention(self.input_layernorm(x_BSD), kv_cache)
        x_BSD = x_BSD + self.hidden_dropout(attn_BSD)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if not self.is_moe:
            return LayerOutput(x_BSD + self.hidden_dropout(self.mlp(h_BSD)), None, None)
        # hash routing needs the token ids
        moe = self.mlp(h_BSD, token_ids_BS, record_experts=record_experts)
        return LayerOutput(x_BSD + self.hidden_dropout(moe.output), moe.aux_loss, moe.stats)


class Transformer(nn.Module):
    """The layer stack and the final LayerNorm (Megatron's ParallelTransformer).

    With config.checkpoint_activations each layer is recomputed in backward
    (torch.utils.checkpoint, non-reentrant; the RNG state is restored, so dropout masks match).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.checkpoint_activations = config.checkpoint_activations
        self.layers = nn.ModuleList(TransformerLayer(config, n)
                                    for n in range(1, config.num_layers + 1))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon,
                                            dtype=torch_dtype(config.params_dtype))

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None, record_experts: bool = False
                ) -> TransformerOutput:
        """kv_cache and record_experts: see TransformerLayer.forward. Both are for inference and
        turn recomputation off (it would append every position to the cache twice)."""
        recompute = (self.checkpoint_activations and self.training and torch.is_grad_enabled()
                     and kv_cache is None and not record_experts)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x_BSD.device)
        stats: List[MoEStats] = []
        for i, layer in enumerate(self.layers):
            if recompute:
                out = checkpoint(layer, x_BSD, token_ids_BS, use_reentrant=False)
            else:
                layer_cache = None if kv_cache is None else kv_cache.layers[i]
                out = layer(x_BSD, token_ids_BS, layer_cache, record_experts)
            x_BSD = out.hidden_states
            if out.aux_loss is not None:
                aux_loss = aux_loss + out.aux_loss
                stats.append(out.stats)
        return TransformerOutput(self.final_layernorm(x_BSD), aux_loss, stats)
