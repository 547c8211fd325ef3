"""Triton kernels of the MoE layer's row traffic: gather, GeLU, combine and their backwards.

Shapes: the letters of megatron/model/__init__.py; n = group_offsets_E[-1], the number of kept
rows (rows [0, n) of P hold them), is read on the device, never on the host.

Why: the sync-free dispatch buffer is sized by a static bound (capacity: E * C = 8 T rows at
capacity factor 8) while ~3 T rows are used. Generic torch ops (index_select, where, gelu,
embedding_bag) touch every row of it; these kernels read n from the device and skip the
rest, so the padding costs memory, not time. They also fuse what torch needs several passes
for: the expert biases (b1 into the GeLU, b2 into the combine, each row finding its expert
among the E group ends), the combine weight into the per-token sum (fp32 accumulation, no
atomics), and both combine gradients into one pass; bias gradients are per-expert sums of
the sorted rows in a fixed order (deterministic, no atomics).
Rows at or past n are never read or written: grouped_mm leaves them alone too. The GeLU is
any of the model's forms (gelu.py: a constexpr ACT, forward and derivative).

Row kernels give each program a contiguous share of rows [0, n) (a few programs per SM), so a
padded buffer launches no idle work. The combine backward kernel splits each expert's rows into
slices instead (grid E x slices): a program then knows its expert (one bias row) and sums its
slice's dL/dy rows for dL/db2 in the same pass (an [E, slices, D] buffer of partial sums, reduced in
a fixed order: deterministic, no atomics, and no second pass over the [P, D] gradient, which
measured faster than a separate sum: benchmarks/HISTORY.md). Launch settings are the best of
benchmarks/tune_row_kernels.py's sweeps on the H200 (figures in HISTORY.md). Needs triton; on
CPU the kernels run under triton's interpreter (TRITON_INTERPRET=1), which is how CPU tests
check them.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from megatron.config import DEFAULT_ACTIVATION
from megatron.model.moe.kernels.gelu import act_code, gelu_parts


@triton.jit
def _row_range(offsets_ptr, num_experts):
    """This program's contiguous share [start, end) of the kept rows [0, n)."""
    n = tl.load(offsets_ptr + num_experts - 1)
    chunk = (n + tl.num_programs(0) - 1) // tl.num_programs(0)
    start = tl.program_id(0) * chunk
    return start, tl.minimum(start + chunk, n)


@triton.jit
def _expert_slice(offsets_ptr):
    """Program (e, s)'s rows: the s-th of num_programs(1) near-equal slices [start, end) of
    expert e's group (the groups tile [0, n), so every kept row has exactly one program)."""
    e = tl.program_id(0)
    first = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    last = tl.load(offsets_ptr + e)
    chunk = (last - first + tl.num_programs(1) - 1) // tl.num_programs(1)
    start = first + tl.program_id(1) * chunk
    return start, tl.minimum(start + chunk, last)


@triton.jit
def _partial_at(cols, WIDTH: tl.constexpr):
    """Offsets of program (e, s)'s row of an [E, slices, WIDTH] buffer of partial sums (see
    _tile_at)."""
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    return tl.cast(slot, tl.int64) * WIDTH + cols


@triton.jit
def _experts_of(offsets_ptr, num_experts, rows, BLOCK_E: tl.constexpr):
    """The expert owning each of `rows`: the number of group ends <= row."""
    e_idx = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + e_idx, mask=e_idx < num_experts, other=2147483647)
    return tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)


@triton.jit
def _expert_of(offsets_ptr, num_experts, row, BLOCK_E: tl.constexpr):
    """The expert owning one row."""
    e_idx = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + e_idx, mask=e_idx < num_experts, other=2147483647)
    return tl.sum((ends <= row).to(tl.int32), axis=0)


@triton.jit
def _tile_at(rows, cols, WIDTH: tl.constexpr):
    """Element offsets of the tile [rows, :WIDTH] of a row-major [*, WIDTH] buffer.

    Store addresses come from this helper of row and column indices only, never from a
    helper that also takes pointers or loaded values: torch.compile's mutation analysis of
    user Triton kernels treats a helper's result as derived from all its arguments, so a
    store through such a result marks those pointers written (a parameter marked written
    fails AOT autograd: "a leaf Variable that requires grad is being used in an in-place
    operation"). tests/model/test_moe_kernels_compile.py checks the analysis.
    """
    return tl.cast(rows, tl.int64)[:, None] * WIDTH + cols[None, :]


