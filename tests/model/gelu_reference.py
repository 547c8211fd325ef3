"""Megatron-DeepSpeed's three GeLU forms, written out plainly (the tests' references).

Each form maps to (gelu(x), gelu'(x)), elementwise in the input's dtype (fp32 or fp64):
- "gelu_tanh": Megatron's fused bias_gelu (the default, --bias-gelu-fusion) and openai_gelu
  (--openai-gelu): 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))); the derivative is
  Megatron's bias_gelu_back. (openai_gelu writes the constant 0.7978845608028654: the same fp32
  number, and autograd of it is the same derivative.)
- "gelu": exact erf GeLU, F.gelu (--no-bias-gelu-fusion): x Phi(x); derivative Phi(x) + x phi(x).
- "gelu_erf_onnx": Megatron's erf_gelu (--onnx-safe): x * 0.5 * (erf(x / 1.41421) + 1), with
  the rounded constant 1.41421.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch

Form = Callable[[torch.Tensor], torch.Tensor]


def bias_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def bias_gelu_back(x: torch.Tensor) -> torch.Tensor:
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return (0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x))
            + 0.5 * (1 + tanh_out))


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def exact_gelu_back(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def erf_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (torch.erf(x / 1.41421) + 1.0)


def erf_gelu_back(x: torch.Tensor) -> torch.Tensor:
    w = x / 1.41421
    return 0.5 * (torch.erf(w) + 1.0) + x * torch.exp(-w * w) / (1.41421 * math.sqrt(math.pi))


REFERENCE: Dict[str, Tuple[Form, Form]] = {
    "gelu_tanh": (bias_gelu, bias_gelu_back),
    "gelu": (exact_gelu, exact_gelu_back),
    "gelu_erf_onnx": (erf_gelu, erf_gelu_back),
}
FORMS = tuple(REFERENCE)


def ref_gelu(x: torch.Tensor, form: str = "gelu_tanh") -> torch.Tensor:
    """gelu(x) of `form` (autograd gives its derivative: the test compares it too)."""
    return REFERENCE[form][0](x)
