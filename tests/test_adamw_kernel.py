"""The master-weight AdamW kernel (megatron/kernels/adamw.py) and MasterWeightAdamW's kernel path.

Checked against a slow fp32 AdamW written here (the formula, parameter by parameter) and against
MasterWeightAdamW's torch path (torch's AdamW on the masters): several steps, two groups with
different weight decay, a bf16 parameter with its master and an fp32 parameter that is its own
master, a parameter without a gradient at one step, clipping coefficients below 1 and equal to
1, sizes ragged across the kernel's blocks and chunks; the state moves between the two paths.

On CPU the kernel runs under triton's interpreter (TRITON_INTERPRET=1, in the subprocess of
tests/model/test_moe_kernels_interpreted.py); on CUDA compiled.
"""

import copy
import math

import pytest
import torch

from megatron.mixed_precision import MasterWeightAdamW, clip_coefficient
from tests.model.triton_kernels import CUDA_OR_INTERPRETER, DEVICE, NEEDS_TRITON, kernel_module

pytestmark = [NEEDS_TRITON, CUDA_OR_INTERPRETER]

try:                # (interpreted or compiled as TRITON_INTERPRET was when the process started)
    import triton
    import triton.language as tl

    from megatron.kernels.adamw import _round_to_bf16 as ROUNDING
except (ImportError, RuntimeError):                          # NEEDS_TRITON skips the tests
    ROUNDING = None

BETAS, EPS = (0.9, 0.95), 1e-8


@pytest.fixture(scope="module")
def adamw():
    return kernel_module("adamw", "adamw_kernel", package="megatron.kernels")


# ----------------------------------------------------------------------------- the reference

class Reference:
    """AdamW (decoupled weight decay) on fp32 copies, one parameter at a time, each with its
    own step count (a parameter without a gradient is not stepped)."""

    def __init__(self, params):
        self.master = [p.detach().float().cpu().clone() for p in params]
        self.m = [torch.zeros_like(x) for x in self.master]
        self.v = [torch.zeros_like(x) for x in self.master]
        self.count = [0] * len(self.master)

    def step(self, i, grad, *, lr, weight_decay, beta1=BETAS[0], beta2=BETAS[1], eps=EPS):
        g = grad.float()
        self.count[i] += 1
        bc1, bc2 = 1 - beta1 ** self.count[i], 1 - beta2 ** self.count[i]
        master = self.master[i] * (1 - lr * weight_decay)
        self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
        self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
        denom = self.v[i].sqrt() / math.sqrt(bc2) + eps
        self.master[i] = master - (lr / bc1) * self.m[i] / denom


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual.float(), expected, rtol=2e-6, atol=2e-7, msg=what)


# ----------------------------------------------------------------------------- the kernel alone

