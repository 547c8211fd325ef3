"""Causal multi-head self-attention with a fused QKV projection (Megatron's ParallelAttention).

Letters: B batch, S sequence, H hidden, N heads, D head dim (H = N * D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import GPTConfig
from megatron.model.init_methods import init_linear_, scaled_init_std, torch_dtype


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

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = x_BSH.shape
        qkv = self.query_key_value(x_BSH).view(B, S, self.num_heads, 3, self.head_dim)
        q_BNSD, k_BNSD, v_BNSD = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        # SDPA's fused kernels (flash / memory-efficient) accumulate the softmax in fp32 for
        # fp16/bf16 inputs, matching Megatron's --attention-softmax-in-fp32 numerics.
        ctx_BNSD = F.scaled_dot_product_attention(
            q_BNSD, k_BNSD, v_BNSD, is_causal=True,
            dropout_p=self.attention_dropout if self.training else 0.0)
        return self.dense(ctx_BNSD.transpose(1, 2).reshape(B, S, H))
