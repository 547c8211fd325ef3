"""Causal multi-head self-attention with a fused QKV projection (Megatron's ParallelAttention),
and the key/value cache that lets generation run one new position at a time.

Shapes: the letters of megatron/model/__init__.py (M: key positions, the cached ones and this
call's; a cache buffer holds max_length of them).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import GPTConfig
from megatron.model.init_methods import init_linear_, scaled_init_std, torch_dtype


class LayerKVCache:
    """One layer's keys and values of the positions run so far: [B, H, M, A] buffers allocated
    at the first call (shape, dtype and device of its keys), filled in order.

    Preallocated rather than concatenated: a step writes one position instead of copying the
    whole past, so generating n tokens costs O(n) copies, not O(n^2).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.k_BHMA: Optional[torch.Tensor] = None
        self.v_BHMA: Optional[torch.Tensor] = None

    def check_room(self, batch_size: int, num_new: int) -> None:
        """ValueError, before anything is written, when `num_new` positions do not fit."""
        if self.length + num_new > self.max_length:
            raise ValueError(f"the KV cache holds {self.length} positions of max_length "
                             f"{self.max_length}: no room for {num_new} more")
        if self.k_BHMA is not None and self.k_BHMA.shape[0] != batch_size:
            raise ValueError(f"the KV cache was filled with batch size {self.k_BHMA.shape[0]}, "
                             f"got {batch_size}")

    def append(self, k_BHSA: torch.Tensor, v_BHSA: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store the S new positions after the cached ones; return all keys and values so far."""
        B, H, S, A = k_BHSA.shape
        self.check_room(B, S)
        if self.k_BHMA is None:
            self.k_BHMA = k_BHSA.new_empty(B, H, self.max_length, A)
            self.v_BHMA = v_BHSA.new_empty(B, H, self.max_length, A)
        end = self.length + S
        self.k_BHMA[:, :, self.length:end] = k_BHSA
        self.v_BHMA[:, :, self.length:end] = v_BHSA
        self.length = end
        return self.k_BHMA[:, :, :end], self.v_BHMA[:, :, :end]


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
    """softmax(Q K^T / sqrt(A) + causal mask) V, then the output projection `dense`.

    query_key_value [3D, D] keeps Megatron's per-head layout: output feature h*3A + j*A + a is
    (q, k, v)[j] of head h, so Megatron checkpoints load without permuting rows.
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

    def forward(self, x_BSD: torch.Tensor, kv_cache: Optional[LayerKVCache] = None
                ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; with `kv_cache`, x holds the positions after the cached
        ones, which it attends to, and its keys and values are appended to the cache."""
        B, S, D = x_BSD.shape
        qkv = self.query_key_value(x_BSD).view(B, S, self.num_heads, 3, self.head_dim)
        q_BHSA, k_BHSA, v_BHSA = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        dropout_p = self.attention_dropout if self.training else 0.0
        if kv_cache is None or kv_cache.length == 0:
            if kv_cache is not None:        # a prompt: cache it, attend as training does
                kv_cache.append(k_BHSA, v_BHSA)
            # SDPA's fused kernels (flash / memory-efficient) accumulate the softmax in fp32
            # for fp16/bf16 inputs, matching Megatron's --attention-softmax-in-fp32 numerics.
            ctx_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSA, is_causal=True,
                                                      dropout_p=dropout_p)
        else:
            ctx_BHSA = attend_after_past(q_BHSA, k_BHSA, v_BHSA, kv_cache, dropout_p)
        return self.dense(ctx_BHSA.transpose(1, 2).reshape(B, S, D))


def attend_after_past(q_BHSA: torch.Tensor, k_BHSA: torch.Tensor, v_BHSA: torch.Tensor,
                      kv_cache: LayerKVCache, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of S new positions (past .. past + S - 1) to the `past` cached and the
    S new ones (M = past + S keys).

    SDPA's is_causal aligns the mask to the top-left corner (query i sees keys 0..i), which is
    wrong once past > 0; one new position sees every key, so it needs no mask, and a chunk of
    several gets the explicit mask "key j <= past + i".
    """
    past = kv_cache.length
    k_BHMA, v_BHMA = kv_cache.append(k_BHSA, v_BHSA)
    S = q_BHSA.shape[2]
    mask_SM = None
    if S > 1:
        key_M = torch.arange(past + S, device=q_BHSA.device)
        query_S = torch.arange(past, past + S, device=q_BHSA.device)
        mask_SM = key_M.unsqueeze(0) <= query_S.unsqueeze(1)
    return F.scaled_dot_product_attention(q_BHSA, k_BHMA, v_BHMA, attn_mask=mask_SM,
                                          dropout_p=dropout_p)