@triton.jit
def gather_rows_kernel(x_ptr, token_ptr, offsets_ptr, out_ptr, num_experts, x_stride,
                        D: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """out[p] = x[token[p]] for p < n, ROWS rows per step."""
    start, end = _row_range(offsets_ptr, num_experts)
    cols = tl.arange(0, BLOCK)
    for p0 in range(start, end, ROWS):
        rows = p0 + tl.arange(0, ROWS)
        live = rows < end
        mask = live[:, None] & (cols < D)[None, :]
        t = tl.load(token_ptr + rows, mask=live, other=0)
        v = tl.load(x_ptr + t[:, None] * x_stride + cols[None, :], mask=mask)
        tl.store(out_ptr + tl.cast(rows, tl.int64)[:, None] * D + cols[None, :],
                 v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gelu_kernel(grad_ptr, h_ptr, bias_ptr, offsets_ptr, out_ptr, num_experts,
                 F: tl.constexpr, HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr,
                 ACT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """For rows p < n, with z = h[p] + bias[expert(p)] (GeLU form ACT, fp32 math):
    forward:  out[p] = gelu(z)                                     (grad_ptr unused)
    backward: out[p] = grad[p] * gelu'(z).
    Columns in chunks of COLS (F = 384 in a 512-wide tile left a quarter of it masked; the
    chunked kernel measured faster), the rows' experts found once per step."""
    start, end = _row_range(offsets_ptr, num_experts)
    for p0 in range(start, end, ROWS):
        rows = p0 + tl.arange(0, ROWS)
        live = rows < end
        if HAS_BIAS:
            e = _experts_of(offsets_ptr, num_experts, rows, BLOCK_E)
        for c0 in tl.static_range(0, F, COLS):
            cols = c0 + tl.arange(0, COLS)
            at = _tile_at(rows, cols, F)
            mask = live[:, None] & (cols < F)[None, :]
            x = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + e[:, None] * F + cols[None, :], mask=mask,
                             other=0.0).to(tl.float32)
            gelu, gelu_grad = gelu_parts(x, ACT)
            if BACKWARD:
                g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
                y = g * gelu_grad
            else:
                y = gelu
            tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bag_sum_kernel(src_ptr, rows_ptr, starts_ptr, weight_ptr, bias_ptr, offsets_ptr, out_ptr,
                    num_tokens, num_experts, D: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[t] = sum over j in token t's bag, r = rows[j], of
    weight[r] * (src[r] + bias[expert(r)]), in fp32.

    Token t's bag is rows[starts[t]:starts[t + 1]] (the last one ends at n)."""
    t = tl.program_id(0)
    n = tl.load(offsets_ptr + num_experts - 1)
    start = tl.load(starts_ptr + t)
    end = tl.load(starts_ptr + t + 1, mask=t + 1 < num_tokens, other=n)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(start, end):
        r = tl.load(rows_ptr + j)
        v = tl.load(src_ptr + r * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = _expert_of(offsets_ptr, num_experts, r, BLOCK_E)
            v += tl.load(bias_ptr + e * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.load(weight_ptr + r).to(tl.float32)
        acc += v
    tl.store(out_ptr + tl.cast(t, tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def combine_backward_kernel(grad_ptr, y_ptr, weight_ptr, bias_ptr, token_ptr, offsets_ptr,
                             grad_y_ptr, grad_w_ptr, partial_ptr, D: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """For the rows p of program (e, s) (a slice of expert e's rows): g = grad[token[p]];
    grad_y[p] = weight[p] * g; grad_w[p] = <g, y[p] + bias[e]>; with BIAS_GRAD also
    partial[e, s] = the fp32 sum of those grad_y rows (dL/dbias in the same pass)."""
    start, end = _expert_slice(offsets_ptr)
    cols = tl.arange(0, BLOCK)
    live_cols = cols < D
    if HAS_BIAS:
        bias = tl.load(bias_ptr + tl.program_id(0) * D + cols, mask=live_cols,
                       other=0.0).to(tl.float32)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for p0 in range(start, end, ROWS):
        rows = p0 + tl.arange(0, ROWS)
        live = rows < end
        at = _tile_at(rows, cols, D)
        mask = live[:, None] & live_cols[None, :]
        y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += bias[None, :]
        t = tl.load(token_ptr + rows, mask=live, other=0)
        g = tl.load(grad_ptr + t[:, None] * D + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + rows, mask=live, other=0.0).to(tl.float32)
        gy = g * w[:, None]
        tl.store(grad_y_ptr + at, gy.to(grad_y_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_w_ptr + rows, tl.sum(g * y, axis=1), mask=live)
        if BIAS_GRAD:
            acc += gy
    if BIAS_GRAD:
        tl.store(partial_ptr + _partial_at(cols, D), tl.sum(acc, axis=0), mask=live_cols)


@triton.jit
def segment_sum_kernel(src_ptr, offsets_ptr, out_ptr, F: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out[e, cols] = sum over expert e's rows r of src[r, cols], in fp32 (fixed order)."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        live = rows < end
        tile = tl.load(src_ptr + tl.cast(rows, tl.int64)[:, None] * F + cols[None, :],
                       mask=live[:, None] & (cols < F)[None, :], other=0.0).to(tl.float32)
        acc += tile
    tl.store(out_ptr + e * F + cols, tl.sum(acc, axis=0), mask=cols < F)


# ----------------------------------------------------------------------------- launchers

def _block(width: int) -> int:
    return triton.next_power_of_2(max(width, 16))


def rows_per_step(block: int) -> int:
    """Rows per step of a row kernel: ~2K elements per step. With 4 warps and 32 programs per
    SM the best of benchmarks/tune_row_kernels.py's sweep on the H200 (D = 768, F = 384)."""
    return max(1, min(8, 2048 // block))


def warps_for(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, looked up once per device: the property
    query costs host time on every launch, and launches are the eager step's bottleneck."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if torch.compiler.is_compiling():       # traced once: no cache needed (nor wanted)
        return torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count_of(index)


def row_grid(device: torch.device, num_rows: int, per_sm: int = 32) -> tuple:
    """Programs for a row kernel: a few per SM (a few rows each on CPU / interpreter)."""
    if device.type == "cuda":
        return (max(1, min(num_rows, sm_count(device) * per_sm)),)
    return (max(1, min(num_rows, 4)),)


def gather_rows(x_TD: torch.Tensor, token_P: torch.Tensor, offsets_E: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """[P, D] in `dtype`: rows p < n = x_TD[token_P[p]]; rows >= n uninitialised."""
    P, (T, D) = token_P.shape[0], x_TD.shape
    out = torch.empty(P, D, dtype=dtype, device=x_TD.device)
    if P and T:
        x_TD = x_TD.contiguous()
        block = _block(D)
        gather_rows_kernel[row_grid(x_TD.device, P)](
            x_TD, token_P, offsets_E, out, offsets_E.shape[0], x_TD.stride(0), D=D,
            ROWS=rows_per_step(block), BLOCK=block, num_warps=warps_for(block))
    return out


def gelu_rows(h_PF: torch.Tensor, bias_EF: Optional[torch.Tensor], offsets_E: torch.Tensor,
              activation: str = DEFAULT_ACTIVATION) -> torch.Tensor:
    """[P, F]: rows p < n = gelu(h_PF[p] + bias_EF[expert of p]) (no bias: None), GeLU form
    `activation`."""
    return _gelu(None, h_PF, bias_EF, offsets_E, activation)


def gelu_backward_rows(grad_PF: torch.Tensor, h_PF: torch.Tensor, bias_EF: Optional[torch.Tensor],
                       offsets_E: torch.Tensor, activation: str = DEFAULT_ACTIVATION
                       ) -> torch.Tensor:
    """dL/dh [P, F] from dL/d(gelu_rows output); rows >= n uninitialised."""
    return _gelu(grad_PF, h_PF, bias_EF, offsets_E, activation)


def _gelu(grad_PF: Optional[torch.Tensor], h_PF: torch.Tensor, bias_EF: Optional[torch.Tensor],
          offsets_E: torch.Tensor, activation: str) -> torch.Tensor:
    """gelu_kernel: forward without grad_PF, backward with it. Launch settings: the best
    common one of a sweep on the H200 (F = 384): tiles of 16 x 128, 8 warps, 8 programs per
    SM."""
    P, Fh = h_PF.shape
    h_PF = h_PF.contiguous()
    out = torch.empty_like(h_PF)
    if P:
        cols = min(_block(Fh), 128)
        gelu_kernel[row_grid(h_PF.device, P, per_sm=8)](
            _or(grad_PF, h_PF), h_PF, _or(bias_EF, offsets_E), offsets_E, out,
            offsets_E.shape[0], F=Fh, HAS_BIAS=bias_EF is not None,
            BACKWARD=grad_PF is not None, ACT=act_code(activation),
            ROWS=max(1, min(16, 2048 // cols)), COLS=cols,
            BLOCK_E=_block(offsets_E.shape[0]), num_warps=8)
    return out


def bag_sum(src_PD: torch.Tensor, rows_J: torch.Tensor, starts_T: torch.Tensor,
            offsets_E: torch.Tensor, num_tokens: int, weight_P: Optional[torch.Tensor],
            bias_ED: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """[T, D] in out_dtype: out[t] = sum over token t's rows r of weight_P[r] * (src_PD[r] +
    bias_ED[expert of r]) (weight 1 / bias 0 when None), accumulated in fp32; 0 for empty bags."""
    D = src_PD.shape[1]
    src_PD = src_PD.contiguous()
    out = torch.empty(num_tokens, D, dtype=out_dtype, device=src_PD.device)
    if num_tokens:
        block = _block(D)
        bag_sum_kernel[(num_tokens,)](
            src_PD, rows_J, starts_T, _or(weight_P, offsets_E), _or(bias_ED, offsets_E),
            offsets_E, out, num_tokens, offsets_E.shape[0], D=D,
            HAS_WEIGHT=weight_P is not None, HAS_BIAS=bias_ED is not None, BLOCK=block,
            # A bag holds a few rows: one warp per 1K columns (the sweep's best).
            BLOCK_E=_block(offsets_E.shape[0]), num_warps=max(1, block // 1024))
    return out


def _expert_grid(device: torch.device, num_experts: int, per_sm: int) -> tuple:
    """(E, slices) programs: each expert's rows in slices, ~per_sm programs per SM in all (two
    slices per expert on CPU / interpreter, so the tests see a split)."""
    if device.type == "cuda":
        return (num_experts, max(1, -(-sm_count(device) * per_sm // num_experts)))
    return (num_experts, 2)


def combine_backward(grad_TD: torch.Tensor, y_PD: torch.Tensor, weight_P: torch.Tensor,
                     bias_ED: Optional[torch.Tensor], token_P: torch.Tensor,
                     offsets_E: torch.Tensor, bias_grad: bool = False
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dL/dy [P, D] in y's dtype, rows >= n uninitialised; dL/dweight fp32 [P], 0 past n;
    with bias_grad dL/dbias fp32 [E, D] = per-expert sums of dL/dy, else None)."""
    P, D = y_PD.shape
    E = offsets_E.shape[0]
    grad_TD, y_PD = grad_TD.contiguous(), y_PD.contiguous()
    grad_y = torch.empty(P, D, dtype=y_PD.dtype, device=y_PD.device)
    grad_w = torch.zeros(P, dtype=torch.float32, device=y_PD.device)
    grid = _expert_grid(y_PD.device, E, per_sm=32)
    partial = None         # [E, slices, D] per-slice sums: every launched program writes its row
    if bias_grad:
        partial = (torch.empty if P and E else torch.zeros)(*grid, D, dtype=torch.float32,
                                                             device=y_PD.device)
    if P and E:
        block = _block(D)
        combine_backward_kernel[grid](
            grad_TD, y_PD, weight_P, _or(bias_ED, offsets_E), token_P, offsets_E, grad_y, grad_w,
            _or(partial, offsets_E), D=D, HAS_BIAS=bias_ED is not None, BIAS_GRAD=bias_grad,
            ROWS=rows_per_step(block), BLOCK=block, num_warps=warps_for(block))
    # Summed over the slices in a fixed order: deterministic.
    return grad_y, grad_w, None if partial is None else partial.sum(dim=1)


def segment_sum(src_PF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """fp32 [E, F]: row e = sum over expert e's rows p of src_PF[p] (a bias gradient; any
    width F)."""
    Fw = src_PF.shape[1]
    E = offsets_E.shape[0]
    out = torch.empty(E, Fw, dtype=torch.float32, device=src_PF.device)
    if E:
        block = min(_block(Fw), 64)
        segment_sum_kernel[(E, triton.cdiv(Fw, block))](
            src_PF.contiguous(), offsets_E, out, F=Fw, ROWS=16, BLOCK=block, num_warps=8)
    return out


def _or(tensor: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel ignores when its flag is off (contiguous when used)."""
    return placeholder if tensor is None else tensor.contiguous()
