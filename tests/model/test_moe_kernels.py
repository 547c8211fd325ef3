"""The Triton kernels (megatron/model/moe/kernels/rows.py, router_gemm.py) and the Triton backend.

On CPU the kernels run under the triton interpreter (TRITON_INTERPRET=1, in a subprocess
started by test_moe_kernels_interpreted.py), in fp32, against the per-token reference of
test_moe_layer.py and against plain loops; on CUDA they run compiled, in bf16, against the
torch-ops path and float64. Skipped when triton is not installed.
"""

import pytest
import torch

from megatron.model.moe.backend import triton_available
from tests.model.gelu_reference import FORMS, REFERENCE
from tests.model.test_moe_layer import (_grouped_cpu_ok, inputs, make_layer, params,
                                        run_and_compare)
from tests.model.triton_kernels import CUDA, CUDA_OR_INTERPRETER, DEVICE, kernel_module

pytestmark = [
    pytest.mark.skipif(not triton_available() or not (CUDA or _grouped_cpu_ok()),
                       reason="needs triton (and CUDA or CPU torch._grouped_mm)"),
    CUDA_OR_INTERPRETER,
]


@pytest.fixture(scope="module")
def kernels():
    return kernel_module("kernels.rows", "gather_rows_kernel")


def offsets(n_kept: int, num_experts: int = 4) -> torch.Tensor:
    """int32 [E] group ends whose last entry is n_kept (how kernels learn N)."""
    ends = torch.linspace(0, n_kept, num_experts + 1)[1:].round().to(torch.int32)
    ends[-1] = n_kept
    return ends.to(DEVICE)


# ----------------------------------------------------------------------------- kernels alone

def test_gather_rows_copies_only_kept_rows(kernels):
    x = torch.randn(7, 5, device=DEVICE)
    token = torch.tensor([3, 0, 6, 3, 1, 2], device=DEVICE)
    out = kernels.gather_rows(x, token, offsets(4), dtype=torch.float32)
    assert out.shape == (6, 5)
    assert torch.equal(out[:4], x[token[:4]])


