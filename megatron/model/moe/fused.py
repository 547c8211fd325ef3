"""Dispatch -> experts -> combine with Triton row kernels around the two grouped GEMMs.

Letters: T tokens, D hidden, F expert hidden, P dispatch rows, N kept pairs (rows [0, N)).

The same function as `combine(experts(dispatch(x)))` of dispatch.py / experts.py, in fewer
and cheaper passes (see kernels.py for why): the grouped GEMMs run without biases (no ones
column, no [w; b] weight copies, no strided weight-gradient slices), b1 is added inside the
GeLU kernel and b2 inside the combine, which sums each token's rows with their weights in
fp32; no pass touches the rows past N of a sync-free buffer (so no masking is needed either:
grouped_mm leaves those rows alone, and so does every kernel here). Backward: dispatch's
gradient is a per-token bag sum (no atomics), combine's two gradients and dL/db2 come from
one pass; dL/db1 is a per-expert row sum (fixed order).

Used on CUDA when triton is importable (MoEConfig.kernels "auto"), or always with "triton"
(CPU tests run the kernels under triton's interpreter). Expert parallelism keeps the torch path.
Also the entry points of the router GEMM (router_gemm.py) and of the capacity kernels
(capacity_kernels.py), chosen by the same setting.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from megatron.config import MOE_KERNELS
from megatron.model.mlp_gating import torch_capacity
from megatron.model.moe.dispatch import DispatchPlan
from megatron.model.moe.experts import Experts

# Imported once, here: under torch.compile an import (or find_spec) inside the traced code
# would be a graph break. Without triton (CPU installs) the torch path is used.
try:
    from megatron.model.moe import capacity_kernels as _CAPACITY
    from megatron.model.moe import grouped_gemm as _GEMM
    from megatron.model.moe import kernels as _KERNELS
    from megatron.model.moe import router_gemm as _ROUTER_GEMM
    _TRITON_AVAILABLE = True
except (ImportError, RuntimeError):   # no triton, or one that cannot load here
    _CAPACITY = _GEMM = _KERNELS = _ROUTER_GEMM = None
    _TRITON_AVAILABLE = False


def triton_available() -> bool:
    """Whether triton can be imported (it ships with CUDA builds of torch)."""
    return _TRITON_AVAILABLE


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--moe-kernels triton needs a CUDA device (on CPU only under "
                         "TRITON_INTERPRET=1, triton's interpreter, as the tests run it)")


def use_triton_kernels(choice: str, x: torch.Tensor, experts: Experts) -> bool:
    """auto: CUDA + triton + grouped experts; triton: always (error if impossible); torch: never."""
    if choice == "torch":
        return False
    if choice == "auto":
        return x.is_cuda and triton_available() and experts.use_grouped(x)
    if choice != "triton":
        raise ValueError(f"--moe-kernels must be one of {MOE_KERNELS}, got {choice!r}")
    if not triton_available():
        raise RuntimeError("--moe-kernels triton needs the triton package")
    _check_device(x)
    if not experts.use_grouped(x):
        raise ValueError("--moe-kernels triton needs grouped experts (not --moe-expert-impl loop)")
    return True


def use_triton_router(choice: str, x: torch.Tensor) -> bool:
    """The Triton router GEMM: auto on CUDA for bf16 inputs (exactly split); triton also on
    CPU for fp32 inputs (the interpreter tests); never with torch."""
    if choice == "torch" or not triton_available():
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16
    if choice == "triton":
        _check_device(x)
        return x.dtype == torch.float32
    return False


def use_triton_capacity(choice: str, x: torch.Tensor) -> bool:
    """The capacity kernels (any dtype: they read fp32 probabilities): auto on CUDA; triton
    also on CPU under the interpreter; never with torch."""
    if choice == "torch" or not triton_available():
        return False
    if choice == "triton":
        _check_device(x)
        return True
    return x.is_cuda


def triton_capacity(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                    num_experts: int, capacity: Optional[int]
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A CapacityFn (mlp_gating) of the capacity kernels: also each kept pair's dispatch row."""
    if experts_TK.shape[0] == 0 or experts_TK.shape[1] == 0:
        return torch_capacity(experts_TK, wanted_TK, probs_TK, num_experts, capacity)
    return _CAPACITY.capacity_rows(experts_TK, wanted_TK, probs_TK, num_experts, capacity)


