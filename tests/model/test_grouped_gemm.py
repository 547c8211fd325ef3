"""The fused grouped GEMMs (megatron/model/moe/grouped_gemm.py) against per-row loops.

On CPU they run under triton's interpreter (in the subprocess of
test_moe_kernels_interpreted.py), in fp32, with small tiles so that every GEMM spans several
row tiles, column tiles and reduction steps; on CUDA they run compiled in bf16 with the launch
settings the layer uses, at the benchmark's widths, against fp64 references.
"""

import pytest
import torch

from tests.model.gelu_reference import FORMS, REFERENCE
from tests.model.triton_kernels import (CUDA, CUDA_OR_INTERPRETER, DEVICE, NEEDS_TRITON,
                                        kernel_module)

pytestmark = [NEEDS_TRITON, CUDA_OR_INTERPRETER]
SMALL_ROWS = (16, 16, 16, 4, 1, 2, False)   # BM, BN, BK, warps, stages, per SM, flatten
SMALL_WGRAD = (16, 16, 16, 4, 1)


@pytest.fixture(scope="module")
def gg():
    return kernel_module("grouped_gemm", "_row_gemm_kernel")


def problem(counts, T=30, K=40, N=36, pad=9, seed=0):
    """Group ends, a row -> token index with `pad` padding rows, and the expert of each row."""
    torch.manual_seed(seed)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    n = int(offs[-1])
    idx = torch.randint(0, T, (n + pad,))
    expert = [int((offs <= p).sum()) for p in range(n)]
    return offs.to(DEVICE), idx.to(DEVICE), expert, n


def gelu_parts(z, form="gelu_tanh"):
    """(gelu(z), gelu'(z)) of the form (gelu_reference.py)."""
    value, derivative = REFERENCE[form]
    return value(z), derivative(z)


COUNTS = [7, 0, 20, 3, 33]      # an empty expert, groups shorter and longer than a tile


