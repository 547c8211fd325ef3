"""The output layer's cross-entropy (megatron/model/lm_loss.py) and its Triton kernel
(megatron/kernels/cross_entropy.py) against a slow reference written here: a per-row loop in
float64 with an explicit log-sum-exp and the explicit gradient formulas.

The kernel tests run on CUDA, or on CPU under triton's interpreter (test_moe_kernels_interpreted
starts this file in a process with TRITON_INTERPRET=1); the torch-path tests run on plain CPU.
Letters: T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F

from megatron.config import GPTConfig
from megatron.model import GPTModel
from megatron.model import lm_loss
from megatron.model.lm_loss import fused_path, lm_cross_entropy, torch_lm_cross_entropy
from megatron.model.moe.backend import triton_available
from tests.model.triton_kernels import (CUDA, CUDA_OR_INTERPRETER, DEVICE, INTERPRETED,
                                        NEEDS_TRITON, kernel_module)

PLAIN_CPU = pytest.mark.skipif(CUDA or INTERPRETED, reason="the torch path on plain CPU")
# One rounding to bf16 (8 significant bits): relative error <= 2^-8 when rounding to nearest,
# as the GPU does; triton's interpreter truncates fp32 -> bf16 in the kernel (<= 2^-7).
BF16_ULP = 2.0 ** -8
KERNEL_BF16_ROUNDING = 2.0 ** -7 if INTERPRETED else 2.0 ** -8


@pytest.fixture(scope="module")
def kernels():
    return kernel_module("cross_entropy", "cross_entropy_kernel", package="megatron.kernels")


# ---------------------------------------------------------------- the slow reference
def ref_rows(z_TV: torch.Tensor, labels_T: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss [T], softmax - onehot [T, V]) in float64, one row at a time."""
    z_TV = z_TV.double().cpu()
    T, V = z_TV.shape
    loss, grad = torch.empty(T, dtype=torch.float64), torch.empty(T, V, dtype=torch.float64)
    for t in range(T):
        z, y = z_TV[t], int(labels_T[t])
        m = max(z.tolist())
        lse = m + torch.log(sum(torch.exp(z[v] - m) for v in range(V)))
        loss[t] = lse - z[y]
        grad[t] = torch.exp(z - lse)
        grad[t, y] -= 1.0
    return loss, grad


def ref_lm(hidden_TD, weight_VD, labels_T, g_T) -> Dict[str, torch.Tensor]:
    """float64 loss [T], dL/dhidden and dL/dW of sum_t g_t * loss_t, one row at a time, for
    the logits F.linear(hidden, weight) in the params dtype (the GEMM both paths run, as the
    old code did: what follows it is under test). Also the magnitudes |g| |p - y| @ |W| and
    |p - y|^T @ |g h| that bound, element by element, the error of a bf16 rounding of either
    GEMM's operands or results."""
    z_TV = F.linear(hidden_TD.detach(), weight_VD.detach())
    h, w, g = (x.detach().double().cpu() for x in (hidden_TD, weight_VD, g_T))
    loss, p_minus_y = ref_rows(z_TV, labels_T)
    dz_TV = g[:, None] * p_minus_y
    return {"loss": loss, "hidden": dz_TV @ w, "weight": dz_TV.T @ h,
            "hidden_scale": dz_TV.abs() @ w.abs(),
            "weight_scale": dz_TV.abs().T @ h.abs()}


