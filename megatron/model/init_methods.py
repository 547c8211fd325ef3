"""Megatron's weight initialisation and the params-dtype mapping.

Megatron (Shoeybi et al., 2019, sec. 3 / `init_method_normal`, `scaled_init_method_normal`):
every weight matrix ~ N(0, sigma); the two matrices that write into the residual stream
(attention output projection, MLP output) use sigma / sqrt(2 * num_layers) so the residual's
variance does not grow with depth (GPT-2 paper, sec. 2.3). Biases start at 0, LayerNorm at (1, 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(params_dtype: str) -> torch.dtype:
    """Map a config's params dtype name ("fp32" | "fp16" | "bf16") to the torch dtype."""
    return _DTYPES[params_dtype]


def scaled_init_std(init_method_std: float, num_layers: int) -> float:
    """Std of the output projections: sigma / sqrt(2 * num_layers) (Megatron's scaled init)."""
    return init_method_std / math.sqrt(2.0 * num_layers)


@torch.no_grad()
def init_linear_(linear: nn.Linear, std: float) -> None:
    """Weight ~ N(0, std), bias = 0."""
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        linear.bias.zero_()
