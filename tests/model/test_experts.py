"""Experts (stacked weights): the grouped GEMMs and the reference loop (reference.py) vs a
per-row fp32 reference, padding rows, every GeLU form (gelu_reference.py); which backend runs."""

import pytest
import torch

from megatron.config import MoEConfig
from megatron.model.moe.backend import resolve_backend, triton_available
from megatron.model.moe.experts import Experts, grouped_mm_available
from megatron.model.moe.reference import loop_experts
from tests.model.gelu_reference import FORMS, ref_gelu


def _cpu_grouped_works(dtype: torch.dtype) -> bool:
    if not grouped_mm_available():
        return False
    try:
        x = torch.randn(4, 16, dtype=dtype)
        w = torch.randn(2, 16, 8, dtype=dtype)
        torch._grouped_mm(x, w, offs=torch.tensor([1, 4], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


HAS_CUDA = torch.cuda.is_available()
GROUPED_FP32_CPU = _cpu_grouped_works(torch.float32)
GROUPED_BF16_CPU = _cpu_grouped_works(torch.bfloat16)
needs_grouped_fp32 = pytest.mark.skipif(not GROUPED_FP32_CPU,
                                        reason="torch._grouped_mm does not run fp32 on CPU here")

E, D, FH = 5, 16, 8
# Group sizes with empty experts first, in the middle and last: 3, 0, 7, 0(…), ...
SIZES = (0, 3, 0, 7, 0)


def _experts(bias: bool = True, dtype=torch.float32, **kw) -> Experts:
    torch.manual_seed(0)
    ex = Experts(E, D, FH, init_std=0.3, output_init_std=0.2, bias=bias, params_dtype=dtype,
                 **kw)
    if bias:  # non-zero biases so the test sees them (init is 0)
        with torch.no_grad():
            ex.b1.normal_(0, 0.1)
            ex.b2.normal_(0, 0.1)
    return ex


def _run(ex: Experts, impl: str, x_PD, offsets_E, valid_P=None):
    """impl "grouped": the Experts module; "loop": its weights through the reference loop."""
    if impl == "loop":
        return loop_experts(ex, x_PD, offsets_E, valid_P)
    return ex(x_PD, offsets_E, valid_P=valid_P)


def _offsets(sizes=SIZES) -> torch.Tensor:
    return torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)


def _reference(ex: Experts, x_PD: torch.Tensor, sizes=SIZES) -> torch.Tensor:
    """Per row: find its expert by walking the sizes, then Linear-GeLU-Linear in fp32 (the
    experts' GeLU form, written out in gelu_reference.py)."""
    rows = []
    experts_of_rows = [e for e, n in enumerate(sizes) for _ in range(n)]
    for p, e in enumerate(experts_of_rows):
        h = x_PD[p].float() @ ex.w1[e].float()
        if ex.b1 is not None:
            h = h + ex.b1[e].float()
        y = ref_gelu(h, ex.activation) @ ex.w2[e].float()
        if ex.b2 is not None:
            y = y + ex.b2[e].float()
        rows.append(y)
    pad = x_PD.shape[0] - len(rows)
    return torch.stack(rows + [x_PD.new_zeros(D, dtype=torch.float32)] * pad)


def _params(ex: Experts):
    return [p for p in (ex.w1, ex.b1, ex.w2, ex.b2) if p is not None]


def _check_against_reference(ex: Experts, padding: int, atol: float, rtol: float = 1e-5,
                             impl: str = "grouped"):
    P = sum(SIZES)
    torch.manual_seed(1)
    x = torch.randn(P + padding, D, dtype=ex.w1.dtype, requires_grad=True)
    valid = torch.arange(P + padding) < P if padding else None
    grad_out = torch.randn(P + padding, D, dtype=ex.w1.dtype)

    y = _run(ex, impl, x, _offsets(), valid)
    assert y.shape == x.shape and y.dtype == x.dtype
    got = torch.autograd.grad((y.float() * grad_out.float()).sum(), [x] + _params(ex))
    ref_y = _reference(ex, x)
    want = torch.autograd.grad((ref_y * grad_out.float()).sum(), [x] + _params(ex))

    torch.testing.assert_close(y.float(), ref_y, atol=atol, rtol=rtol)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol)
    if padding:
        assert torch.all(y[P:] == 0)
        assert torch.all(got[0][P:] == 0)
    # Empty experts are normal: their weights get exactly zero gradient, never None.
    for e, n in enumerate(SIZES):
        if n == 0:
            assert torch.all(got[1][e] == 0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding", [0, 6])
def test_loop_path_matches_reference(bias, padding, form):
    _check_against_reference(_experts(bias, activation=form), padding, atol=1e-5, impl="loop")


@needs_grouped_fp32
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding", [0, 6])
def test_grouped_path_matches_reference_fp32_cpu(bias, padding, form):
    _check_against_reference(_experts(bias, activation=form), padding, atol=1e-5)


@pytest.mark.parametrize("impl", ["loop"] + (["grouped"] if GROUPED_FP32_CPU else []))
def test_default_form_is_megatrons_tanh_and_forms_differ(impl):
    """Experts default to the original's fused tanh GeLU; each form changes the output."""
    assert _experts().activation == "gelu_tanh"
    x = torch.randn(sum(SIZES), D)
    outs = {form: _run(_experts(activation=form), impl, x, _offsets()) for form in FORMS}
    torch.testing.assert_close(outs["gelu_tanh"], _run(_experts(), impl, x, _offsets()))
    for form in FORMS:
        torch.testing.assert_close(outs[form], _reference(_experts(activation=form), x),
                                   atol=1e-5, rtol=1e-5)
    assert float((outs["gelu_tanh"] - outs["gelu"]).abs().max()) > 1e-5


@pytest.mark.skipif(not GROUPED_BF16_CPU, reason="torch._grouped_mm does not run bf16 on CPU")
def test_grouped_path_bf16_cpu_close_to_fp32_reference():
    _check_against_reference(_experts(True, torch.bfloat16), 4, atol=3e-2, rtol=3e-2)


@needs_grouped_fp32
def test_grouped_equals_loop_fp32():
    ex = _experts()
    x = torch.randn(sum(SIZES), D)
    torch.testing.assert_close(_run(ex, "grouped", x, _offsets()), _run(ex, "loop", x, _offsets()),
                               atol=1e-6, rtol=1e-6)


@needs_grouped_fp32
def test_grouped_padding_rows_garbage_stays_out():
    """NaN in padding rows (as uninitialised grouped_mm rows may hold) reaches nothing."""
    ex = _experts()
    P = sum(SIZES)
    x = torch.randn(P + 3, D)
    x[P:] = float("nan")
    x.requires_grad_(True)
    valid = torch.arange(P + 3) < P
    y = ex(x, _offsets(), valid_P=valid)
    assert torch.isfinite(y).all() and torch.all(y[P:] == 0)
    y.sum().backward()
    for t in [x] + _params(ex):
        assert torch.isfinite(t.grad).all()
    assert torch.all(x.grad[P:] == 0)


@pytest.mark.parametrize("impl", ["loop"] + (["grouped"] if GROUPED_FP32_CPU else []))
def test_all_experts_empty(impl):
    ex = _experts()
    offsets = torch.zeros(E, dtype=torch.int32)
    assert _run(ex, impl, torch.randn(0, D), offsets).shape == (0, D)
    no_rows = torch.zeros(3, dtype=torch.bool)
    assert torch.all(_run(ex, impl, torch.randn(3, D), offsets, no_rows) == 0)


def test_init_and_shapes():
    ex = Experts(8, 64, 32, init_std=0.02, output_init_std=0.005, bias=True)
    assert ex.w1.shape == (8, 64, 32) and ex.w2.shape == (8, 32, 64)
    assert ex.b1.shape == (8, 32) and ex.b2.shape == (8, 64)
    assert abs(ex.w1.std().item() - 0.02) < 0.002 and abs(ex.w2.std().item() - 0.005) < 0.0005
    assert torch.all(ex.b1 == 0) and torch.all(ex.b2 == 0)
    assert Experts(2, 4, 4, 0.02, 0.02, bias=False).b1 is None
    with pytest.raises(ValueError, match="--moe-backend must be one of"):
        MoEConfig(backend="fast")


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda():
    """Resolved from the device alone (no GPU needed to resolve for one)."""
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    assert resolve_backend("torch", torch.device("cuda")).name == "torch"
    cuda = resolve_backend("auto", torch.device("cuda"))
    assert cuda.name == ("triton" if triton_available() else "torch")
    if triton_available():
        assert resolve_backend("triton", torch.device("cpu")).name == "triton"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_grouped_cuda_bf16_matches_loop_fp32():
    ex = _experts().cuda()
    x = torch.randn(sum(SIZES), D, device="cuda")
    x.requires_grad_(True)
    valid = torch.arange(x.shape[0] + 4, device="cuda") < x.shape[0]
    xp = torch.cat([x, torch.full((4, D), float("nan"), device="cuda")])  # padded, sync-free
    for inp, v in ((x, None), (xp, valid)):
        y = ex(inp, _offsets().cuda(), valid_P=v)
        got = torch.autograd.grad(y.sum(), [x] + _params(ex))   # empty experts in backward too
        ref_y = _reference(ex, inp)
        want = torch.autograd.grad(ref_y[: x.shape[0]].sum(), [x] + _params(ex))
        torch.testing.assert_close(y[: x.shape[0]], ref_y[: x.shape[0]], atol=5e-2, rtol=5e-2)
        assert torch.all(y[x.shape[0]:] == 0)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, atol=5e-2, rtol=5e-2)
