"""xmoe's GPT for Hugging Face transformers (`trust_remote_code=True`): XMoEForCausalLM.

Standalone (torch and transformers only): tools/convert_to_hf.py copies it next to the exported
weights. It computes what xmoe's GPTModel computes in evaluation mode, with the same parameter
names, so the exported model.safetensors is xmoe's state dict unchanged:

    embedding (learned token + position embeddings) -> layers -> final LayerNorm -> logits
    layer:  x = x + attn(LN1(x));  x = x + ffn(LN2(x))   ffn: dense MLP or MoE layer
    attn:   fused QKV in Megatron's per-head layout (output feature n*3D + j*D + d is
            (q, k, v)[j] of head n), softmax(Q K^T / sqrt(D)) V, then `dense`
    logits: the word embedding matrix (tied output layer, no bias), over the padded vocabulary

MoE layers route as xmoe routes in evaluation: fp32 router logits and softmax, experts ranked
by probability (ties: lower expert id); threshold routing takes the fewest experts whose mass
reaches the threshold (mass summed in fp64, compared in fp32, as xmoe does); a token's output is
sum_k p_k * expert_k(x) with the raw softmax probabilities (weight 1 for hash routing), summed
in fp32. Dropless unless config.drop_tokens (see configuration_xmoe.py). Training this model
with transformers is possible (dropout applies) but it routes without xmoe's top-k noise and
adds no auxiliary load-balancing loss: fine-tune MoE models with xmoe.

Letters: B batch, S positions of this call, L key positions (cached + new), H hidden, N heads,
D head dim, T tokens (B * S), E experts, K choice slots, V padded vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_xmoe import ROUTING_SETTINGS, XMoEConfig

try:
    from transformers import DynamicCache
except ImportError:     # pragma: no cover (transformers < 4.36 has no Cache classes)
    DynamicCache = None

# transformers 5 names the cache `cache`; 4.x `past_key_values` (inputs and outputs).
_CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
                else "past_key_values")


def gelu_erf_onnx(x: torch.Tensor) -> torch.Tensor:
    """Megatron's --onnx-safe GeLU: erf with its rounded constant 1.41421."""
    return x * 0.5 * (torch.erf(x / 1.41421) + 1.0)


ACTIVATION_FNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
    "gelu_erf_onnx": gelu_erf_onnx}


# ----------------------------------------------------------------------------- routing

