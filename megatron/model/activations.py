"""The GeLU forms of the dense MLPs and experts: Megatron-DeepSpeed's three, one definition each.

- "gelu_tanh" (the default): 0.5 x (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), the tanh
  approximation. Megatron's fused bias_gelu (--bias-gelu-fusion, on by default; its backward,
  bias_gelu_back, is this formula's derivative) and openai_gelu (--openai-gelu) compute it,
  and so does GPT-2 (Hugging Face's "gelu_new"), so weights export without a change of
  activation. torch's F.gelu(approximate="tanh") is the same formula (sqrt(2/pi) =
  0.7978845608..., the same fp32 number as Megatron's 0.79788456) in one kernel whose
  backward keeps only the input.
- "gelu": exact erf GeLU x Phi(x), F.gelu (--no-bias-gelu-fusion).
- "gelu_erf_onnx": Megatron's erf_gelu (--onnx-safe): x * 0.5 * (erf(x / 1.41421) + 1), with
  its rounded 1.41421, written out as Megatron does (ONNX export had no GeLU op).

megatron.run_config.gelu_form picks the form from those flags (Megatron's precedence); the
Triton kernels (moe/kernels/gelu.py) compute the same forms from a constexpr.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from megatron.config import ACTIVATIONS

Activation = Callable[[torch.Tensor], torch.Tensor]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Megatron's bias_gelu / openai_gelu: the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GeLU."""
    return F.gelu(x)


def gelu_erf_onnx(x: torch.Tensor) -> torch.Tensor:
    """Megatron's erf_gelu: erf with the rounded constant 1.41421 (autograd differentiates it)."""
    return x * 0.5 * (torch.erf(x / 1.41421) + 1.0)


_FORMS: Dict[str, Activation] = {"gelu_tanh": gelu_tanh, "gelu": gelu,
                                 "gelu_erf_onnx": gelu_erf_onnx}
assert tuple(_FORMS) == ACTIVATIONS


def activation_fn(name: str) -> Activation:
    """The torch function of GeLU form `name` (one of megatron.config.ACTIVATIONS)."""
    if name not in _FORMS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return _FORMS[name]
