"""Every Triton kernel of the MoE layer compiles for an H100/H200 (sm_90), without a GPU, and
torch.compile's analysis of it sees exactly its outputs as written.

The interpreter (test_moe_kernels_interpreted.py) checks what the kernels compute but not that
they compile: the compiler is stricter (constexpr globals, consistent types across branches),
and such errors otherwise show up only on a GPU. Each kernel is compiled here to sm_90 code
with bf16 tensors and the flag combinations the layer uses.
"""

import pytest

from megatron.model.moe.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

BF16, I64, I32, F32, U8 = "*bf16", "*i64", "*i32", "*fp32", "*u8"


def compile_for_sm90(fn, pointers, scalars, constexprs):
    """triton.compile of `fn` for sm_90; arguments in the kernel's order."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        signature[name] = (pointers.get(name) or scalars.get(name)
                           or ("constexpr" if name in constexprs else None))
        assert signature[name] is not None, f"{fn.__name__}: no type for {name}"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert "ptx" in compiled.asm and compiled.asm["ptx"]


def row_kernel_cases():
    from megatron.model.moe.kernels import rows as k
    from megatron.model.moe.kernels.gelu import ACT_CODES
    for bias in (False, True):
        for backward in (False, True):
            for act in ACT_CODES.values():            # every GeLU form
                yield k.gelu_kernel, dict(grad_ptr=BF16, h_ptr=BF16, bias_ptr=BF16,
                                           offsets_ptr=I32, out_ptr=BF16), \
                    dict(num_experts="i32"), dict(F=384, HAS_BIAS=bias, BACKWARD=backward,
                                                  ACT=act, ROWS=16, COLS=128, BLOCK_E=64)
        yield k.combine_backward_kernel, dict(
            grad_ptr=BF16, y_ptr=BF16, weight_ptr=F32, bias_ptr=BF16, token_ptr=I64,
            offsets_ptr=I32, grad_y_ptr=BF16, grad_w_ptr=F32, partial_ptr=F32), {}, \
            dict(D=768, HAS_BIAS=bias, BIAS_GRAD=bias, ROWS=4, BLOCK=1024)
        for weight in (False, True):
            yield k.bag_sum_kernel, dict(src_ptr=BF16, rows_ptr=I64, starts_ptr=I64,
                                          weight_ptr=F32, bias_ptr=BF16, offsets_ptr=I32,
                                          out_ptr=BF16), \
                dict(num_tokens="i32", num_experts="i32"), \
                dict(D=768, HAS_WEIGHT=weight, HAS_BIAS=bias, BLOCK=1024, BLOCK_E=64)
    yield k.gather_rows_kernel, dict(x_ptr=BF16, token_ptr=I64, offsets_ptr=I32,
                                      out_ptr=BF16), \
        dict(num_experts="i32", x_stride="i32"), dict(D=768, ROWS=4, BLOCK=1024)
    yield k.segment_sum_kernel, dict(src_ptr=BF16, offsets_ptr=I32, out_ptr=F32), {}, \
        dict(F=768, ROWS=16, BLOCK=64)


def router_kernel_cases():
    from megatron.model.moe.kernels import router_gemm as r
    tiles = dict(D=768, SPLIT=True, BT=64, BE=64, BD=64)
    sizes = dict(T="i32", E="i32")
    yield r.logits_kernel, dict(x_ptr=BF16, g_ptr=F32, out_ptr=F32), sizes, tiles
    yield r.grad_x_kernel, dict(g_ptr=F32, w_ptr=F32, out_ptr=BF16), sizes, tiles
    yield r.grad_gate_kernel, dict(g_ptr=F32, x_ptr=BF16, out_ptr=F32), \
        dict(sizes, rows_per_chunk="i32"), tiles


def capacity_kernel_cases():
    from megatron.model.moe.kernels import capacity as c
    sizes = dict(T="i32", K="i32")
    yield c.slot_grid_kernel, dict(experts_ptr=I64, wanted_ptr=U8, grid_ptr=I32,
                                    counts_ptr=I32), sizes, dict(KB=128, BLOCK_T=64, BLOCK_K=64)
    yield c.cutoff_kernel, dict(grid_ptr=I32, probs_ptr=F32, counts_ptr=I32, cut_ptr=I32), \
        dict(sizes, capacity="i32"), dict(KB=128, BLOCK_T=2048)
    yield c.rows_kernel, dict(grid_ptr=I32, probs_ptr=F32, cut_ptr=I32, kept_ptr=U8,
                               rows_ptr=I32, counts_ptr=I64), \
        dict(sizes, num_experts="i32"), dict(BLOCK_T=2048, BLOCK_E=64)
    yield c.token_bags_kernel, dict(kept_ptr=U8, rows_ptr=I32, bag_start_ptr=I64,
                                     pair_ptr=I64, bag_rows_ptr=I64), sizes, \
        dict(BLOCK_T=64, BLOCK_K=64)
    from megatron.model.moe.kernels import threshold as th
    for slots in (64, 3):                       # every expert a slot, or a cap
        yield th.threshold_slots_kernel, dict(probs_ptr=F32, experts_ptr=I64, wanted_ptr=U8), \
            dict(T="i32", threshold="fp32"), dict(E=64, EB=64, K=slots, BLOCK_T=16)


def all_cases():
    return list(row_kernel_cases()) + list(router_kernel_cases()) + list(capacity_kernel_cases())


def test_row_kernels_compile_for_sm90():
    for case in row_kernel_cases():
        compile_for_sm90(*case)


def test_router_gemm_kernels_compile_for_sm90():
    for case in router_kernel_cases():
        compile_for_sm90(*case)


def test_capacity_kernels_compile_for_sm90():
    for case in capacity_kernel_cases():
        compile_for_sm90(*case)


# ----------------------------------------------------------------------------- torch.compile

# The pointers each kernel stores to; every other kernel stores to out_ptr only.
WRITTEN = {"combine_backward_kernel": {"grad_y_ptr", "grad_w_ptr"},
           "slot_grid_kernel": {"grid_ptr", "counts_ptr"}, "cutoff_kernel": {"cut_ptr"},
           "rows_kernel": {"kept_ptr", "rows_ptr", "counts_ptr"},
           "token_bags_kernel": {"pair_ptr", "bag_rows_ptr"},
           "threshold_slots_kernel": {"experts_ptr", "wanted_ptr"}}


def accessed_for_sm90(fn, pointers, scalars, constexprs):
    """Pointer names torch.compile's analysis of a user Triton kernel believes are written."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")

    class _Sm90:   # the analysis asks the active driver for its target; there is no GPU here
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    dtypes = {BF16: torch.bfloat16, I64: torch.int64, I32: torch.int32, F32: torch.float32,
              U8: torch.uint8}
    kwargs = {name: (torch.zeros(4, dtype=dtypes[pointers[name]]) if name in pointers
                     else 7 if name in scalars else constexprs[name]) for name in fn.arg_names}
    driver = triton.runtime.driver
    previous = driver._active      # None until first used; reset_active() would build one
    driver.set_active(_Sm90())
    try:
        if hasattr(wrap, "identify_accessed_tensors"):          # torch >= 2.12
            accesses = wrap.identify_accessed_tensors(fn, kwargs, {})
            return {dep.name for dep in accesses.read_writes.writes}
        return set(wrap.identify_mutated_tensors(fn, kwargs, {}))
    finally:
        driver._active = previous


def test_compile_sees_only_outputs_written():
    """torch.compile must see exactly the output pointers as written. A pointer wrongly seen as
    written (e.g. a store address computed by a helper that also took the bias pointer) makes
    the compiled layer fail in AOT autograd ("leaf Variable ... in-place operation") or
    clone and copy back inputs on every call."""
    for fn, pointers, scalars, constexprs in all_cases():
        written = accessed_for_sm90(fn, pointers, scalars, constexprs)
        expected = set(WRITTEN.get(fn.__name__, {"out_ptr"}))
        if constexprs.get("BIAS_GRAD"):         # the per-slice bias gradient sums
            expected.add("partial_ptr")
        assert written == expected, (fn.__name__, constexprs, written)
