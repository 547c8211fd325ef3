"""Megatron's GPT: embeddings -> transformer (dense and MoE layers) -> tied output layer.

Shapes: the letters of megatron/model/__init__.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import OVERRIDABLE_ROUTING, GPTConfig, MoEConfig
from megatron.model.attention import KVCache
from megatron.model.embedding import Embedding
from megatron.model.lm_loss import lm_cross_entropy
from megatron.model.moe import MoELayer, MoEStats, named_expert_parameters
from megatron.model.transformer import Transformer


class GPTOutput(NamedTuple):
    """logits [B, S, V] (params dtype) only without labels; loss [B, S] fp32 only with labels.

    A NamedTuple, not a dataclass: DeepSpeed's engine hooks its backward prologue (ZeRO's
    accumulation-boundary bookkeeping, its timers) onto the tensors of the model's output, and
    it finds them in tuples, lists and dicts only.
    """

    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor]
    moe_aux_loss: torch.Tensor              # fp32 scalar, sum of the MoE layers' aux losses
    moe_stats: List[MoEStats]               # one per MoE layer, in layer order


def check_shapes(config: GPTConfig, input_ids: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None) -> None:
    """Shape and dtype checks only: never reads tensor values, so never syncs with the device."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer [batch, seq] tensor, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} (--seq-length) exceeds "
                         f"--max-position-embeddings {config.max_position_embeddings}")
    for name, t in (("position_ids", position_ids), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")


def validate_inputs(config: GPTConfig, input_ids: torch.Tensor,
                    position_ids: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None) -> None:
    """Shapes plus value ranges (token ids and labels < --padded vocab, positions < max).

    Reading the values costs a host sync on an accelerator, so GPTModel.forward calls this only
    for CPU inputs; call it explicitly (e.g. on the first batch) to check GPU inputs.
    """
    check_shapes(config, input_ids, position_ids, labels)
    limits = (("input_ids", input_ids, config.padded_vocab_size, "padded vocabulary size"),
              ("labels", labels, config.padded_vocab_size, "padded vocabulary size"),
              ("position_ids", position_ids, config.max_position_embeddings,
               "--max-position-embeddings"))
    for name, t, limit, what in limits:
        if t is None or t.numel() == 0:
            continue
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}) ({what}), got range [{lo}, {hi}]")


def check_cache(config: GPTConfig, kv_cache: KVCache, input_ids: torch.Tensor) -> None:
    """ValueError, before anything is cached, when `input_ids` [B, S] cannot follow the cached
    positions: another layer count, past + S beyond the position table or the cache, another
    batch size. Host values only (no sync)."""
    if len(kv_cache.layers) != config.num_layers:
        raise ValueError(f"the KV cache has {len(kv_cache.layers)} layers, the model "
                         f"{config.num_layers} (--num-layers)")
    past, (batch_size, num_new) = kv_cache.length, input_ids.shape
    if past + num_new > config.max_position_embeddings:
        raise ValueError(f"{past} cached + {num_new} new positions exceed "
                         f"--max-position-embeddings {config.max_position_embeddings}")
    for layer_cache in kv_cache.layers:
        layer_cache.check_room(batch_size, num_new)


class GPTModel(nn.Module):
    """GPT language model; the output layer is the word embedding matrix (tied, no bias)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.transformer = Transformer(config)

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, D] output-layer weight: the word embedding itself (tied)."""
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, kv_cache: Optional[KVCache] = None,
                record_experts: bool = False) -> GPTOutput:
        """input_ids [B, S] (position_ids default 0..S-1; labels [B, S] -> per-token loss).

        Shapes are always checked; value ranges only for CPU inputs, since reading them on an
        accelerator is a host sync per step (call `validate_inputs` yourself there if wanted).

        Generation (megatron/generation.py) adds two inference-only arguments; training passes
        neither and runs exactly as without them:
        kv_cache: input_ids are the positions after the `kv_cache.length` cached ones (default
            position_ids continue from there); their keys and values are appended to it.
        record_experts: each MoE layer's stats carry token_experts_TK (the experts each token
            used; see MoEStats).
        """
        if input_ids.device.type == "cpu":
            validate_inputs(self.config, input_ids, position_ids, labels)
        else:
            check_shapes(self.config, input_ids, position_ids, labels)
        past = 0
        if kv_cache is not None:
            check_cache(self.config, kv_cache, input_ids)
            past = kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
            position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
        x_BSD = self.embedding(input_ids, position_ids)
        out = self.transformer(x_BSD, input_ids, kv_cache, record_experts)
        if labels is None:
            logits_BSV = F.linear(out.hidden_states, self.output_weight)
            return GPTOutput(logits_BSV, None, out.aux_loss, out.stats)
        # Output layer and fp32 cross-entropy in one op (fused on CUDA: no fp32 [T, V] tensors).
        loss_T = lm_cross_entropy(out.hidden_states.flatten(0, 1), self.output_weight,
                                  labels.flatten())
        return GPTOutput(None, loss_T.view_as(labels), out.aux_loss, out.stats)

    def set_routing(self, **changes: Any) -> MoEConfig:
        """Route every MoE layer with other routing settings from now on, e.g.
        `model.set_routing(threshold=0.5)` to evaluate a model trained at another threshold;
        returns the new MoEConfig (also `model.config.moe`).

        Only config.OVERRIDABLE_ROUTING fields may change (the parameters serve them all);
        MoEConfig validates the values. ValueError naming the setting otherwise, with the
        model left as it was.
        """
        unknown = sorted(set(changes) - set(OVERRIDABLE_ROUTING))
        if unknown:
            raise ValueError(f"set_routing changes only the routing settings "
                             f"({', '.join(OVERRIDABLE_ROUTING)}), not {', '.join(unknown)}")
        layers = [layer.mlp for layer in self.transformer.layers if layer.is_moe]
        if not layers:
            raise ValueError("the model has no MoE layer: there is no routing to set")
        moe = dataclasses.replace(self.config.moe, **changes)   # validated by MoEConfig
        for layer in layers:        # all share one config: the first refuses before any change
            layer.set_routing(moe)
        self.config = dataclasses.replace(self.config, moe=moe)
        return moe

    def parameter_counts(self) -> Dict[str, int]:
        """{"total", "expert", "non_expert"}: expert = MoE-layer parameters except the router,
        counted over the whole model (with expert parallelism, every rank's shard)."""
        expert = sum(_expert_numel(layer.mlp) for layer in self.transformer.layers)
        local_expert = sum(p.numel() for p in named_expert_parameters(self).values())
        non_expert = sum(p.numel() for p in self.parameters()) - local_expert
        return {"total": non_expert + expert, "expert": expert, "non_expert": non_expert}

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters, or with active_only those one token uses under top-1 routing (each
        MoE layer's expert parameters divided by its expert count; threshold routing uses more
        experts per token, see the MoE stats)."""
        if not active_only:
            return self.parameter_counts()["total"]
        counts = self.parameter_counts()
        per_token = sum(_expert_numel(layer.mlp) // layer.num_experts
                        for layer in self.transformer.layers)
        return counts["non_expert"] + per_token


def _expert_numel(ffn: nn.Module) -> int:
    """Parameters of an MoE layer's experts (all but the router weight, all ranks' shards);
    0 for a dense MLP."""
    if not isinstance(ffn, MoELayer):
        return 0
    return ffn.num_expert_parameters()