def fused_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                  out_dtype: torch.dtype, expert_gemm: str = "auto") -> torch.Tensor:
    """out_TD[t] = sum over kept pairs (t, e) of weight * expert_e(x_TD[t]), fp32 sums.

    expert_gemm "grouped_mm" (auto): torch._grouped_mm between row kernels (kernels.py);
    "fused": grouped_gemm.py's Triton GEMMs with the row traffic inside. Measured on the H200
    (benchmarks/moe_layer.py, train_throughput.py): the same GPU time per layer, fused holds
    no [P, D] buffers (16% lower peak memory in compiled training) but launches more Triton
    kernels, whose host cost made eager training 8% slower; hence the default. The GeLU is
    the experts' form (experts.activation), in the kernels as in the torch path."""
    dtype = torch.bfloat16 if x_TD.is_cuda else experts.w1.dtype
    offs = plan.group_offsets_E.to(torch.int32)
    starts = plan.bag_offsets_B
    if expert_gemm == "fused":
        return _FusedExperts.apply(x_TD, plan.weight_P, experts.w1, experts.b1, experts.w2,
                                   experts.b2, plan.token_idx_P, offs, plan.bag_rows_J, starts,
                                   plan.num_tokens, out_dtype, dtype, experts.activation)
    x_PD = _GatherRows.apply(x_TD, plan.token_idx_P, offs, plan.bag_rows_J, starts, dtype)
    h_PF = torch._grouped_mm(x_PD, experts.w1.to(dtype), offs=offs)
    a_PF = _BiasGelu.apply(h_PF, experts.b1, offs, experts.activation)
    y_PD = torch._grouped_mm(a_PF, experts.w2.to(dtype), offs=offs)
    return _BiasCombine.apply(y_PD, plan.weight_P, experts.b2, plan.token_idx_P, offs,
                              plan.bag_rows_J, starts, plan.num_tokens, out_dtype)