@pytest.mark.skipif(CUDA, reason="fp32 loops: the interpreter path")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_epilogue_matches_loop(gg, gather, bias, form):
    offs, idx, expert, n = problem(COUNTS)
    P, E = idx.shape[0], len(COUNTS)
    x = torch.randn(30 if gather else P, 40)
    w = torch.randn(E, 40, 36)
    b = torch.randn(E, 36) if bias else None
    s = torch.rand(P)
    a, z = gg.row_gemm(x, w, offs, P, idx_P=idx if gather else None, epilogue=gg.EPI_GELU,
                       bias_EN=b, scale_P=s, blocks=SMALL_ROWS, activation=form)
    for p in range(n):
        e = expert[p]
        zp = x[idx[p] if gather else p] @ w[e] + (b[e] if bias else 0.0)
        torch.testing.assert_close(z[p], zp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[p], s[p] * gelu_parts(z[p], form)[0], atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.skipif(CUDA, reason="fp32 loops: the interpreter path")
def test_plain_epilogue_with_transposed_weight_matches_loop(gg):
    offs, idx, expert, n = problem(COUNTS)
    P, E = idx.shape[0], len(COUNTS)
    x = torch.randn(P, 40)
    w_ENK = torch.randn(E, 36, 40)          # used as its transpose [E, K, N], a strided view
    b = torch.randn(E, 36)
    s = torch.rand(P)
    out = gg.row_gemm(x, w_ENK.transpose(1, 2), offs, P, bias_EN=b, scale_P=s,
                      blocks=SMALL_ROWS)
    for p in range(n):
        want = x[p] @ w_ENK[expert[p]].T + s[p] * b[expert[p]]
        torch.testing.assert_close(out[p], want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(CUDA, reason="fp32 loops: the interpreter path")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vec", [True, False])
def test_gelu_grad_epilogue_matches_loop(gg, vec, form):
    offs, idx, expert, n = problem(COUNTS)
    P, E = idx.shape[0], len(COUNTS)
    g = torch.randn(30, 40)
    w = torch.randn(E, 40, 36)
    z = torch.randn(P, 36)
    s = torch.rand(P)
    v = torch.randn(30, E) if vec else None
    dz, parts = gg.row_gemm(g, w, offs, P, idx_P=idx, epilogue=gg.EPI_GELU_GRAD, aux_PN=z,
                            scale_P=s, vec_TE=v, blocks=SMALL_ROWS, activation=form)
    assert parts.shape == (P, 3) and bool((parts[n:] == 0).all())
    for p in range(n):
        u = g[idx[p]] @ w[expert[p]]
        gelu, grad = gelu_parts(z[p], form)
        torch.testing.assert_close(dz[p], s[p] * u * grad, atol=1e-5, rtol=1e-5)
        want = (u * gelu).sum() + (v[idx[p], expert[p]] if vec else 0.0)
        torch.testing.assert_close(parts[p].sum(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(CUDA, reason="fp32 loops: the interpreter path")
@pytest.mark.parametrize("gather_l,gather_r", [(True, False), (False, True), (False, False)])
def test_wgrad_matches_loop(gg, gather_l, gather_r):
    offs, idx, expert, n = problem(COUNTS)
    P, E = idx.shape[0], len(COUNTS)
    L = torch.randn(30 if gather_l else P, 40)
    R = torch.randn(30 if gather_r else P, 36)
    out = gg.group_wgrad(L, R, offs, l_idx=idx if gather_l else None,
                         r_idx=idx if gather_r else None, blocks=SMALL_WGRAD)
    want = torch.zeros(E, 40, 36)
    for p in range(n):
        want[expert[p]] += torch.outer(L[idx[p] if gather_l else p], R[idx[p] if gather_r else p])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)   # the empty expert: zeros


@pytest.mark.skipif(CUDA, reason="fp32 loops: the interpreter path")
def test_default_settings_match_small_tiles(gg):
    """The layer's own launch settings (large tiles: one tile per group here) agree with the
    small tiles above."""
    offs, idx, expert, n = problem(COUNTS)
    P, E = idx.shape[0], len(COUNTS)
    x, w, b, s = torch.randn(30, 40), torch.randn(E, 40, 36), torch.randn(E, 36), torch.rand(P)
    big = gg.row_gemm(x, w, offs, P, idx_P=idx, epilogue=gg.EPI_GELU, bias_EN=b, scale_P=s)
    small = gg.row_gemm(x, w, offs, P, idx_P=idx, epilogue=gg.EPI_GELU, bias_EN=b, scale_P=s,
                        blocks=SMALL_ROWS)
    for u, v in zip(big, small):
        torch.testing.assert_close(u[:n], v[:n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gg.group_wgrad(x, small[0], offs, l_idx=idx),
                               gg.group_wgrad(x, small[0], offs, l_idx=idx, blocks=SMALL_WGRAD),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
def test_cuda_bf16_at_layer_widths_matches_fp64(gg, form):
    """bf16 with the layer's launch settings (D = 768, F = 384: several tiles and reduction
    steps per expert) against fp64 on the same bf16 inputs; memory pre-filled with NaN."""
    torch.cuda.empty_cache()
    junk = torch.full((2**28,), float("nan"), device="cuda")
    del junk
    T, D, F, E = 4096, 768, 384, 8
    counts = [700, 0, 1500, 129, 2000, 1, 3000, 970]
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32).cuda()
    n = int(offs[-1])
    P = n + 1000
    rows_of = torch.repeat_interleave(torch.arange(E), torch.tensor(counts)).cuda()
    idx = torch.randint(0, T, (P,), device="cuda")
    bf, f64 = torch.bfloat16, torch.float64
    x, g = torch.randn(T, D, device="cuda", dtype=bf), torch.randn(T, D, device="cuda", dtype=bf)
    w1 = (torch.randn(E, D, F, device="cuda") / D ** 0.5).to(bf)
    w2 = (torch.randn(E, F, D, device="cuda") / F ** 0.5).to(bf)
    b1 = torch.randn(E, F, device="cuda", dtype=bf)
    s = torch.rand(P, device="cuda")
    xi, gi = x[idx[:n]].to(f64), g[idx[:n]].to(f64)

    def check(got, want, what, tol=2 ** -7):
        err = (got[:n].to(f64) - want).abs().max() / want.abs().max()
        assert float(err) < tol, (what, float(err))

    a, z = gg.row_gemm(x, w1, offs, P, idx_P=idx, epilogue=gg.EPI_GELU, bias_EN=b1, scale_P=s,
                       activation=form)
    z_ref = torch.einsum("pd,pdf->pf", xi, w1.to(f64)[rows_of]) + b1.to(f64)[rows_of]
    check(z, z_ref, "z")
    check(a, s[:n, None].to(f64) * gelu_parts(z[:n].to(f64), form)[0], "a")
    y = gg.row_gemm(a, w2, offs, P)
    check(y, torch.einsum("pf,pfd->pd", a[:n].to(f64), w2.to(f64)[rows_of]), "y")
    dz, parts = gg.row_gemm(g, w2.transpose(1, 2), offs, P, idx_P=idx,
                            epilogue=gg.EPI_GELU_GRAD, aux_PN=z, scale_P=s, activation=form)
    u = torch.einsum("pd,pfd->pf", gi, w2.to(f64)[rows_of])
    gelu, grad = gelu_parts(z[:n].to(f64), form)
    check(dz, s[:n, None].to(f64) * u * grad, "dz")
    check(parts.sum(1)[:n, None], (u * gelu).sum(1, keepdim=True), "parts", 2 ** -12)
    dx = gg.row_gemm(dz, w1.transpose(1, 2), offs, P)
    check(dx, torch.einsum("pf,pdf->pd", dz[:n].to(f64), w1.to(f64)[rows_of]), "dx")
    dw2 = gg.group_wgrad(a, g, offs, r_idx=idx, out_dtype=torch.float32)
    dw1 = gg.group_wgrad(x, dz, offs, l_idx=idx, out_dtype=torch.float32)
    bounds = [0] + offs.tolist()
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        want2 = a[lo:hi].to(f64).t() @ g[idx[lo:hi]].to(f64)
        want1 = x[idx[lo:hi]].to(f64).t() @ dz[lo:hi].to(f64)
        for got, want, what in ((dw2[e], want2, "dw2"), (dw1[e], want1, "dw1")):
            err = (got.to(f64) - want).abs().max() / want.abs().max().clamp(min=1e-30)
            assert float(err) < 2 ** -12, (what, e)   # (the empty expert: exact zeros)
