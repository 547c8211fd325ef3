"""Triton grouped GEMMs over expert-sorted rows, with the row traffic fused in.

Letters: T tokens, P dispatch rows (sorted by expert; rows [0, N) hold the kept pairs, N =
offsets_E[-1] read on the device), E experts, K the reduced width, M/N output widths.

torch._grouped_mm needs its inputs materialised: the gathered token rows x[token[p]], the
GeLU output, the weighted output gradients w[p] * g[token[p]]. Each of those is a [P, D] or
[P, F] pass through memory (~0.3 ms of the layer's ~1 ms on an H200). These kernels read
token rows through the row index instead (gather prologue) and apply the bias, GeLU and its
derivative, the combine weight and the combine weight's gradient on the accumulator in
registers (epilogues), so only the GEMM operands and results touch memory.

- `row_gemm`: out[p] = epilogue(A[src(p)] @ B[expert(p)]) for p < N; src(p) = idx[p] with a
  gather, else p. One persistent program per SM walks the (row tile, column tile) pairs of
  all experts; tiles never cross an expert's group, rows >= N are never touched.
- `group_wgrad`: out[e] = L_e^T @ R_e over expert e's rows (weight gradients), either operand
  gathered through the row index.

Measured on the H200 (benchmarks/tune_grouped_gemm.py): the two GEMMs with fused epilogues
beat grouped_mm plus the row kernels they replace (130 vs 155 us, 172 vs 276 us), the plain
ones match it, the weight gradients are ~25% slower than grouped_mm's on materialised rows;
the layer's GPU time comes out the same (see fused.fused_experts for the choice).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from megatron.config import DEFAULT_ACTIVATION
from megatron.model.moe.gelu_triton import act_code, gelu_parts
from megatron.model.moe.kernels import _or, _source_rows, sm_count

EPI_PLAIN = 0       # out = acc + s[p] * bias[e]
EPI_GELU = 1        # z = acc + bias[e]; stores z (aux) and s[p] * gelu(z) (out)
EPI_GELU_GRAD = 2   # dz = s[p] * acc * gelu'(z[p]) (out); parts[p, n] = <acc, gelu(z)> (+ vec)
# gelu: the GeLU form of the constexpr ACT (gelu_triton.ACT_CODES), in both GeLU epilogues.


@triton.jit
def _pick(values, lanes, lane):
    """values[lane] of a small vector (a masked sum: vectors cannot be indexed)."""
    return tl.sum(tl.where(lanes == lane, values, 0), axis=0)


@triton.jit
def _row_gemm_kernel(a_ptr, idx_ptr, b_ptr, offsets_ptr, out_ptr, bias_ptr, aux_ptr, scale_ptr,
                     parts_ptr, vec_ptr, num_experts, a_stride, stride_be, stride_bk, stride_bn,
                     K: tl.constexpr, N: tl.constexpr, GATHER: tl.constexpr,
                     EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_VEC: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     BLOCK_E: tl.constexpr, FLATTEN: tl.constexpr):
    """Persistent grouped GEMM over the kept rows; see row_gemm for the epilogues.

    The operand tiles go from memory to the dot untouched (no arithmetic on them in the
    loop, which would keep them out of the asynchronous load pipeline); all the row math
    is in the epilogue."""
    lanes = tl.arange(0, BLOCK_E)
    live_e = lanes < num_experts
    ends = tl.load(offsets_ptr + lanes, mask=live_e, other=0)
    starts = tl.load(offsets_ptr + lanes - 1, mask=live_e & (lanes > 0), other=0)
    tiles = tl.where(live_e, (ends - starts + BM - 1) // BM, 0)
    tile_ends = tl.cumsum(tiles, 0)
    N_TILES: tl.constexpr = (N + BN - 1) // BN
    total = tl.sum(tiles, axis=0) * N_TILES
    ks0 = tl.arange(0, BK)
    for tile in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN):
        m_tile = tile // N_TILES
        n_tile = tile % N_TILES
        e = tl.sum((tile_ends <= m_tile).to(tl.int32), axis=0)
        row_end = _pick(ends, lanes, e)
        row0 = _pick(starts, lanes, e) + (m_tile - _pick(tile_ends - tiles, lanes, e)) * BM
        rows = row0 + tl.arange(0, BM)
        live = rows < row_end
        src = _source_rows(idx_ptr, rows, live, GATHER)
        cols = n_tile * BN + tl.arange(0, BN)
        col_ok = cols < N
        b_base = b_ptr + tl.cast(e, tl.int64) * stride_be
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + ks0
            k_ok = ks < K
            a = tl.load(a_ptr + src[:, None] * a_stride + ks[None, :],
                        mask=live[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        at = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
        mask = live[:, None] & col_ok[None, :]
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=live, other=0.0).to(tl.float32)[:, None]
        else:
            s = 1.0
        if EPILOGUE == 0:
            if HAS_BIAS:
                acc += s * tl.load(bias_ptr + e * N + cols, mask=col_ok,
                                   other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=mask)
        elif EPILOGUE == 1:
            z = acc
            if HAS_BIAS:
                z += tl.load(bias_ptr + e * N + cols, mask=col_ok,
                             other=0.0).to(tl.float32)[None, :]
            # GeLU of the stored (rounded) z, so the backward's gelu'(z) is its exact derivative.
            z = z.to(aux_ptr.dtype.element_ty)
            tl.store(aux_ptr + at, z, mask=mask)
            gelu, _ = gelu_parts(z.to(tl.float32), ACT)
            tl.store(out_ptr + at, (s * gelu).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            z = tl.load(aux_ptr + at, mask=mask, other=0.0).to(tl.float32)
            gelu, gelu_grad = gelu_parts(z, ACT)
            dz = s * acc * gelu_grad
            tl.store(out_ptr + at, dz.to(out_ptr.dtype.element_ty), mask=mask)
            part = tl.sum(tl.where(mask, acc * gelu, 0.0), axis=1)
            if HAS_VEC:   # + vec[src(p), e] once per row (the first column tile)
                v = tl.load(vec_ptr + src * num_experts + e, mask=live, other=0.0)
                part += tl.where(n_tile == 0, v.to(tl.float32), 0.0)
            tl.store(parts_ptr + tl.cast(rows, tl.int64) * N_TILES + n_tile, part, mask=live)


@triton.jit
def _group_wgrad_kernel(l_ptr, l_idx_ptr, r_ptr, r_idx_ptr, offsets_ptr, out_ptr, l_stride,
                        r_stride, I: tl.constexpr, J: tl.constexpr, GATHER_L: tl.constexpr,
                        GATHER_R: tl.constexpr, IEEE: tl.constexpr, BI: tl.constexpr,
                        BJ: tl.constexpr, BP: tl.constexpr):
    """out[e, i, j] = sum over expert e's rows p of L[lsrc(p), i] * R[rsrc(p), j].

    The tiles only feed the dot (see _row_gemm_kernel); a second, small dot on the same tile
    for the bias gradients (column sums) was miscompiled on the H200 with 4 warps (triton
    3.6: wrong weight gradients), so those come from kernels.segment_sum."""
    e = tl.program_id(0)
    J_TILES: tl.constexpr = (J + BJ - 1) // BJ
    i_tile = tl.program_id(1) // J_TILES
    j_tile = tl.program_id(1) % J_TILES
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    ii = i_tile * BI + tl.arange(0, BI)
    jj = j_tile * BJ + tl.arange(0, BJ)
    acc = tl.zeros([BI, BJ], dtype=tl.float32)
    for p0 in range(start, end, BP):
        ps = p0 + tl.arange(0, BP)
        live = ps < end
        lsrc = _source_rows(l_idx_ptr, ps, live, GATHER_L)
        rsrc = _source_rows(r_idx_ptr, ps, live, GATHER_R)
        lt = tl.load(l_ptr + lsrc[:, None] * l_stride + ii[None, :],
                     mask=live[:, None] & (ii < I)[None, :], other=0.0)
        rt = tl.load(r_ptr + rsrc[:, None] * r_stride + jj[None, :],
                     mask=live[:, None] & (jj < J)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(lt), rt, acc)
    at = tl.cast(e, tl.int64) * I * J + ii[:, None] * J + jj[None, :]
    tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty),
             mask=(ii < I)[:, None] & (jj < J)[None, :])


# ----------------------------------------------------------------------------- launchers

# Launch settings, the best of benchmarks/tune_grouped_gemm.py's sweep on the H200 at the
# moe_layer benchmark's shapes. row_gemm: (BM, BN, BK, warps, stages, programs per SM,
# flattened loops) per epilogue, and for plain GEMMs whose B is a transposed view.
ROW_BLOCKS = {EPI_GELU: (128, 128, 64, 8, 4, 1, False),
              EPI_GELU_GRAD: (128, 128, 64, 8, 4, 1, False),
              EPI_PLAIN: (128, 256, 64, 8, 3, 1, False),
              "transposed": (128, 256, 64, 8, 3, 1, True)}
WGRAD_BLOCKS = (128, 128, 64, 4, 4)    # BI, BJ, BP, warps, stages of group_wgrad


def _programs(device: torch.device, bound: int, per_sm: int = 1) -> int:
    if device.type == "cuda":
        return max(1, min(bound, sm_count(device) * per_sm))
    return max(1, min(bound, 4))


def row_gemm(a: torch.Tensor, b_EKN: torch.Tensor, offsets_E: torch.Tensor, num_rows: int, *,
             idx_P: Optional[torch.Tensor] = None, epilogue: int = EPI_PLAIN,
             bias_EN: Optional[torch.Tensor] = None, aux_PN: Optional[torch.Tensor] = None,
             scale_P: Optional[torch.Tensor] = None, vec_TE: Optional[torch.Tensor] = None,
             blocks: Optional[Tuple[int, ...]] = None, activation: str = DEFAULT_ACTIVATION):
    """Grouped GEMM over the P = num_rows dispatch rows: rows p < N of the result are
    acc = A[src(p)] @ B[e] (e the expert owning row p, src(p) = idx_P[p] or p), then the
    epilogue, with s = scale_P[p] (1 when None), bias = bias_EN[e] (0 when None) and gelu the
    GeLU form `activation` (megatron/model/activations.py):

    EPI_PLAIN:     returns out = acc + s * bias [P, N].
    EPI_GELU:      z = acc + bias; returns (s * gelu(z), z), both [P, N] in a's dtype.
    EPI_GELU_GRAD: with z = aux_PN (the forward's z): returns (dz = s * acc * gelu'(z) [P, N],
                   fp32 parts [P, n_tiles]); a row's parts sum to <acc, gelu(z)>, plus
                   vec_TE[src(p), e] when given (0 past N).

    b_EKN may be a strided view (a transposed weight). Rows >= N of the outputs are not
    written (uninitialised), like grouped_mm's."""
    transposed = epilogue == EPI_PLAIN and b_EKN.stride(1) == 1
    BM, BN, BK, warps, stages, per_sm, flatten = blocks or ROW_BLOCKS[
        "transposed" if transposed else epilogue]
    K, Nw = b_EKN.shape[1], b_EKN.shape[2]
    assert a.shape[1] == K and a.stride(1) == 1, (a.shape, a.stride(), K)
    device, dtype = a.device, a.dtype
    out = torch.empty(num_rows, Nw, dtype=dtype, device=device)
    n_tiles = triton.cdiv(Nw, BN)
    parts = None
    if epilogue == EPI_GELU:
        aux_PN = torch.empty(num_rows, Nw, dtype=dtype, device=device)
    elif epilogue == EPI_GELU_GRAD:
        assert aux_PN is not None
        parts = torch.zeros(num_rows, n_tiles, dtype=torch.float32, device=device)
    E = offsets_E.shape[0]
    if num_rows and E:
        bound = (triton.cdiv(num_rows, BM) + E) * n_tiles
        _row_gemm_kernel[(_programs(device, bound, per_sm),)](
            a, _or(idx_P, offsets_E), b_EKN, offsets_E, out, _or(bias_EN, offsets_E),
            _or(aux_PN, out), _or(scale_P, offsets_E), _or(parts, offsets_E),
            _or(vec_TE, offsets_E), E, a.stride(0), b_EKN.stride(0), b_EKN.stride(1),
            b_EKN.stride(2), K=K, N=Nw, GATHER=idx_P is not None, EPILOGUE=epilogue,
            ACT=act_code(activation), HAS_BIAS=bias_EN is not None,
            HAS_SCALE=scale_P is not None, HAS_VEC=vec_TE is not None,
            IEEE=dtype == torch.float32, BM=BM, BN=BN, BK=BK,
            BLOCK_E=triton.next_power_of_2(max(E, 16)), FLATTEN=flatten, num_warps=warps,
            num_stages=stages)
    if epilogue == EPI_GELU:
        return out, aux_PN
    if epilogue == EPI_GELU_GRAD:
        return out, parts
    return out