if ROUNDING is not None:
    @triton.jit
    def round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """Stores adamw._round_to_bf16 of x (triton finds the helper among the globals)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, ROUNDING(x), mask=offs < n)


def test_bf16_rounding_is_torchs(adamw):
    """The integer round-to-nearest-even of the kernel gives torch's bf16 of every fp32: ties
    both ways, carries into the exponent, overflow to inf, subnormals, signed zeros, inf."""
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2 ** 31, 2 ** 31, (3000,), generator=gen, dtype=torch.int64)
    upper = torch.randint(0, 2 ** 15, (200,), generator=gen, dtype=torch.int64) << 16
    ties = torch.cat([upper | 0x8000, upper | 0x7FFF, upper | 0x8001, upper | 0xFFFF])
    bits = torch.cat([random_bits, ties]).to(torch.int32)
    x = torch.cat([bits.view(torch.float32),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38,
                                 1e-40, -1e-40, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])])
    x = x[~x.isnan()].to(DEVICE)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    round_kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024)
    assert torch.equal(out.view(torch.int16), x.bfloat16().view(torch.int16))
    nan = torch.full((4,), float("nan"), device=DEVICE)
    out = torch.empty(4, dtype=torch.bfloat16, device=DEVICE)
    round_kernel[(1,)](nan, out, 4, BLOCK=4)
    assert out.float().isnan().all()


@pytest.mark.parametrize("low_precision", [True, False])
def test_multi_tensor_step_matches_the_reference(adamw, low_precision):
    """One launch over tensors ragged across blocks (32) and chunks (64): every element is
    updated once, as the reference; bf16 params are the masters rounded to nearest."""
    sizes = [1, 31, 32, 33, 64, 65, 130, 200]
    gen = torch.Generator().manual_seed(1)
    initial = [torch.randn(n, generator=gen) for n in sizes]
    masters = [x.clone().to(DEVICE) for x in initial]
    params = ([x.bfloat16().to(DEVICE) for x in initial] if low_precision else None)
    exp_avgs = [torch.zeros_like(x) for x in masters]
    exp_avg_sqs = [torch.zeros_like(x) for x in masters]
    launch = adamw.MultiTensorAdamW(masters, exp_avgs, exp_avg_sqs, params, chunk=64, block=32)
    ref = Reference(initial)
    for step, (lr, scale) in enumerate([(1e-2, 1.0), (5e-3, 0.37), (2e-3, 1.0)], start=1):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        grads = [g.bfloat16() if low_precision else g for g in grads]
        launch.step([g.to(DEVICE) for g in grads],
                    torch.tensor(scale, dtype=torch.float32, device=DEVICE), lr=lr,
                    weight_decay=0.1, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, step=step)
        for i, g in enumerate(grads):
            ref.step(i, g.float() * torch.tensor(scale, dtype=torch.float32), lr=lr,
                     weight_decay=0.1)
            assert_close(masters[i].cpu(), ref.master[i], f"master {i}, step {step}")
            assert_close(exp_avgs[i].cpu(), ref.m[i], f"exp_avg {i}, step {step}")
            assert_close(exp_avg_sqs[i].cpu(), ref.v[i], f"exp_avg_sq {i}, step {step}")
            if low_precision:
                assert torch.equal(params[i], masters[i].bfloat16()), f"param {i}"


# ----------------------------------------------------------------------------- the optimizer

def model_params(seed=0):
    """bf16 weights across the kernel's 4096-element chunks, an fp32 router-like weight, bf16
    biases (the second group); every group's dtype mix as in the real model."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4100, generator=gen).bfloat16().to(DEVICE)
    small = torch.randn(37, 11, generator=gen).bfloat16().to(DEVICE)
    gate = torch.randn(3, 50, generator=gen).to(DEVICE)
    bias = torch.randn(129, generator=gen).bfloat16().to(DEVICE)
    one = torch.randn(1, generator=gen).bfloat16().to(DEVICE)
    return [torch.nn.Parameter(x) for x in (weight, small, gate, bias, one)]


def build(params, kernel, lr=1e-2):
    groups = [{"params": params[:3], "weight_decay": 0.1},
              {"params": params[3:], "weight_decay": 0.0}]
    return MasterWeightAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.1,
                             kernel=kernel)


# step: (lr, max_norm as a fraction of the norm (None: no clipping), index without a grad)
SCHEDULE = [(1e-2, None, None), (8e-3, 0.5, 1), (6e-3, 1e9, None), (4e-3, 0.25, 4),
            (2e-3, None, None)]


def gradients(params, step, missing):
    gen = torch.Generator().manual_seed(100 + step)
    return [None if i == missing else
            torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)
            for i, p in enumerate(params)]


def run_steps(opt, params, schedule, ref=None):
    for step, (lr, fraction, missing) in schedule:
        grads = gradients(params, step, missing)
        for p, g in zip(params, grads):
            p.grad = g
        for group in opt.param_groups:
            group["lr"] = lr
        scale = None
        if fraction is not None:
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None]))
            opt.clip_at_step(fraction * norm.item(), norm)
            scale = clip_coefficient(fraction * norm.item(), norm).cpu()
        opt.step()
        opt.zero_grad()
        if ref is not None:
            for i, g in enumerate(grads):
                if g is not None:
                    g = g.float().cpu() * (1 if scale is None else scale)
                    ref.step(i, g, lr=lr, weight_decay=0.1 if i < 3 else 0.0)


