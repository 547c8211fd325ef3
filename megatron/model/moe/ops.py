"""The Triton backend's operations (autograd Functions and the capacity strategy) over the raw
kernels of kernels/: the row kernels (rows.py), the router GEMM (router_gemm.py), the threshold
router's ranking (threshold.py) and the capacity kernels (capacity.py). Which of these run is
decided once, in backend.py.

Shapes: the letters of megatron/model/__init__.py.

`triton_experts` computes the same function as combine(experts(dispatch(x))) of dispatch.py /
experts.py, in fewer and cheaper passes (see kernels/rows.py for why): the grouped GEMMs run
without biases (no ones column, no [w; b] weight copies, no strided weight-gradient slices),
b1 is added inside the GeLU kernel and b2 inside the combine, which sums each token's rows with
their weights in fp32; no pass touches the rows past the kept pairs of a sync-free buffer (so no
masking is needed either: grouped_mm leaves those rows alone, and so does every kernel here).
Backward: dispatch's gradient is a per-token bag sum (no atomics), combine's two gradients and
dL/db2 come from one pass; dL/db1 is a per-expert row sum (fixed order).

On CPU the kernels run only under triton's interpreter (TRITON_INTERPRET=1, the tests); every
operation here checks that first (a cheap test on CUDA tensors: the branch is folded when
traced).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.model.moe.dispatch import (DispatchPlan, PlanRows, capacity_with_rows,
                                         dispatch_bound)
from megatron.model.moe.experts import Experts
from megatron.model.moe.kernels import capacity as capacity_kernels
from megatron.model.moe.kernels import router_gemm
from megatron.model.moe.kernels import threshold as threshold_kernels
from megatron.model.moe.kernels import rows as row_kernels


def check_device(x: torch.Tensor) -> None:
    """ValueError unless x is on CUDA or triton interprets the kernels (TRITON_INTERPRET=1)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--moe-backend triton needs a CUDA device (on CPU only under "
                         "TRITON_INTERPRET=1, triton's interpreter, as the tests run it)")


