"""The experts of an MoE layer: E small GeLU MLPs with stacked weights, as grouped GEMMs.

Shapes: the letters of megatron/model/__init__.py.

Each expert is Megatron's MLP: Linear(D -> F) -> GeLU -> Linear(F -> D), with the model's GeLU
form (megatron/model/activations.py; default Megatron's fused bias + tanh GeLU), as the XMoE
fork's experts were copies of its dense ParallelMLP.

`experts(x_PD, group_offsets_E) -> y_PD` runs two `torch._grouped_mm` calls over contiguous
expert groups (the CUTLASS grouped GEMM on sm90). On CUDA its fast kernel takes bf16 only, so
inputs and weights are cast to bf16 and the result cast back (an fp32 model thus runs its
expert matmuls in bf16, as under autocast). On CPU it runs in the weights' dtype. Rows at or
past group_offsets_E[-1] (padding of the sync-free plan) come out as 0 and receive no gradient.
The per-expert loop that checks it is megatron/model/moe/reference.py (tests only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron.config import DEFAULT_ACTIVATION
from megatron.model.activations import activation_fn


def grouped_mm_available() -> bool:
    """Whether this torch has torch._grouped_mm (torch >= 2.8)."""
    return hasattr(torch, "_grouped_mm")


class Experts(nn.Module):
    """w1 [E, D, F] ~ N(0, init_std), w2 [E, F, D] ~ N(0, output_init_std), b1 [E, F] and
    b2 [E, D] = 0; activation: the GeLU form of every expert (the Triton paths read it too)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, init_std: float,
                 output_init_std: float, bias: bool = True,
                 params_dtype: torch.dtype = torch.float32,
                 activation: str = DEFAULT_ACTIVATION) -> None:
        super().__init__()
        if not grouped_mm_available():
            raise RuntimeError(f"MoE experts need torch._grouped_mm (torch >= 2.8); this is "
                               f"torch {torch.__version__}")
        self.activation = activation
        self.activation_fn = activation_fn(activation)
        E, D, Fh = num_experts, hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(E, D, Fh, dtype=params_dtype))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D, dtype=params_dtype))
        nn.init.normal_(self.w1, mean=0.0, std=init_std)
        nn.init.normal_(self.w2, mean=0.0, std=output_init_std)
        if bias:
            self.b1 = nn.Parameter(torch.zeros(E, Fh, dtype=params_dtype))
            self.b2 = nn.Parameter(torch.zeros(E, D, dtype=params_dtype))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, activation={self.activation}"

    def forward(self, x_PD: torch.Tensor, group_offsets_E: torch.Tensor,
                valid_P: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y_PD[p] = expert_e(x_PD[p]) for rows p of group e; 0 on rows past the last group.

        group_offsets_E: int32 [E] cumulative row ends (torch._grouped_mm's offs: mat_a [P, I]
        x mat_b [E, I, O] -> [P, O] per group). valid_P: bool [P] (rows < offsets[-1]), given by
        the sync-free plan.

        Biases ride inside the GEMMs: each input row gets a column of ones (padded with zeros
        to a multiple of 8 columns, grouped_mm's 16-byte stride rule for bf16) and each
        weight the bias as an extra row, so h = [x, 1, 0..] @ [w1; b1; 0..] = x @ w1 + b1 with
        the bias added in the GEMM's fp32 accumulator. The bias gradients then come out of
        grouped_mm's weight gradient, which sums each group's rows only: no per-row bias
        tensor, no [P, E] one-hot GEMM, and padding rows (garbage past offs[-1]) never meet an
        arithmetic bias reduction, so only the input and output need masking.
        """
        assert group_offsets_E.shape == (self.num_experts,), group_offsets_E.shape
        dtype = torch.bfloat16 if x_PD.is_cuda else self.w1.dtype
        offs = group_offsets_E.to(torch.int32)
        x = x_PD.to(dtype)
        if valid_P is not None:
            # grouped_mm leaves output rows past offs[-1] uninitialised, forward AND backward
            # (dL/dx rows): torch.where (not a multiply: 0 * NaN = NaN) at the input and the
            # output gives exact zeros there, values and gradients.
            x = _mask_rows(x, valid_P)
        h = torch._grouped_mm(_with_ones(x, self.b1), _with_bias(self.w1, self.b1, dtype),
                              offs=offs)
        a = _with_ones(self.activation_fn(h), self.b2)
        y = torch._grouped_mm(a, _with_bias(self.w2, self.b2, dtype), offs=offs)
        if valid_P is not None:
            y = _mask_rows(y, valid_P)
        return y.to(x_PD.dtype)


def _bias_pad(n: int) -> int:
    """Columns appended for the bias trick: a ones column, then zeros to a multiple of 8."""
    return 8 - n % 8


def _with_ones(x_PI: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[x, 1, 0, ..] (x unchanged without bias)."""
    if bias is None:
        return x_PI
    pad = x_PI.new_zeros(x_PI.shape[0], _bias_pad(x_PI.shape[1]))
    pad[:, 0] = 1
    return torch.cat([x_PI, pad], dim=1)


def _with_bias(w_EIO: torch.Tensor, bias_EO: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """[w; b; 0; ..] stacked along I, in `dtype` (w unchanged without bias)."""
    w = w_EIO.to(dtype)
    if bias_EO is None:
        return w
    E, I, O = w_EIO.shape
    zeros = w.new_zeros(E, _bias_pad(I) - 1, O)
    return torch.cat([w, bias_EO.to(dtype)[:, None, :], zeros], dim=1)


def _mask_rows(x_PO: torch.Tensor, valid_P: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=x_PO.dtype, device=x_PO.device)
    return torch.where(valid_P[:, None], x_PO, zero)
