"""The experts of an MoE layer: E small GeLU MLPs with stacked weights.

Letters: P dispatch rows (sorted by expert), D hidden, F expert hidden, E experts.

Each expert is Megatron's MLP: Linear(D -> F) -> GeLU -> Linear(F -> D), with the model's GeLU
form (megatron/model/activations.py; default Megatron's fused bias + tanh GeLU), as the XMoE
fork's experts were copies of its dense ParallelMLP.

Two paths behind one call, `experts(x_PD, group_offsets_E) -> y_PD`:
- grouped: two `torch._grouped_mm` calls over contiguous expert groups (the CUTLASS grouped GEMM
  on sm90). On CUDA its fast kernel takes bf16 only, so inputs and weights are cast to bf16 and
  the result cast back (an fp32 model thus runs its expert matmuls in bf16, as under autocast; use
  expert_impl="loop" for fp32 expert math). On CPU it runs in the weights' dtype.
- loop: a per-expert Python loop over row slices; needs the group ends on the host (one sync,
  reused from the exact plan when it has them). The slow, obviously correct reference.
Rows at or past group_offsets_E[-1] (padding of the sync-free plan) come out as 0 and receive no
gradient on either path.
"""

from __future__ import annotations

from typing import Optional, Sequence

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
                 output_init_std: float, bias: bool = True, impl: str = "auto",
                 params_dtype: torch.dtype = torch.float32,
                 activation: str = DEFAULT_ACTIVATION) -> None:
        super().__init__()
        if impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"expert_impl must be auto, grouped or loop, got {impl!r}")
        self.impl = impl
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
        return f"num_experts={self.num_experts}, impl={self.impl}, activation={self.activation}"

    def use_grouped(self, x: torch.Tensor) -> bool:
        """grouped: always (if torch has it); auto: on CUDA only; loop: never."""
        if self.impl == "grouped":
            if not grouped_mm_available():
                raise RuntimeError(f"expert_impl='grouped' needs torch._grouped_mm "
                                   f"(torch >= 2.8); this is torch {torch.__version__}")
            return True
        return self.impl == "auto" and x.is_cuda and grouped_mm_available()

    def forward(self, x_PD: torch.Tensor, group_offsets_E: torch.Tensor, *,
                valid_P: Optional[torch.Tensor] = None,
                group_ends: Optional[Sequence[int]] = None) -> torch.Tensor:
        """y_PD[p] = expert_e(x_PD[p]) for rows p of group e; 0 on rows past the last group.

        group_offsets_E: int32 [E] cumulative row ends. valid_P: bool [P] (rows < offsets[-1]),
        given by the sync-free plan. group_ends: host copy of the offsets, if already read.
        """
        assert group_offsets_E.shape == (self.num_experts,), group_offsets_E.shape
        if self.use_grouped(x_PD):
            return self.forward_grouped(x_PD, group_offsets_E, valid_P)
        if group_ends is None:
            group_ends = group_offsets_E.tolist()       # host sync (loop path only)
        return self.forward_loop(x_PD, group_ends)

    def forward_loop(self, x_PD: torch.Tensor, group_ends: Sequence[int]) -> torch.Tensor:
        """Reference path: one Linear-GeLU-Linear per non-empty expert slice."""
        x = x_PD.to(self.w1.dtype)
        outs, start = [], 0
        for e, end in enumerate(group_ends):
            if end > start:
                h = x[start:end] @ self.w1[e]
                if self.b1 is not None:
                    h = h + self.b1[e]
                y = self.activation_fn(h) @ self.w2[e]
                if self.b2 is not None:
                    y = y + self.b2[e]
                outs.append(y)
            start = end
        outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))   # padding rows (sync-free)
        return torch.cat(outs).to(x_PD.dtype)

    def forward_grouped(self, x_PD: torch.Tensor, group_offsets_E: torch.Tensor,
                        valid_P: Optional[torch.Tensor]) -> torch.Tensor:
        """Two grouped GEMMs. mat_a [P, K] x mat_b [E, K, N] with offs = cumulative row ends.

        Biases ride inside the GEMMs: each input row gets a column of ones (padded with zeros
        to a multiple of 8 columns, grouped_mm's 16-byte stride rule for bf16) and each
        weight the bias as an extra row, so h = [x, 1, 0..] @ [w1; b1; 0..] = x @ w1 + b1 with
        the bias added in the GEMM's fp32 accumulator. The bias gradients then come out of
        grouped_mm's weight gradient, which sums each group's rows only: no per-row bias
        tensor, no [P, E] one-hot GEMM, and padding rows (garbage past offs[-1]) never meet an
        arithmetic bias reduction, so only the input and output need masking.
        """
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


def _with_ones(x_PK: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[x, 1, 0, ..] (x unchanged without bias)."""
    if bias is None:
        return x_PK
    pad = x_PK.new_zeros(x_PK.shape[0], _bias_pad(x_PK.shape[1]))
    pad[:, 0] = 1
    return torch.cat([x_PK, pad], dim=1)


def _with_bias(w_EKN: torch.Tensor, bias_EN: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """[w; b; 0; ..] stacked along K, in `dtype` (w unchanged without bias)."""
    w = w_EKN.to(dtype)
    if bias_EN is None:
        return w
    E, K, N = w_EKN.shape
    zeros = w.new_zeros(E, _bias_pad(K) - 1, N)
    return torch.cat([w, bias_EN.to(dtype)[:, None, :], zeros], dim=1)


def _mask_rows(x_PN: torch.Tensor, valid_P: torch.Tensor) -> torch.Tensor:
    return torch.where(valid_P[:, None], x_PN, torch.zeros((), dtype=x_PN.dtype, device=x_PN.device))
