"""Router logits x_TD @ gate_ED^T in fp32 accuracy on bf16 tensor cores (Triton).

Shapes: the letters of megatron/model/__init__.py.

The router must see fp32 logits (a flipped near-tie changes which experts a token takes), but
an fp32 GEMM without TF32 runs on the GPU's CUDA cores, not its tensor cores, and needs an fp32
copy of the bf16 activations first. Here every fp32
operand is split into bf16 parts inside the kernel (w = hi + mid + lo, exact to fp32's 24 bits),
so all products are exact bf16 x bf16 products accumulated in fp32 on tensor cores:
- forward:   logits = x @ (hi + mid + lo)^T; x is bf16, so this is fp32-accurate;
- dL/dgate = (g_hi + g_mid + g_lo)^T @ x: fp32-accurate too (reduced over T in fixed-order
             chunks, then summed: deterministic);
- dL/dx    = g @ gate with both fp32: the three largest cross terms (hi.hi + hi.mid + mid.hi),
             relative error ~2^-16, far below the bf16 rounding of dL/dx itself (2^-9).
Used for bf16 activations on CUDA; with SPLIT off (fp32 operands, plain fp32 dots) the same
kernels run under triton's interpreter, which is how CPU tests check their indexing. The
autograd Function over these launchers is ops.RouterLogits.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _split3(v):
    """fp32 v as bf16 parts with v == hi + mid + lo to fp32's 24 bits."""
    hi = v.to(tl.bfloat16)
    r = v - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def logits_kernel(x_ptr, g_ptr, out_ptr, T, E, D: tl.constexpr, SPLIT: tl.constexpr,
                   BT: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr):
    """out[T, E] = x[T, D] @ g[E, D]^T, g split in three bf16 parts."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    es = tl.arange(0, BE)
    acc = tl.zeros([BT, BE], dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + tl.cast(rows, tl.int64)[:, None] * D + ds[None, :],
                    mask=(rows < T)[:, None] & (ds < D)[None, :], other=0.0)
        g = tl.load(g_ptr + es[None, :] * D + ds[:, None],
                    mask=(es < E)[None, :] & (ds < D)[:, None], other=0.0).to(tl.float32)
        if SPLIT:
            hi, mid, lo = _split3(g)
            acc += tl.dot(x, hi)
            acc += tl.dot(x, mid)
            acc += tl.dot(x, lo)
        else:
            acc += tl.dot(x, g)
    tl.store(out_ptr + tl.cast(rows, tl.int64)[:, None] * E + es[None, :], acc,
             mask=(rows < T)[:, None] & (es < E)[None, :])


@triton.jit
def grad_x_kernel(g_ptr, w_ptr, out_ptr, T, E, D: tl.constexpr, SPLIT: tl.constexpr,
                   BT: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr):
    """out[T, D] = g[T, E] @ w[E, D] (both fp32; hi.hi + hi.mid + mid.hi)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    ds = tl.program_id(1) * BD + tl.arange(0, BD)
    es = tl.arange(0, BE)
    g = tl.load(g_ptr + tl.cast(rows, tl.int64)[:, None] * E + es[None, :],
                mask=(rows < T)[:, None] & (es < E)[None, :], other=0.0)
    w = tl.load(w_ptr + es[:, None] * D + ds[None, :],
                mask=(es < E)[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
    if SPLIT:
        g_hi, g_mid, _ = _split3(g)
        w_hi, w_mid, _ = _split3(w)
        acc = tl.dot(g_hi, w_hi)
        acc += tl.dot(g_hi, w_mid)
        acc += tl.dot(g_mid, w_hi)
    else:
        acc = tl.dot(g, w)
    tl.store(out_ptr + tl.cast(rows, tl.int64)[:, None] * D + ds[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rows < T)[:, None] & (ds < D)[None, :])


@triton.jit
def grad_gate_kernel(g_ptr, x_ptr, out_ptr, T, E, rows_per_chunk, D: tl.constexpr,
                      SPLIT: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                      BD: tl.constexpr):
    """out[chunk, E, D] = g[rows of chunk, E]^T @ x[rows of chunk, D], g split in three."""
    ds = tl.program_id(0) * BD + tl.arange(0, BD)
    chunk = tl.program_id(1)
    es = tl.arange(0, BE)
    acc = tl.zeros([BE, BD], dtype=tl.float32)
    first = chunk * rows_per_chunk
    last = tl.minimum(first + rows_per_chunk, T)
    for t0 in range(first, last, BT):
        rows = t0 + tl.arange(0, BT)
        live = rows < last
        g = tl.load(g_ptr + tl.cast(rows, tl.int64)[None, :] * E + es[:, None],
                    mask=live[None, :] & (es < E)[:, None], other=0.0)       # [BE, BT]
        x = tl.load(x_ptr + tl.cast(rows, tl.int64)[:, None] * D + ds[None, :],
                    mask=live[:, None] & (ds < D)[None, :], other=0.0)       # [BT, BD]
        if SPLIT:
            hi, mid, lo = _split3(g)
            acc += tl.dot(hi, x)
            acc += tl.dot(mid, x)
            acc += tl.dot(lo, x)
        else:
            acc += tl.dot(g, x)
    tl.store(out_ptr + (chunk * E + es[:, None]) * D + ds[None, :], acc,
             mask=(es < E)[:, None] & (ds < D)[None, :])


# Tiles and launch settings per kernel: the best of benchmarks/tune_router_gemm.py's sweep on
# the H200 (T = 16,384, D = 768, E = 64; kernel time in a CUDA graph; the gains over the former
# 64 x 64 tiles and 4 warps are in benchmarks/HISTORY.md). Tuned at E = 64 only: with more
# experts (BE > 64) the former 64 x 64 tiles are kept, so that no [128, BE] fp32 accumulator
# spills where nothing was measured.
LOGITS_TILES = dict(BT=128, BD=64, num_warps=8, num_stages=3)
GRAD_X_TILES = dict(BT=128, BD=128, num_warps=4, num_stages=2)
GRAD_GATE_TILES = dict(BT=32, BD=128, num_warps=4, num_stages=3)
UNTUNED_TILES = dict(BT=64, BD=64, num_warps=4, num_stages=3)
# dL/dgate: row chunks reduced separately, then summed in a fixed order. Up to 64 chunks, so
# that ~512 programs run (64 at D = 768); wider models need fewer, which also bounds the
# [chunks, E, D] fp32 buffer of partial sums to ~512 * BD * E floats whatever D is.
_CHUNKS, _GATE_PROGRAMS = 64, 512


def _block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def _tiles(tuned: dict, num_experts: int) -> dict:
    """A kernel's tiles and launch settings: the tuned ones up to 64 experts."""
    return tuned if _block_e(num_experts) <= 64 else UNTUNED_TILES


def gate_grad_chunks(T: int, D: int, E: int) -> Tuple[dict, int, int]:
    """dL/dgate's (tiles, rows per chunk, chunks): up to _CHUNKS chunks of whole row tiles,
    ~_GATE_PROGRAMS programs in all."""
    tiles = _tiles(GRAD_GATE_TILES, E)
    bt, col_programs = tiles["BT"], triton.cdiv(D, tiles["BD"])
    max_chunks = max(1, min(_CHUNKS, triton.cdiv(_GATE_PROGRAMS, col_programs)))
    rows_per_chunk = triton.cdiv(max(T, 1), max_chunks * bt) * bt
    return tiles, rows_per_chunk, triton.cdiv(max(T, 1), rows_per_chunk)


def logits(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> torch.Tensor:
    """fp32 [T, E] = x_TD @ gate_ED^T (x_TD bf16 on CUDA, split products; fp32 under the
    interpreter, plain dots). Both contiguous."""
    (T, D), E = x_TD.shape, gate_ED.shape[0]
    out = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    if T:
        tiles = _tiles(LOGITS_TILES, E)
        logits_kernel[(triton.cdiv(T, tiles["BT"]),)](
            x_TD, gate_ED, out, T, E, D=D, SPLIT=x_TD.dtype != torch.float32, BE=_block_e(E),
            **tiles)
    return out


def grad_x(grad_TE: torch.Tensor, gate_ED: torch.Tensor, x_TD: torch.Tensor) -> torch.Tensor:
    """dL/dx [T, D] in x's dtype = grad_TE @ gate_ED (grad_TE fp32, contiguous)."""
    (T, D), E = x_TD.shape, gate_ED.shape[0]
    out = torch.empty_like(x_TD)
    if T:
        tiles = _tiles(GRAD_X_TILES, E)
        grad_x_kernel[(triton.cdiv(T, tiles["BT"]), triton.cdiv(D, tiles["BD"]))](
            grad_TE, gate_ED, out, T, E, D=D, SPLIT=x_TD.dtype != torch.float32,
            BE=_block_e(E), **tiles)
    return out


def grad_gate(grad_TE: torch.Tensor, x_TD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """dL/dgate fp32 [E, D] = grad_TE^T @ x_TD, chunk sums reduced in a fixed order."""
    (T, D), E = x_TD.shape, num_experts
    tiles, rows_per_chunk, chunks = gate_grad_chunks(T, D, E)
    partial = torch.empty(chunks, E, D, dtype=torch.float32, device=x_TD.device)
    grad_gate_kernel[(triton.cdiv(D, tiles["BD"]), chunks)](
        grad_TE, x_TD, partial, T, E, rows_per_chunk, D=D, SPLIT=x_TD.dtype != torch.float32,
        BE=_block_e(E), **tiles)
    return partial.sum(0)