def make_inputs(T: int, D: int, V: int, dtype=torch.float32, seed: int = 0):
    """hidden, weight (leaves needing grad), labels with 0 and V-1 among them, and a
    non-uniform upstream gradient of both signs."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / D ** 0.5 * 3
    labels = torch.randint(0, V, (T,), generator=gen)
    labels[0], labels[-1] = 0, V - 1
    g = torch.randn(T, generator=gen)
    hidden, weight = (x.to(DEVICE, dtype).requires_grad_() for x in (hidden, weight))
    return hidden, weight, labels.to(DEVICE), g.to(DEVICE)


def loss_and_grads(fn, hidden, weight, labels, g):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    (loss * g).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


# ---------------------------------------------------------------- the kernel alone
@pytest.mark.parametrize("T,V,block", [(5, 200, 64), (3, 64, 64), (7, 1000, 128), (4, 1, 64),
                                       (6, 37, 4096)])
@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_kernel_loss_and_in_place_gradient(kernels, T, V, block):
    """Rows of several pieces, the last one ragged (200 = 3 * 64 + 8), one exact piece, V = 1
    and V below the block; labels 0 and V - 1 included."""
    gen = torch.Generator().manual_seed(T * V)
    z = (4 * torch.randn(T, V, generator=gen)).to(DEVICE)
    labels = torch.randint(0, V, (T,), generator=gen).to(DEVICE)
    labels[0], labels[-1] = 0, V - 1
    ref_loss, ref_grad = ref_rows(z, labels)

    logits = z.clone()
    loss = kernels.cross_entropy(logits, labels, write_grad=False, block=block)
    assert loss.dtype == torch.float32 and torch.equal(logits, z)       # untouched
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)

    pointer = logits.data_ptr()
    loss_g = kernels.cross_entropy(logits, labels, write_grad=True, block=block)
    assert torch.equal(loss_g, loss)
    assert logits.data_ptr() == pointer and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double().cpu(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", ["rising", "falling", "huge"])
@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_kernel_online_maximum(kernels, pattern):
    """The running maximum grows in every piece (rising), is set by the first (falling), or the
    logits are so large that exp without the maximum would overflow fp32 and that
    m + log(s) would lose ~1e-3 to fp32 rounding (huge: the loss and G are formed from z - m)."""
    V = 300
    ramp = torch.linspace(-20, 20, V)
    z = {"rising": ramp, "falling": -ramp, "huge": 1e4 + ramp}[pattern]
    z = torch.stack([z, z.flip(0) + 3]).to(DEVICE)
    labels = torch.tensor([V - 1, 5], device=DEVICE)
    ref_loss, ref_grad = ref_rows(z, labels)
    logits = z.clone()
    loss = kernels.cross_entropy(logits, labels, write_grad=True, block=64)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double().cpu(), ref_grad, rtol=1e-5, atol=1e-6)


@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_kernel_out_of_range_label_gives_nan_and_reads_nothing(kernels):
    """Labels -1 and V: NaN loss and a plain softmax row; the other rows are unaffected."""
    V = 100
    z = torch.randn(4, V, device=DEVICE)
    labels = torch.tensor([-1, 3, V, 7], device=DEVICE)
    ref_loss, ref_grad = ref_rows(z, labels.clamp(0, V - 1))
    logits = z.clone()
    loss = kernels.cross_entropy(logits, labels, write_grad=True, block=32)
    assert torch.isnan(loss[[0, 2]]).all()
    torch.testing.assert_close(loss[[1, 3]].double().cpu(), ref_loss[[1, 3]])
    softmax = torch.softmax(z.double(), -1).cpu()
    torch.testing.assert_close(logits[[0, 2]].double().cpu(), softmax[[0, 2]], atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(logits[[1, 3]].double().cpu(), ref_grad[[1, 3]], atol=1e-6,
                               rtol=1e-5)


@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_kernel_bf16_logits(kernels):
    """bf16 logits are read as they are and G is the fp32 formula rounded once to bf16
    (within one bf16 rounding of the float64 value; see KERNEL_BF16_ROUNDING)."""
    gen = torch.Generator().manual_seed(3)
    z = (4 * torch.randn(9, 333, generator=gen)).to(DEVICE, torch.bfloat16)
    labels = torch.randint(0, 333, (9,), generator=gen).to(DEVICE)
    ref_loss, ref_grad = ref_rows(z, labels)
    logits = z.clone()
    loss = kernels.cross_entropy(logits, labels, write_grad=True, block=64)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double().cpu(), ref_grad, rtol=KERNEL_BF16_ROUNDING,
                               atol=1e-30)


# ---------------------------------------------------------------- lm_cross_entropy, fused
@pytest.mark.parametrize("T,D,V,block", [(37, 16, 300, 64), (64, 8, 128, 32), (9, 24, 97, None),
                                         (5, 12, 1, None)])
@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_fused_fp32_matches_reference(kernels, monkeypatch, T, D, V, block):
    """Loss and both gradients, fp32, with a non-uniform upstream gradient of both signs;
    ragged rows (300 = 4 * 64 + 44), exact pieces, one piece wider than the row, V = 1."""
    if block:
        monkeypatch.setattr(kernels, "BLOCK", block)
    hidden, weight, labels, g = make_inputs(T, D, V)
    assert fused_path(hidden, weight)
    loss, dh, dw = loss_and_grads(lm_cross_entropy, hidden, weight, labels, g)
    ref = ref_lm(hidden, weight, labels, g)
    assert loss.dtype == torch.float32 and loss.shape == (T,)
    torch.testing.assert_close(loss.double().cpu(), ref["loss"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double().cpu(), ref["hidden"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double().cpu(), ref["weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "torch"])
def test_bf16_within_the_rounding_bounds(monkeypatch, path):
    """bf16 params, both paths. Given the logits, the loss is fp32-exact. Each gradient is a
    GEMM of bf16 roundings: the torch path rounds g (p - y) and the GEMM result (2 roundings),
    the fused path p - y, the GEMM result and its scaling by g (dL/dhidden) or the operand
    g * hidden (dL/dW): 3 roundings. Each is at most eps relative, so element by element
    |error| <= (eps_G + 2 eps) * (|g| |p - y| @ |W|) (resp. |p - y|^T @ |g h|), with eps = 2^-8
    and eps_G the kernel's rounding of G (KERNEL_BF16_ROUNDING); fp32 accumulation and
    second-order terms stay far below the 1e-4 of slack (on CUDA with cuBLAS's bf16 split-K
    reductions off: those would round the GEMMs' partial sums, a rounding of cuBLAS's, not
    of the paths under test)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction",
                        False)
    if path == "fused":
        if not triton_available() or not (CUDA or INTERPRETED):
            pytest.skip("the fused path runs on CUDA or under the interpreter")
        from megatron.kernels import cross_entropy as kernels
        monkeypatch.setattr(kernels, "BLOCK", 64)
        fn, eps_g = lm_cross_entropy, KERNEL_BF16_ROUNDING
    else:
        fn, eps_g = torch_lm_cross_entropy, BF16_ULP
    hidden, weight, labels, g = make_inputs(48, 16, 250, torch.bfloat16, seed=1)
    assert path == "torch" or fused_path(hidden, weight)
    loss, dh, dw = loss_and_grads(fn, hidden, weight, labels, g)
    ref = ref_lm(hidden, weight, labels, g)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double().cpu(), ref["loss"], rtol=1e-5, atol=1e-5)
    for name, got in (("hidden", dh), ("weight", dw)):
        error = (got.double().cpu() - ref[name]).abs()
        bound = (eps_g + 2 * BF16_ULP + 1e-4) * ref[name + "_scale"]
        assert (error <= bound).all(), (name, (error / bound).max().item())
        assert (error > 0).any()                    # bf16 did round: the check has teeth