def route(logits_TE: Optional[torch.Tensor], token_ids_T: torch.Tensor,
          hash_table_V: Optional[torch.Tensor], config: XMoEConfig, num_experts: int
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts_TK, weights_TK, kept_TK): the expert of each choice slot (slot 0 first), its
    combine weight (0 where not kept) and whether the pair is used."""
    if config.router == "hash":
        experts_TK = hash_table_V[token_ids_T].long().unsqueeze(1)
        probs_TK = torch.ones(experts_TK.shape, dtype=torch.float32, device=experts_TK.device)
        wanted_TK = torch.ones_like(experts_TK, dtype=torch.bool)
    else:
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
        if config.router == "threshold":
            K = num_experts if config.threshold_max_experts is None else min(
                config.threshold_max_experts, num_experts)
            before_TK = F.pad(torch.cumsum(sorted_TE[:, :K].double(), dim=-1)[:, :-1], (1, 0))
            wanted_TK = before_TK.float() < config.threshold
        else:
            K = config.topk if config.router == "topk" else 1
            wanted_TK = torch.ones_like(sorted_TE[:, :K], dtype=torch.bool)
        experts_TK, probs_TK = order_TE[:, :K], sorted_TE[:, :K]
    kept_TK = apply_capacity(experts_TK, wanted_TK, probs_TK, num_experts,
                             capacity(experts_TK.shape[0], num_experts, config))
    return experts_TK, torch.where(kept_TK, probs_TK, 0.0), kept_TK


def capacity(num_tokens: int, num_experts: int, config: XMoEConfig) -> Optional[int]:
    """Pairs an expert keeps per call: None (dropless) unless config.drop_tokens."""
    if not config.drop_tokens:
        return None
    return max(int(math.ceil(num_tokens / num_experts * config.capacity_factor)),
               config.min_capacity)


def apply_capacity(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                   num_experts: int, cap: Optional[int]) -> torch.Tensor:
    """Keep at most `cap` wanted pairs per expert: lower choice slot first, then higher
    probability, then lower token index (xmoe's priority). Three stable sorts, least
    significant key first."""
    T, K = experts_TK.shape
    if cap is None or cap >= T:         # a token's slots name distinct experts: cannot bind
        return wanted_TK
    expert_N = torch.where(wanted_TK, experts_TK, num_experts).reshape(-1)
    slot_N = torch.arange(K, device=experts_TK.device).repeat(T)
    order = torch.sort(probs_TK.reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(slot_N[order], stable=True).indices]
    order = order[torch.sort(expert_N[order], stable=True).indices]
    sorted_expert_N = expert_N[order]
    rank_N = (torch.arange(order.numel(), device=order.device)
              - torch.searchsorted(sorted_expert_N, sorted_expert_N))
    kept_N = torch.empty_like(wanted_TK.reshape(-1))
    kept_N[order] = (sorted_expert_N < num_experts) & (rank_N < cap)
    return kept_N.view(T, K)


# ----------------------------------------------------------------------------- modules

class Embedding(nn.Module):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings,
                                                config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, ids_BS: torch.Tensor, positions_BS: torch.Tensor) -> torch.Tensor:
        return self.embedding_dropout(self.word_embeddings(ids_BS)
                                      + self.position_embeddings(positions_BS))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: XMoEConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.attention_dropout = config.attention_dropout
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)

    def forward(self, x_BSH: torch.Tensor, cache: Any, mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """mask: bool [B, 1, S, L] (True: attend), or None for plain causal attention."""
        B, S, H = x_BSH.shape
        qkv = self.query_key_value(x_BSH).view(B, S, self.num_heads, 3, self.head_dim)
        q_BNSD, k_BNLD, v_BNLD = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        if cache is not None:
            k_BNLD, v_BNLD = cache.update(k_BNLD, v_BNLD, self.layer_idx)
        dropout_p = self.attention_dropout if self.training else 0.0
        # Without a mask: the causal mask when queries and keys are the same positions; one new
        # position after cached ones sees every key.
        ctx_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BNLD, v_BNLD, attn_mask=mask, dropout_p=dropout_p,
            is_causal=mask is None and k_BNLD.shape[2] == S > 1)
        return self.dense(ctx_BNSD.transpose(1, 2).reshape(B, S, H))


class MLP(nn.Module):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation_fn = ACTIVATION_FNS[config.activation]

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation_fn(self.dense_h_to_4h(x)))


class Experts(nn.Module):
    """w1 [E, H, F], w2 [E, F, H], b1 [E, F], b2 [E, H] (stacked, as xmoe stores them)."""

    def __init__(self, config: XMoEConfig, num_experts: int) -> None:
        super().__init__()
        E, H, Fh = num_experts, config.hidden_size, config.moe_ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(E, H, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, H))
        self.b1 = nn.Parameter(torch.zeros(E, Fh)) if config.expert_bias else None
        self.b2 = nn.Parameter(torch.zeros(E, H)) if config.expert_bias else None
        self.activation_fn = ACTIVATION_FNS[config.activation]

    def forward(self, x_TH: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor,
                kept_TK: torch.Tensor) -> torch.Tensor:
        """fp32 [T, H]: sum over kept pairs of weight * expert(x), one expert at a time."""
        out_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        for e in range(self.w1.shape[0]):
            t_idx, k_idx = torch.nonzero((experts_TK == e) & kept_TK, as_tuple=True)
            if t_idx.numel() == 0:
                continue
            h = x_TH[t_idx] @ self.w1[e]
            h = h if self.b1 is None else h + self.b1[e]
            y = self.activation_fn(h) @ self.w2[e]
            y = y if self.b2 is None else y + self.b2[e]
            out_TH.index_add_(0, t_idx, y.float() * weights_TK[t_idx, k_idx, None])
        return out_TH


class MoELayer(nn.Module):
    """Router (gate_weight [E, H], fp32; or hash_table [V]) and the experts."""

    def __init__(self, config: XMoEConfig, num_experts: int) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        if config.router == "hash":
            self.register_buffer("hash_table", torch.zeros(config.vocab_size, dtype=torch.long))
            self.gate_weight = None
        else:
            self.gate_weight = nn.Parameter(torch.empty(num_experts, config.hidden_size))
            self.hash_table = None
        self.experts = Experts(config, num_experts)

    def forward(self, x_BSH: torch.Tensor, token_ids_BS: torch.Tensor) -> torch.Tensor:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        logits_TE = None
        if self.gate_weight is not None:
            logits_TE = F.linear(x_TH.float(), self.gate_weight.float())
        decision = route(logits_TE, token_ids_BS.reshape(-1), self.hash_table, self.config,
                         self.num_experts)
        return self.experts(x_TH, *decision).to(x_BSH.dtype).view_as(x_BSH)


class TransformerLayer(nn.Module):
    def __init__(self, config: XMoEConfig, layer_idx: int) -> None:
        super().__init__()
        eps, num_experts = config.layer_norm_epsilon, config.num_experts[layer_idx]
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MoELayer(config, num_experts) if num_experts > 1 else MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x_BSH: torch.Tensor, token_ids_BS: torch.Tensor, cache: Any,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x_BSH), cache, mask)
        x_BSH = x_BSH + self.hidden_dropout(attn)
        ffn = self.mlp(self.post_attention_layernorm(x_BSH), token_ids_BS)
        return x_BSH + self.hidden_dropout(ffn)


class Transformer(nn.Module):
    def __init__(self, config: XMoEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def attention_mask_for(attention_mask_BL: Optional[torch.Tensor], past: int, S: int,
                       device: torch.device) -> Optional[torch.Tensor]:
    """bool [B, 1, S, L] (query i, at position past + i, sees key j <= past + i that is not
    padding), or None when plain causal attention is right (no padding; no cache, or one new
    position). A padded query that would see no key sees every key (its output is unused)."""
    padded = attention_mask_BL is not None and not bool(attention_mask_BL.bool().all())
    if not padded and (past == 0 or S == 1):
        return None
    L = past + S
    causal_SL = (torch.arange(L, device=device)[None, :]
                 <= torch.arange(past, L, device=device)[:, None])
    mask = causal_SL[None, None]
    if padded:
        mask = mask & attention_mask_BL[:, None, None, -L:].bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- the model

class XMoEPreTrainedModel(PreTrainedModel):
    config_class = XMoEConfig
    base_model_prefix = "xmoe"      # no submodule has this name: keys load as they are
    _no_split_modules = ["TransformerLayer"]
    _supports_cache_class = True    # transformers 4.x: generate may pass a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        """Megatron's initialisation (normal, std initializer_range; zero biases)."""
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, Experts):
                module.w1.normal_(0.0, std)
                module.w2.normal_(0.0, std)
                for b in (module.b1, module.b2):
                    if b is not None:
                        b.zero_()
            elif isinstance(module, MoELayer) and module.gate_weight is not None:
                module.gate_weight.normal_(0.0, std)