def triton_router_logits(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> torch.Tensor:
    """fp32 router logits [T, E]: the Triton GEMM of router_gemm.py where it is exactly
    fp32-accurate (bf16 activations on CUDA: products of bf16 parts; fp32 under the
    interpreter), else the fp32 torch GEMM (.float() undoes a model-wide cast)."""
    check_device(x_TD)
    if x_TD.dtype == (torch.bfloat16 if x_TD.is_cuda else torch.float32):
        return RouterLogits.apply(x_TD, gate_ED)
    return F.linear(x_TD.float(), gate_ED.float())


def triton_threshold_slots(probs_TE: torch.Tensor, threshold: float, num_slots: int
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend's threshold slots (a router.ThresholdSlotsFn): one ranking kernel
    instead of a segmented sort and a scan, the same decisions."""
    check_device(probs_TE)
    return threshold_kernels.threshold_slots(probs_TE, threshold, num_slots)


def triton_capacity(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                    num_experts: int, capacity: Optional[int]
                    ) -> Tuple[torch.Tensor, torch.Tensor, PlanRows]:
    """The Triton backend's capacity strategy (a router.CapacityFn): the capacity kernels give
    the decisions and each kept pair's dispatch row, then one pass (token_bags) the rest of the
    plan's rows. No host sync, no sort."""
    check_device(experts_TK)
    T, K = experts_TK.shape
    if T == 0 or K == 0:
        return capacity_with_rows(experts_TK, wanted_TK, probs_TK, num_experts, capacity)
    kept_TK, tokens_per_expert_E, rows_TK = capacity_kernels.capacity_rows(
        experts_TK, wanted_TK, probs_TK, num_experts, capacity)
    offsets_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    bound = dispatch_bound(T, K, num_experts, capacity)
    pair_P, rows_J, bag_offsets_T = capacity_kernels.token_bags(kept_TK, rows_TK, bound)
    return kept_TK, tokens_per_expert_E, PlanRows(offsets_E, pair_P, rows_J, bag_offsets_T)


def triton_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """out_TD[t] = sum over kept pairs (t, e) of weight * expert_e(x_TD[t]), fp32 sums:
    torch._grouped_mm between the row kernels of kernels/rows.py. The GeLU is the experts' form
    (experts.activation), in the kernels as in the torch path."""
    check_device(x_TD)
    dtype = torch.bfloat16 if x_TD.is_cuda else experts.w1.dtype
    offs = plan.group_offsets_E.to(torch.int32)
    starts = plan.bag_offsets_G
    x_PD = _GatherRows.apply(x_TD, plan.token_idx_P, offs, plan.bag_rows_J, starts, dtype)
    h_PF = torch._grouped_mm(x_PD, experts.w1.to(dtype), offs=offs)
    a_PF = _BiasGelu.apply(h_PF, experts.b1, offs, experts.activation)
    y_PD = torch._grouped_mm(a_PF, experts.w2.to(dtype), offs=offs)
    return _BiasCombine.apply(y_PD, plan.weight_P, experts.b2, plan.token_idx_P, offs,
                              plan.bag_rows_J, starts, plan.num_tokens, out_dtype)


class RouterLogits(torch.autograd.Function):
    """fp32 logits [T, E] = x_TD @ gate_ED^T and both gradients on kernels/router_gemm.py (x_TD
    bf16 on CUDA; fp32 under the interpreter)."""

    @staticmethod
    def forward(ctx, x_TD, gate_ED):
        x_TD, gate_ED = x_TD.contiguous(), gate_ED.contiguous()
        ctx.save_for_backward(x_TD, gate_ED)
        return router_gemm.logits(x_TD, gate_ED)

    @staticmethod
    def backward(ctx, grad_TE):
        x_TD, gate_ED = ctx.saved_tensors
        grad_TE = grad_TE.float().contiguous()
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = router_gemm.grad_x(grad_TE, gate_ED, x_TD)
        if ctx.needs_input_grad[1]:
            grad_gate = router_gemm.grad_gate(grad_TE, x_TD, gate_ED.shape[0]).to(gate_ED.dtype)
        return grad_x, grad_gate


class _GatherRows(torch.autograd.Function):
    """Forward: each kept pair's token row; backward: per-token sums of the row gradients."""

    @staticmethod
    def forward(ctx, x_TD, token_P, offs_E, rows_J, starts_T, dtype):
        ctx.save_for_backward(rows_J, starts_T, offs_E)
        ctx.num_tokens, ctx.x_dtype = x_TD.shape[0], x_TD.dtype
        return row_kernels.gather_rows(x_TD, token_P, offs_E, dtype)

    @staticmethod
    def backward(ctx, grad_PD):
        rows_J, starts_T, offs_E = ctx.saved_tensors
        grad_TD = row_kernels.bag_sum(grad_PD, rows_J, starts_T, offs_E, ctx.num_tokens, None,
                                   None, ctx.x_dtype)
        return grad_TD, None, None, None, None, None


class _BiasGelu(torch.autograd.Function):
    """gelu(h + b1[expert]) on the kept rows (GeLU form `activation`); dL/db1 = per-expert sums
    of dL/dh."""

    @staticmethod
    def forward(ctx, h_PF, b1_EF, offs_E, activation: str):
        ctx.save_for_backward(h_PF, b1_EF, offs_E)
        ctx.activation = activation
        return row_kernels.gelu_rows(h_PF, b1_EF, offs_E, activation)

    @staticmethod
    def backward(ctx, grad_PF):
        h_PF, b1_EF, offs_E = ctx.saved_tensors
        grad_h = row_kernels.gelu_backward_rows(grad_PF, h_PF, b1_EF, offs_E, ctx.activation)
        grad_b1 = None
        if b1_EF is not None and ctx.needs_input_grad[1]:
            grad_b1 = row_kernels.segment_sum(grad_h, offs_E).to(b1_EF.dtype)
        return grad_h, grad_b1, None, None


class _BiasCombine(torch.autograd.Function):
    """out_TD[t] = sum of weight_P[r] * (y_PD[r] + b2[expert of r]) over token t's rows (fp32);
    the combine backward kernel also sums dL/db2 per expert."""

    @staticmethod
    def forward(ctx, y_PD, weight_P, b2_ED, token_P, offs_E, rows_J, starts_T, num_tokens: int,
                out_dtype):
        ctx.save_for_backward(y_PD, weight_P, b2_ED, token_P, offs_E)
        return row_kernels.bag_sum(y_PD, rows_J, starts_T, offs_E, num_tokens, weight_P, b2_ED,
                                out_dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, weight_P, b2_ED, token_P, offs_E = ctx.saved_tensors
        grad_y, grad_w, grad_b2 = row_kernels.combine_backward(
            grad_TD, y_PD, weight_P, b2_ED, token_P, offs_E,
            bias_grad=b2_ED is not None and ctx.needs_input_grad[2])
        return grad_y, grad_w, _cast(grad_b2, b2_ED), None, None, None, None, None, None


def _cast(grad: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None or like is None else grad.to(like.dtype)