def group_wgrad(l_PI: torch.Tensor, r_PJ: torch.Tensor, offsets_E: torch.Tensor, *,
                l_idx: Optional[torch.Tensor] = None, r_idx: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None,
                blocks: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """Per-expert L^T @ R [E, I, J] over each expert's rows, L's and R's rows read through
    l_idx / r_idx when given. Experts without rows get zeros."""
    BI, BJ, BP, warps, stages = blocks or WGRAD_BLOCKS
    I, J = l_PI.shape[1], r_PJ.shape[1]
    assert l_PI.stride(1) == 1 and r_PJ.stride(1) == 1
    E = offsets_E.shape[0]
    out = torch.empty(E, I, J, dtype=out_dtype or l_PI.dtype, device=l_PI.device)
    if E:
        grid = (E, triton.cdiv(I, BI) * triton.cdiv(J, BJ))
        _group_wgrad_kernel[grid](
            l_PI, _or(l_idx, offsets_E), r_PJ, _or(r_idx, offsets_E), offsets_E, out,
            l_PI.stride(0), r_PJ.stride(0), I=I, J=J, GATHER_L=l_idx is not None,
            GATHER_R=r_idx is not None, IEEE=l_PI.dtype == torch.float32, BI=BI, BJ=BJ, BP=BP,
            num_warps=warps, num_stages=stages)
    return out

