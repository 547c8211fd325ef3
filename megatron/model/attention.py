"""Causal multi-head self-attention with a fused QKV projection (Megatron's ParallelAttention),
and the key/value cache that lets generation run one new position at a time.

Letters: B batch, S sequence (the positions of this call), P past positions (cached), L the
cache's length in positions, H hidden, N heads, D head dim (H = N * D).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import GPTConfig
from megatron.model.init_methods import init_linear_, scaled_init_std, torch_dtype


class LayerKVCache:
    """One layer's keys and values of the positions run so far: [B, N, L, D] buffers allocated
    at the first call (shape, dtype and device of its keys), filled in order.

    Preallocated rather than concatenated: a step writes one position instead of copying the
    whole past, so generating n tokens costs O(n) copies, not O(n^2).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.k_BNLD: Optional[torch.Tensor] = None
        self.v_BNLD: Optional[torch.Tensor] = None

    def check_room(self, batch_size: int, num_new: int) -> None:
        """ValueError, before anything is written, when `num_new` positions do not fit."""
        if self.length + num_new > self.max_length:
            raise ValueError(f"the KV cache holds {self.length} positions of max_length "
                             f"{self.max_length}: no room for {num_new} more")
        if self.k_BNLD is not None and self.k_BNLD.shape[0] != batch_size:
            raise ValueError(f"the KV cache was filled with batch size {self.k_BNLD.shape[0]}, "
                             f"got {batch_size}")

    def append(self, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the S new positions after the past P; return all P + S keys and values."""
        B, N, S, D = k_BNSD.shape
        self.check_room(B, S)
        if self.k_BNLD is None:
            self.k_BNLD = k_BNSD.new_empty(B, N, self.max_length, D)
            self.v_BNLD = v_BNSD.new_empty(B, N, self.max_length, D)
        end = self.length + S
        self.k_BNLD[:, :, self.length:end] = k_BNSD
        self.v_BNLD[:, :, self.length:end] = v_BNSD
        self.length = end
        return self.k_BNLD[:, :, :end], self.v_BNLD[:, :, :end]


class KVCache:
    """Every layer's keys and values for incremental decoding (generation, eval mode).

    Pass one to successive `GPTModel.forward(ids, kv_cache=cache)` calls: the first runs the
    prompt, each later one only its new positions (default position ids continue from
    `length`), attending to the cached past. Filled in place; `length` counts the positions
    stored. Training never passes one (its forward is unchanged without a cache).
    """

    def __init__(self, num_layers: int, max_length: int) -> None:
        if num_layers < 1 or max_length < 1:
            raise ValueError(f"a KV cache needs num_layers >= 1 and max_length >= 1, got "
                             f"{num_layers}, {max_length}")
        self.max_length = max_length
        self.layers: List[LayerKVCache] = [LayerKVCache(max_length) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Positions stored (the same in every layer after a whole forward)."""
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(D) + causal mask) V, then the output projection `dense`.

    query_key_value [3H, H] keeps Megatron's per-head layout: output feature n*3D + j*D + d is
    (q, k, v)[j] of head n, so Megatron checkpoints load without permuting rows.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        dtype = torch_dtype(config.params_dtype)
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.attention_dropout = config.attention_dropout
        self.query_key_value = nn.Linear(h, 3 * h, dtype=dtype)
        self.dense = nn.Linear(h, h, dtype=dtype)
        init_linear_(self.query_key_value, config.init_method_std)
        init_linear_(self.dense, scaled_init_std(config.init_method_std, config.num_layers))

    def forward(self, x_BSH: torch.Tensor, kv_cache: Optional[LayerKVCache] = None
                ) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]; with `kv_cache`, x holds the positions after the cached
        ones, which it attends to, and its keys and values are appended to the cache."""
        B, S, H = x_BSH.shape
        qkv = self.query_key_value(x_BSH).view(B, S, self.num_heads, 3, self.head_dim)
        q_BNSD, k_BNSD, v_BNSD = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        dropout_p = self.attention_dropout if self.training else 0.0
        if kv_cache is None or kv_cache.length == 0:
            if kv_cache is not None:        # a prompt: cache it, attend as training does
                kv_cache.append(k_BNSD, v_BNSD)
            # SDPA's fused kernels (flash / memory-efficient) accumulate the softmax in fp32
            # for fp16/bf16 inputs, matching Megatron's --attention-softmax-in-fp32 numerics.
            ctx_BNSD = F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, is_causal=True,
                                                      dropout_p=dropout_p)
        else:
            ctx_BNSD = attend_after_past(q_BNSD, k_BNSD, v_BNSD, kv_cache, dropout_p)
        return self.dense(ctx_BNSD.transpose(1, 2).reshape(B, S, H))


def attend_after_past(q_BNSD: torch.Tensor, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor,
                      kv_cache: LayerKVCache, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of S new positions (P..P+S-1) to the P cached and the S new ones.

    SDPA's is_causal aligns the mask to the top-left corner (query i sees keys 0..i), which is
    wrong once P > 0; one new position sees every key, so it needs no mask, and a chunk of
    several gets the explicit mask "key j <= P + i".
    """
    past = kv_cache.length
    k_BNLD, v_BNLD = kv_cache.append(k_BNSD, v_BNSD)
    S = q_BNSD.shape[2]
    mask_SL = None
    if S > 1:
        key_L = torch.arange(past + S, device=q_BNSD.device)
        query_S = torch.arange(past, past + S, device=q_BNSD.device)
        mask_SL = key_L.unsqueeze(0) <= query_S.unsqueeze(1)
    return F.scaled_dot_product_attention(q_BNSD, k_BNLD, v_BNLD, attn_mask=mask_SL,
                                          dropout_p=dropout_p)
