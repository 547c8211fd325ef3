"""Dense GeLU MLP of a transformer layer: H -> F -> H with biases (Megatron's ParallelMLP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model.init_methods import init_linear_


class MLP(nn.Module):
    """dense_h_to_4h [F, H] ~ N(0, init_std); dense_4h_to_h [H, F] ~ N(0, output_init_std)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 output_init_std: float, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, ffn_hidden_size, dtype=params_dtype)
        self.dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size, dtype=params_dtype)
        init_linear_(self.dense_h_to_4h, init_std)
        init_linear_(self.dense_4h_to_h, output_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GeLU: Megatron's unfused path (F.gelu). Its fused bias_gelu kernel uses the
        # tanh approximation instead, which differs by up to ~1e-3 per activation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))