@NEEDS_TRITON
@CUDA_OR_INTERPRETER
def test_fused_without_gradients_gives_the_same_loss(kernels, monkeypatch):
    """Evaluation (no_grad) and inputs that need no gradient run the kernel without writing G:
    the same loss bits as in training, no graph, no gradient."""
    monkeypatch.setattr(kernels, "BLOCK", 64)
    hidden, weight, labels, _ = make_inputs(20, 8, 150)
    train_loss = lm_cross_entropy(hidden, weight, labels)
    assert train_loss.requires_grad
    with torch.no_grad():
        eval_loss = lm_cross_entropy(hidden, weight, labels)
    detached = lm_cross_entropy(hidden.detach(), weight.detach(), labels)
    for loss in (eval_loss, detached):
        assert not loss.requires_grad and loss.grad_fn is None
        assert torch.equal(loss, train_loss.detach())
    assert hidden.grad is None and weight.grad is None


def test_path_choice(monkeypatch):
    """Fused on CUDA or under the interpreter, for bf16 and fp32, when triton is installed; the
    torch path for fp16, without triton, and on plain CPU."""
    x32 = torch.zeros(2, 3)
    monkeypatch.setattr(lm_loss, "_HAS_TRITON", True)
    monkeypatch.setattr(lm_loss, "_INTERPRETED", False)
    assert not fused_path(x32, x32)                 # plain CPU
    monkeypatch.setattr(lm_loss, "_INTERPRETED", True)
    assert fused_path(x32, x32) and fused_path(x32.bfloat16(), x32.bfloat16())
    assert not fused_path(x32.half(), x32.half())
    monkeypatch.setattr(lm_loss, "_HAS_TRITON", False)
    assert not fused_path(x32, x32)


