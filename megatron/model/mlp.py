"""Dense GeLU MLP of a transformer layer: H -> F -> H with biases (Megatron's ParallelMLP)."""

from __future__ import annotations

import torch
from torch import nn

from megatron.config import DEFAULT_ACTIVATION
from megatron.model.activations import activation_fn
from megatron.model.init_methods import init_linear_


class MLP(nn.Module):
    """dense_h_to_4h [F, H] ~ N(0, init_std); dense_4h_to_h [H, F] ~ N(0, output_init_std).

    activation: the GeLU form (megatron/model/activations.py); Megatron's default is the
    fused bias + tanh GeLU.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 output_init_std: float, params_dtype: torch.dtype = torch.float32,
                 activation: str = DEFAULT_ACTIVATION) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden_size, ffn_hidden_size, dtype=params_dtype)
        self.dense_4h_to_h = nn.Linear(ffn_hidden_size, hidden_size, dtype=params_dtype)
        init_linear_(self.dense_h_to_4h, init_std)
        init_linear_(self.dense_4h_to_h, output_init_std)
        self.activation = activation
        self.activation_fn = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation_fn(self.dense_h_to_4h(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