def test_kernel_steps_match_the_reference():
    params = model_params()
    ref = Reference(params)
    opt = build(params, kernel=True)
    assert opt.kernel is not None
    run_steps(opt, params, list(enumerate(SCHEDULE)), ref)
    masters = [m for ms in opt.masters for m in ms]
    assert masters[2] is params[2]                              # fp32: its own master
    for i, (p, m) in enumerate(zip(params, masters)):
        assert_close(m.cpu(), ref.master[i], f"master {i}")
        state = opt.inner.state[m]
        assert_close(state["exp_avg"].cpu(), ref.m[i], f"exp_avg {i}")
        assert_close(state["exp_avg_sq"].cpu(), ref.v[i], f"exp_avg_sq {i}")
        assert int(state["step"]) == ref.count[i] == (4 if i in (1, 4) else 5)
        assert torch.equal(p, m.bfloat16() if p.dtype == torch.bfloat16 else m), i
    assert all(m.grad is None for m, p in zip(masters, params) if m is not p)   # none made


def test_kernel_and_torch_paths_share_their_state():
    """Same steps (clipping coefficients 1: the torch path clips the bf16 gradients, the kernel
    their fp32 values, which differ below 1) -> state_dicts equal to rounding; the kernel's
    state resumes on the torch path and the torch path's on the kernel, both ways equal to an
    uninterrupted run, step counts per parameter included."""
    schedule = [(s, (lr, None if f is None or f < 1 else f, missing))
                for s, (lr, f, missing) in enumerate(SCHEDULE)]
    params_k, params_t = model_params(), model_params()
    opt_k, opt_t = build(params_k, kernel=True), build(params_t, kernel=False)
    assert opt_t.kernel is None
    run_steps(opt_k, params_k, schedule[:3])
    run_steps(opt_t, params_t, schedule[:3])
    state_k, state_t = opt_k.state_dict(), opt_t.state_dict()
    assert state_k["inner"]["param_groups"] == state_t["inner"]["param_groups"]
    assert state_k["hyperparameters"] == state_t["hyperparameters"]
    inner_k, inner_t = state_k["inner"]["state"], state_t["inner"]["state"]
    assert inner_k.keys() == inner_t.keys()
    for i in inner_t:
        assert inner_k[i].keys() == inner_t[i].keys()
        assert torch.equal(inner_k[i]["step"], inner_t[i]["step"])
        assert inner_k[i]["step"].device == inner_t[i]["step"].device
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(inner_k[i][key], inner_t[i][key], rtol=2e-6, atol=2e-7)
    for a, b in zip(state_k["masters"], state_t["masters"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)

    def resumed(state, params_from, kernel):
        params = model_params()
        with torch.no_grad():
            for p, q in zip(params, params_from):
                p.copy_(q)
        opt = build(params, kernel=kernel)
        opt.load_state_dict(copy.deepcopy(state))
        run_steps(opt, params, schedule[3:])
        return opt, params

    saved_k, saved_t = copy.deepcopy(state_k), copy.deepcopy(state_t)
    snap_k, snap_t = [p.detach().clone() for p in params_k], [p.detach().clone() for p in params_t]
    run_steps(opt_k, params_k, schedule[3:])
    run_steps(opt_t, params_t, schedule[3:])
    on_torch, on_torch_params = resumed(saved_k, snap_k, kernel=False)
    on_kernel, on_kernel_params = resumed(saved_t, snap_t, kernel=True)
    for a, b in zip(on_torch.state_dict()["masters"], opt_k.state_dict()["masters"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    for a, b in zip(on_kernel.state_dict()["masters"], opt_t.state_dict()["masters"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)
    for a, b in zip(on_kernel_params, params_t):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=0)   # bf16 ulp
    assert on_kernel.kernel.counts == [[5, 4, 5], [5, 4]]


def test_kernel_follows_moved_parameters():
    """A parameter whose storage was replaced (p.data = ...) is written at its new address;
    the masters are refreshed from it as after a weights-only load."""
    params = model_params()
    opt = build(params, kernel=True)
    run_steps(opt, params, list(enumerate(SCHEDULE[:1])))
    old = params[0].data
    params[0].data = old.clone() + 1
    opt.refresh_fp32_params()
    run_steps(opt, params, [(1, SCHEDULE[0])])
    master = opt.masters[0][0]
    assert torch.equal(params[0], master.bfloat16())
    assert not torch.equal(old, params[0])