# ---------------------------------------------------------------- the torch path and GPTModel
@PLAIN_CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_cpu_runs_the_old_math(dtype):
    """On CPU without the interpreter the loss and gradients are those of F.cross_entropy on
    the fp32 copy of the logits, bit for bit (the old GPTModel code)."""
    hidden, weight, labels, g = make_inputs(13, 8, 70, dtype)
    assert not fused_path(hidden, weight)
    got = loss_and_grads(lm_cross_entropy, hidden, weight, labels, g)

    def old(h, w, y):
        return F.cross_entropy(F.linear(h, w).float(), y, reduction="none")

    want = loss_and_grads(old, hidden, weight, labels, g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_model_loss_is_cross_entropy_of_its_logits(dtype):
    """GPTModel's per-token loss and its gradients against F.cross_entropy of the model's own
    logits: equal bits on plain CPU (the torch path, the old code). On the fused path the loss
    within fp32 rounding, and in fp32 the gradients too; bf16 gradients are left to
    test_bf16_within_the_rounding_bounds (the layers' bf16 backward re-rounds a one-ulp change
    of dL/dhidden at every op, so no tight bound holds for the parameters here)."""
    config = GPTConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                       padded_vocab_size=90, max_position_embeddings=8, ffn_hidden_size=24,
                       hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.2)
    torch.manual_seed(0)
    model = GPTModel(config).to(DEVICE, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90, (3, 8), generator=gen).to(DEVICE)
    labels = torch.randint(0, 90, (3, 8), generator=gen).to(DEVICE)
    labels[0, 0], labels[-1, -1] = 0, 89
    w = torch.rand(3, 8, generator=gen).to(DEVICE)

    def run(with_labels: bool):
        model.zero_grad(set_to_none=True)
        if with_labels:
            loss = model(ids, labels=labels).loss
        else:
            logits = model(ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                   reduction="none").view_as(labels)
        (loss * w).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (loss, grads), (ref_loss, ref_grads) = run(True), run(False)
    assert loss.shape == labels.shape and loss.dtype == torch.float32
    if not (CUDA or INTERPRETED):
        assert torch.equal(loss, ref_loss)
        for name, ref in ref_grads.items():
            assert torch.equal(grads[name], ref), name
        return
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5, msg=name)