def expert_rows(off: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The expert of every row < N, by a plain loop over the group ends."""
    ends, out, e = off.tolist(), [], 0
    for p in range(ends[-1]):
        while p >= ends[e]:
            e += 1
        out.append(e)
    return torch.tensor(out, device=DEVICE)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_gelu_rows_and_backward_match_torch(kernels, bias, form):
    """fp32 kernels against the form's formula and its derivative (gelu_reference.py) in
    fp64, so the reference adds no rounding of its own."""
    off = torch.tensor([2, 2, 7, 9], dtype=torch.int32, device=DEVICE)   # an empty expert
    h = 3 * torch.randn(11, 6, device=DEVICE)
    b1 = torch.randn(4, 6, device=DEVICE) if bias else None
    z = (h[:9] + (b1[expert_rows(off, 9)] if bias else 0.0)).double()
    value, derivative = REFERENCE[form]
    a = kernels.gelu_rows(h, b1, off, form)
    torch.testing.assert_close(a[:9].double(), value(z), atol=1e-6, rtol=1e-6)
    g = torch.randn(11, 6, device=DEVICE)
    got = kernels.gelu_backward_rows(g, h, b1, off, form)
    torch.testing.assert_close(got[:9].double(), g[:9].double() * derivative(z), atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_gelu_rows_saturate_at_large_inputs(kernels, form):
    """Large |z| (tanh from exp: exp overflows to inf there): gelu -> z or -0, gelu' -> 1 or 0,
    no NaN; elsewhere the fp32 kernel stays within 1e-6 of the fp64 formula."""
    z = torch.tensor([-1e30, -1e10, -1e4, -300.0, -40.0, -12.0, -5.0, -1e-3, 0.0, 1e-3, 5.0,
                      12.0, 40.0, 300.0, 1e4, 1e10, 1e30], device=DEVICE)
    h = z.repeat(3, 1)                                     # 3 rows x 17 columns, one expert
    off = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    a = kernels.gelu_rows(h, None, off, form)[0].double()
    d = kernels.gelu_backward_rows(torch.ones_like(h), h, None, off, form)[0].double()
    assert bool(torch.isfinite(a).all() and torch.isfinite(d).all()), (a, d)
    big = z.abs() >= 40
    torch.testing.assert_close(a[big], torch.where(z[big] > 0, z[big], 0.0).double())
    torch.testing.assert_close(d[big], (z[big] > 0).double())
    value, derivative = REFERENCE[form]
    zd = z[~big].double()
    torch.testing.assert_close(a[~big], value(zd), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(d[~big], derivative(zd), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_bag_sum_matches_loop(kernels, weighted, bias):
    """Bags of 0..3 rows in any order; the last bag ends at N (rows past N are never read)."""
    src = torch.randn(10, 6, device=DEVICE)
    src[8:] = float("nan")                               # rows >= N = 8: padding
    rows = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4, 9, 9], device=DEVICE)
    starts = torch.tensor([0, 2, 2, 5, 6], device=DEVICE)  # bags [0,2) [] [2,5) [5,6) [6,8)
    off = torch.tensor([3, 3, 8, 8], dtype=torch.int32, device=DEVICE)
    weight = torch.randn(10, device=DEVICE) if weighted else None
    b2 = torch.randn(4, 6, device=DEVICE) if bias else None
    out = kernels.bag_sum(src, rows, starts, off, num_tokens=5, weight_P=weight, bias_ED=b2,
                          out_dtype=torch.float32)
    expert = expert_rows(off, 8)
    ends = starts.tolist()[1:] + [8]
    for t, (s, e) in enumerate(zip(starts.tolist(), ends)):
        want = torch.zeros(6, device=DEVICE)
        for j in range(s, e):
            r = int(rows[j])
            v = src[r] + (b2[expert[r]] if bias else 0.0)
            want += v * (weight[r] if weighted else 1.0)
        torch.testing.assert_close(out[t], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ends", [[1, 4, 4, 6], [0, 25, 26, 40]])     # empty experts; slices
def test_combine_backward_matches_loop(kernels, bias, ends):
    n = ends[-1]
    grad = torch.randn(4, 5, device=DEVICE)
    y = torch.randn(n + 1, 5, device=DEVICE)
    y[n:] = float("nan")                                 # padding row
    weight = torch.rand(n + 1, device=DEVICE)
    token = torch.randint(0, 4, (n + 1,), device=DEVICE)
    off = torch.tensor(ends, dtype=torch.int32, device=DEVICE)
    b2 = torch.randn(4, 5, device=DEVICE) if bias else None
    grad_y, grad_w, grad_b2 = kernels.combine_backward(grad, y, weight, b2, token, off,
                                                       bias_grad=bias)
    expert = expert_rows(off, n)
    want_b2 = torch.zeros(4, 5, device=DEVICE)
    for p in range(n):
        g = grad[token[p]]
        yb = y[p] + (b2[expert[p]] if bias else 0.0)
        torch.testing.assert_close(grad_y[p], g * weight[p], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad_w[p], (g * yb).sum(), atol=1e-5, rtol=1e-5)
        want_b2[expert[p]] += g * weight[p]
    assert float(grad_w[n]) == 0.0
    if bias:
        torch.testing.assert_close(grad_b2, want_b2, atol=1e-5, rtol=1e-5)
    else:
        assert grad_b2 is None


def test_segment_sum_matches_loop(kernels):
    src = torch.randn(80, 5, device=DEVICE)
    src[70:] = float("nan")
    off = torch.tensor([0, 33, 33, 70], dtype=torch.int32, device=DEVICE)
    out = kernels.segment_sum(src, off)
    bounds = [0] + off.tolist()
    for e in range(4):
        rows = range(bounds[e], bounds[e + 1])
        want = sum((src[r] for r in rows), torch.zeros(5, device=DEVICE))
        torch.testing.assert_close(out[e], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- router GEMM

@pytest.mark.parametrize("shape", [(70, 40, 6), (64, 64, 16), (5, 130, 3), (33, 24, 72)])
def test_router_gemm_matches_fp64(kernels, shape):
    """Logits and both gradients vs float64 (CPU interpreter: fp32 operands; CUDA: bf16
    activations, the fp32 weight split in bf16 parts on tensor cores)."""
    from megatron.model.moe.ops import RouterLogits
    T, D, E = shape
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(T, D, device=DEVICE).to(dtype).requires_grad_(True)
    gate = (0.3 * torch.randn(E, D, device=DEVICE)).requires_grad_(True)
    g = torch.randn(T, E, device=DEVICE)
    out = RouterLogits.apply(x, gate)
    assert out.dtype == torch.float32 and out.shape == (T, E)
    gx, gw = torch.autograd.grad(out, [x, gate], g)
    x64, w64 = x.detach().double(), gate.detach().double()
    ref = x64 @ w64.T
    # fp32-accurate: the error of an fp32 GEMM (~D * 2^-24 of the magnitudes), not of bf16.
    scale = x64.abs() @ w64.abs().T
    assert float(((out.detach().double() - ref).abs() / scale).max()) < 1e-6
    gw_ref = g.double().T @ x64
    assert float(((gw.double() - gw_ref).abs() / (g.double().abs().T @ x64.abs())).max()) < 1e-6
    gx_ref = g.double() @ w64
    tol = 2 ** -8 if CUDA else 1e-6           # dL/dx is rounded to x's dtype (bf16 on CUDA)
    assert float(((gx.double() - gx_ref).abs() / (g.double().abs() @ w64.abs()
                                                  + 1e-30)).max()) < tol


# ----------------------------------------------------------------------------- Triton backend

@pytest.mark.skipif(CUDA, reason="fp32 per-token reference: the CPU interpreter path")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("router", ["threshold", "topk", "hash"])
def test_triton_backend_matches_per_token_reference(kernels, router, drop_tokens, sync_free,
                                                    bias):
    layer = make_layer(router, drop_tokens, sync_free, impl="grouped", backend="triton",
                       expert_bias=bias).eval()
    assert (layer.experts.b1 is not None) == bias
    run_and_compare(layer)


@pytest.mark.skipif(CUDA, reason="fp32 per-token reference: the CPU interpreter path")
@pytest.mark.parametrize("form", ["gelu", "gelu_erf_onnx"])    # (gelu_tanh: the test above)
def test_triton_backend_every_gelu_form_matches_reference(kernels, form):
    layer = make_layer("threshold", True, False, impl="grouped", backend="triton",
                       activation=form).eval()
    run_and_compare(layer)


@pytest.mark.skipif(CUDA, reason="fp32 bitwise comparison: the CPU interpreter path")
def test_triton_backend_sync_free_equals_exact(kernels):
    """The padded buffer changes nothing: same rows, same order, same sums, bit for bit."""
    x, _ = inputs()
    results = []
    for sync_free in (False, True):
        layer = make_layer("threshold", True, sync_free, impl="grouped", backend="triton")
        xx = x.clone().requires_grad_(True)
        out = layer(xx).output
        results.append([out] + list(torch.autograd.grad(out.square().sum(),
                                                        [xx] + params(layer))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sync_free", [False, True])
def test_cuda_triton_matches_torch_in_bf16(kernels, sync_free, form):
    """Triton kernels vs torch ops on the GPU, bf16 params, on memory pre-filled with NaN
    (rows the kernels skip must never leak into values or gradients)."""
    torch.cuda.empty_cache()
    junk = torch.full((2**28,), float("nan"), device="cuda")   # 1 GiB of NaN, then freed
    del junk
    x, _ = inputs()
    results = []
    for choice in ("torch", "triton"):
        layer = make_layer("threshold", True, sync_free, impl="auto", backend=choice,
                           activation=form).cuda()
        layer.experts.to(torch.bfloat16)
        xx = x.cuda().bfloat16().requires_grad_(True)
        out = layer(xx).output
        results.append([out.float()] + [g.float() for g in torch.autograd.grad(
            (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum(),
            [xx] + params(layer))])
    for name, a, b in zip(["out", "x", "gate", "w1", "b1", "w2", "b2"], *results):
        assert bool(torch.isfinite(b).all()), name
        torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