class XMoEForCausalLM(XMoEPreTrainedModel, GenerationMixin):
    """Language model over the padded vocabulary; the output layer is the word embedding."""

    def __init__(self, config: XMoEConfig) -> None:
        config.check()
        super().__init__(config)
        self.embedding = Embedding(config)
        self.transformer = Transformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def set_routing(self, **changes: Any) -> XMoEConfig:
        """Route every MoE layer with other ROUTING_SETTINGS from now on (e.g. threshold=0.5),
        as xmoe's GPTModel.set_routing; ValueError (model unchanged) for anything else, and
        between hash routing and the gated routers (different parameters)."""
        unknown = sorted(set(changes) - set(ROUTING_SETTINGS))
        if unknown:
            raise ValueError(f"set_routing changes only {ROUTING_SETTINGS}, not {unknown}")
        new = copy.deepcopy(self.config)
        for key, value in changes.items():
            setattr(new, key, value)
        new.check()
        if (new.router == "hash") != (self.config.router == "hash"):
            raise ValueError(f"router {self.config.router} -> {new.router}: hash routing reads "
                             "a frozen token table, the other routers the gate weights")
        for key in changes:             # every MoE layer shares this config object
            setattr(self.config, key, getattr(new, key))
        return self.config

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Any = None,
                past_key_values: Any = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, return_dict: Optional[bool] = None,
                **kwargs: Any) -> Any:
        """Logits [B, S, V] of input_ids [B, S] after the cached positions (if any); with
        labels, the mean next-token cross-entropy (labels shifted inside; -100 ignored)."""
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None and DynamicCache is not None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        B, S = input_ids.shape
        past = int(cache.get_seq_length()) if cache is not None else 0
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, S, input_ids.device)
        mask = attention_mask_for(attention_mask, past, S, input_ids.device)
        x_BSH = self.embedding(input_ids, position_ids)
        for layer in self.transformer.layers:
            x_BSH = layer(x_BSH, input_ids, cache, mask)
        x_BSH = self.transformer.final_layernorm(x_BSH)
        logits_BSV = F.linear(x_BSH, self.embedding.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BSV[:, :-1].float().flatten(0, 1),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return tuple(v for v in (loss, logits_BSV, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits_BSV, **{_CACHE_FIELD: cache})

    @staticmethod
    def _positions(attention_mask: Optional[torch.Tensor], past: int, S: int,
                   device: torch.device) -> torch.Tensor:
        """past + 0..S-1; with a padding mask, each row's count of real tokens before it (left
        padding then starts every sequence at position 0, as GPT-2 in transformers does)."""
        if attention_mask is None or bool(attention_mask.bool().all()):
            return torch.arange(past, past + S, device=device).unsqueeze(0)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -S:]