@PLAIN_CPU
def test_torch_path_compiles_without_graph_break():
    """The path choice (module constants, tensor properties) traces without a break."""
    hidden, weight, labels, g = make_inputs(6, 8, 40)
    compiled = torch.compile(lm_cross_entropy, backend="aot_eager", fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, labels, g)
    want = loss_and_grads(lm_cross_entropy, hidden, weight, labels, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the CUDA build, without a GPU
SM90_CASES = [(dtype, write_grad) for dtype in ("*bf16", "*fp32") for write_grad in (False, True)]
COMPILE_TESTS = pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, not interpreted")


@NEEDS_TRITON
@COMPILE_TESTS
@pytest.mark.parametrize("dtype,write_grad", SM90_CASES)
def test_kernel_compiles_for_sm90(dtype, write_grad):
    """The compiler is stricter than the interpreter (loop-carried types, constexprs)."""
    from megatron.kernels import cross_entropy as k
    from tests.model.test_moe_kernels_compile import compile_for_sm90

    compile_for_sm90(k.cross_entropy_kernel,
                     dict(logits_ptr=dtype, labels_ptr="*i64", loss_ptr="*fp32"),
                     dict(V="i32"), dict(WRITE_GRAD=write_grad, BLOCK=k.BLOCK))


@NEEDS_TRITON
@COMPILE_TESTS
def test_compile_sees_the_loss_and_in_place_gradient_written():
    """torch.compile's analysis of the kernel: loss written, the logits too only with
    WRITE_GRAD (functionalisation must then treat them as mutated, not as read-only)."""
    from megatron.kernels import cross_entropy as k
    from tests.model.test_moe_kernels_compile import accessed_for_sm90

    pointers = dict(logits_ptr="*bf16", labels_ptr="*i64", loss_ptr="*fp32")
    for write_grad, written in ((False, {"loss_ptr"}), (True, {"loss_ptr", "logits_ptr"})):
        assert accessed_for_sm90(k.cross_entropy_kernel, pointers, dict(V="i32"),
                                 dict(WRITE_GRAD=write_grad, BLOCK=k.BLOCK)) == written


@NEEDS_TRITON
@PLAIN_CPU
def test_fused_path_is_one_graph_without_a_copy_of_the_logits(monkeypatch):
    """What torch.compile makes of the fused path, traced here without a GPU (the kernel is
    never run: the compiled graphs are captured, and replaced by stubs returning zeros).
    Dynamo keeps the autograd Function in the graph (fullgraph: no break); AOT autograd's
    forward is the logits GEMM, then the kernel, whose G output is what backward saves; after
    inductor's re-inplacing pass the kernel writes into the GEMM's output (no [T, V] clone);
    backward is two GEMMs and no kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    aot = pytest.importorskip("torch._functorch.aot_autograd")
    reinplace = pytest.importorskip("torch._inductor.fx_passes.reinplace")

    class Sm90:     # torch's kernel analysis asks the active driver for its target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    graphs = {}

    def stub(name):
        def compiler(gm, inputs):
            graphs[name] = gm
            outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            values = [None if o is None else o.meta["val"] for o in outputs]
            return aot.make_boxed_func(lambda *args: [
                None if v is None else torch.zeros(v.shape, dtype=v.dtype) for v in values])
        return compiler

    def backend(gm, example_inputs):
        return aot.aot_module_simplified(gm, example_inputs, fw_compiler=stub("forward"),
                                         bw_compiler=stub("backward"))

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)  # CPU torch: False
    monkeypatch.setattr(lm_loss, "_INTERPRETED", True)                    # take the fused path
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(Sm90())
    torch._dynamo.reset()
    try:
        hidden, weight, labels, g = make_inputs(6, 8, 40)
        compiled = torch.compile(lm_cross_entropy, backend=backend, fullgraph=True)
        (compiled(hidden, weight, labels) * g).sum().backward()
        check_fused_graphs(graphs["forward"], graphs["backward"], reinplace)
    finally:
        driver._active = previous
        torch._dynamo.reset()         # also forgets the kernels the graphs refer to


def check_fused_graphs(forward, backward, reinplace) -> None:
    def calls(gm, name):
        return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]

    (kernel,) = calls(forward, "triton_kernel_wrapper_functional")
    (mm,) = calls(forward, "aten.mm")
    assert kernel.kwargs["kwargs"]["logits_ptr"] is mm
    saved = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    assert any(n.op == "call_function" and n.args[0] is kernel and n.args[1] == "logits_ptr"
               for n in saved if n is not None)                    # G, not the logits
    reinplace.reinplace_inplaceable_ops_core(forward.graph)
    assert kernel.kwargs["tensors_to_clone"] == []
    assert len(calls(backward, "aten.mm")) == 2
    assert not calls(backward, "triton_kernel")


@pytest.mark.skipif(not CUDA, reason="inductor with the kernel needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_under_inductor_equals_eager(dtype):
    """The same kernel and GEMMs; inductor fuses the scaling by g with the casts (fp32 math
    either way), so at most one bf16 rounding apart."""
    hidden, weight, labels, g = make_inputs(300, 64, 5000, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(lm_cross_entropy, fullgraph=True)
    got = loss_and_grads(compiled, hidden, weight, labels, g)
    want = loss_and_grads(lm_cross_entropy, hidden, weight, labels, g)
    rtol = 1e-5 if dtype == torch.float32 else 2 * BF16_ULP
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-5)