def triton_router_logits(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> torch.Tensor:
    """router_gemm.router_logits (fp32-accurate router GEMM on bf16 tensor cores)."""
    return _ROUTER_GEMM.router_logits(x_TD, gate_ED)


class _GatherRows(torch.autograd.Function):
    """Forward: each kept pair's token row; backward: per-token sums of the row gradients."""

    @staticmethod
    def forward(ctx, x_TD, token_P, offs_E, rows_J, starts_T, dtype):
        ctx.save_for_backward(rows_J, starts_T, offs_E)
        ctx.num_tokens, ctx.x_dtype = x_TD.shape[0], x_TD.dtype
        return _KERNELS.gather_rows(x_TD, token_P, offs_E, dtype)

    @staticmethod
    def backward(ctx, grad_PD):
        rows_J, starts_T, offs_E = ctx.saved_tensors
        grad_TD = _KERNELS.bag_sum(grad_PD, rows_J, starts_T, offs_E, ctx.num_tokens, None,
                                   None, ctx.x_dtype)
        return grad_TD, None, None, None, None, None


class _BiasGelu(torch.autograd.Function):
    """gelu(h + b1[expert]) on the kept rows (GeLU form `activation`); dL/db1 = per-expert sums
    of dL/dh."""

    @staticmethod
    def forward(ctx, h_PF, b1_EF, offs_E, activation: str):
        ctx.save_for_backward(h_PF, b1_EF, offs_E)
        ctx.activation = activation
        return _KERNELS.gelu_rows(h_PF, b1_EF, offs_E, activation)

    @staticmethod
    def backward(ctx, grad_PF):
        h_PF, b1_EF, offs_E = ctx.saved_tensors
        grad_h = _KERNELS.gelu_backward_rows(grad_PF, h_PF, b1_EF, offs_E, ctx.activation)
        grad_b1 = None
        if b1_EF is not None and ctx.needs_input_grad[1]:
            grad_b1 = _KERNELS.segment_sum(grad_h, offs_E).to(b1_EF.dtype)
        return grad_h, grad_b1, None, None


class _BiasCombine(torch.autograd.Function):
    """out_TD[t] = sum of weight_P[r] * (y_PD[r] + b2[expert of r]) over token t's rows (fp32);
    the combine backward kernel also sums dL/db2 per expert."""

    @staticmethod
    def forward(ctx, y_PD, weight_P, b2_ED, token_P, offs_E, rows_J, starts_T, num_tokens: int,
                out_dtype):
        ctx.save_for_backward(y_PD, weight_P, b2_ED, token_P, offs_E)
        return _KERNELS.bag_sum(y_PD, rows_J, starts_T, offs_E, num_tokens, weight_P, b2_ED,
                                out_dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, weight_P, b2_ED, token_P, offs_E = ctx.saved_tensors
        grad_y, grad_w, grad_b2 = _KERNELS.combine_backward(
            grad_TD, y_PD, weight_P, b2_ED, token_P, offs_E,
            bias_grad=b2_ED is not None and ctx.needs_input_grad[2])
        return grad_y, grad_w, _cast(grad_b2, b2_ED), None, None, None, None, None, None


class _FusedExperts(torch.autograd.Function):
    """Dispatch -> Linear-GeLU-Linear -> combine on grouped_gemm.py's kernels.

    With s = each row's combine weight, forward: one GEMM reads the token rows through the
    row index and stores z = x[token] @ w1 + b1 and a = s * gelu(z); the second gives
    y = a @ w2 + s * b2 = s * expert(x[token]); out = per-token bag sums of y (fp32).
    Backward: one GEMM reads dL/dout rows through the row index: u = g[token] @ w2^T gives
    dL/dz = s * u * gelu'(z) and dL/ds = <u, gelu(z)> + <g[token], b2>; the weight gradients
    read their rows through the row index too, the bias gradients are per-expert sums, and
    dL/dx is the bag sum of dL/dz @ w1^T. Saved: x, z and a (no [P, D] buffer).
    """

    @staticmethod
    def forward(ctx, x_TD, weight_P, w1_EDF, b1_EF, w2_EFD, b2_ED, token_P, offs_E, rows_J,
                starts_T, num_tokens: int, out_dtype, dtype, activation: str):
        x = x_TD.to(dtype).contiguous()
        w1, w2 = w1_EDF.to(dtype), w2_EFD.to(dtype)
        P = token_P.shape[0]
        a_PF, z_PF = _GEMM.row_gemm(x, w1, offs_E, P, idx_P=token_P, epilogue=_GEMM.EPI_GELU,
                                    bias_EN=b1_EF, scale_P=weight_P, activation=activation)
        y_PD = _GEMM.row_gemm(a_PF, w2, offs_E, P, bias_EN=b2_ED, scale_P=weight_P)
        ctx.save_for_backward(x, z_PF, a_PF, weight_P, token_P, offs_E, rows_J, starts_T, w1,
                              w2, b1_EF, b2_ED)
        ctx.x_dtype, ctx.w_dtype, ctx.num_tokens = x_TD.dtype, w1_EDF.dtype, num_tokens
        ctx.activation = activation
        return _KERNELS.bag_sum(y_PD, rows_J, starts_T, offs_E, num_tokens, None, None,
                                out_dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        x, z_PF, a_PF, weight_P, token_P, offs_E, rows_J, starts_T, w1, w2, b1, b2 = \
            ctx.saved_tensors
        g = grad_TD.to(x.dtype).contiguous()
        P = token_P.shape[0]
        gb_TE = None if b2 is None else g @ b2.to(g.dtype).t()     # <g[t], b2[e]>
        dz_PF, parts = _GEMM.row_gemm(g, w2.transpose(1, 2), offs_E, P, idx_P=token_P,
                                      epilogue=_GEMM.EPI_GELU_GRAD, aux_PN=z_PF,
                                      scale_P=weight_P, vec_TE=gb_TE, activation=ctx.activation)
        grad_w = parts.sum(dim=1) if ctx.needs_input_grad[1] else None
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if ctx.needs_input_grad[4]:
            grad_w2 = _GEMM.group_wgrad(a_PF, g, offs_E, r_idx=token_P, out_dtype=ctx.w_dtype)
        if b2 is not None and ctx.needs_input_grad[5]:
            grad_b2 = _KERNELS.segment_sum(g, offs_E, idx_P=token_P, scale_P=weight_P)
        if ctx.needs_input_grad[2]:
            grad_w1 = _GEMM.group_wgrad(x, dz_PF, offs_E, l_idx=token_P, out_dtype=ctx.w_dtype)
        if b1 is not None and ctx.needs_input_grad[3]:
            grad_b1 = _KERNELS.segment_sum(dz_PF, offs_E)
        if ctx.needs_input_grad[0]:
            dx_PD = _GEMM.row_gemm(dz_PF, w1.transpose(1, 2), offs_E, P)
            grad_x = _KERNELS.bag_sum(dx_PD, rows_J, starts_T, offs_E, ctx.num_tokens, None,
                                      None, ctx.x_dtype)
        return (grad_x, grad_w, grad_w1, _cast(grad_b1, b1), grad_w2, _cast(grad_b2, b2), None,
                None, None, None, None, None, None, None)


def _cast(grad: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad is None or like is None else grad.to(like.dtype)
