"""The master-weight AdamW step in one pass per element, over many tensors per launch.

MasterWeightAdamW (megatron/mixed_precision.py) keeps an fp32 master, exp_avg (m) and
exp_avg_sq (v) for every bf16 parameter. Done with torch ops, the clipping and the step move
44 bytes per parameter: clip the bf16 grad in place (2 r + 2 w), copy it into the master's fp32
.grad (2 r + 4 w), torch's fused AdamW on the masters (grad 4 r; master, m and v 12 r + 12 w),
copy the masters into the bf16 params (4 r + 2 w). This kernel reads the bf16 grad (2), master,
m and v (12) and writes master, m, v (12) and the bf16 param (2): 28 bytes, with the clipping
coefficient applied to the grad in registers. (The global norm before it reads the grads once
more, 2 bytes, on both paths: 46 -> 30 bytes per parameter in all.)

One launch covers a list of tensors: the addresses of each tensor's grad, master, m, v (and bf16
param) are int64 tables on the device, and a block table gives each program its tensor and the
first element of its chunk (`MultiTensorAdamW` builds them once; the grad table is rewritten
only when a grad's address changes). Variants (constexpr): a bf16 grad and param with an fp32
master (LOW_PRECISION), or an fp32 grad on an fp32 parameter that is its own master (the MoE
router's gate_weight). A chunk inside its tensor runs unmasked, so that when every address is
16-byte aligned (ALIGNED: separate allocations are) its accesses are 128-bit vectors; a mask
against a tensor size of unknown divisibility would split them into single elements. Only each
tensor's last chunk is masked.

Numerics follow torch.optim.AdamW's foreach path (torch 2.13 `_multi_tensor_adam` with
decoupled weight decay), operation by operation, in fp32:
    master *= 1 - lr wd
    m = lerp(m, g, 1 - b1)                  (ATen's lerp: two forms, split at weight 0.5)
    v = v b2 + ((1 - b2) g) g
    master += (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)      bc_i = 1 - b_i ** step
with IEEE division and square root (div_rn, sqrt_rn) and the bf16 param rounded to nearest even
with integer operations (the same bits on a GPU and under triton's interpreter, whose fp32 ->
bf16 cast truncates). Compiled, triton may contract a multiply and an add into one FMA (as
ATen's vectorised CPU kernels do too): the result agrees with torch's to rounding, not bit for
bit (torch's fused CUDA AdamW, which this replaces, orders its operations differently again).
The hyperparameters and bias corrections are host floats computed in double, passed as fp32
kernel scalars (floats are not specialised: a new lr each step does not recompile); the
clipping coefficient is a device fp32 scalar (no host sync).

On CPU the kernel runs only under triton's interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

# Launch shape, tuned on the H200 (benchmarks/HISTORY.md): 4 elements per thread per vector
# operation (BLOCK / (32 NUM_WARPS)); 8 per thread ran at 2.9 TB/s instead of 4.1.
BLOCK = 512     # elements per vector operation of a program
CHUNK = 2048    # elements per program (one row of the block table)
NUM_WARPS = 4


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, as torch's cast (NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw_block(offs, mask, grad_p, master_p, m_p, v_p, param_p, scale, decay, weight1, beta2,
                 weight2, eps, neg_step_size, bc2_sqrt, LOW_PRECISION: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The update of the elements `offs` (mask None: all of them)."""
    g = tl.load(grad_p + offs, mask=mask).to(tl.float32) * scale
    master = tl.load(master_p + offs, mask=mask)
    m = tl.load(m_p + offs, mask=mask)
    v = tl.load(v_p + offs, mask=mask)
    master = master * decay
    m = tl.where(weight1 < 0.5, m + weight1 * (g - m), g - (g - m) * (1.0 - weight1))
    v = v * beta2 + (weight2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), tl.full((BLOCK,), bc2_sqrt, tl.float32)) + eps
    master = master + tl.div_rn(neg_step_size * m, denom)
    tl.store(master_p + offs, master, mask=mask)
    tl.store(m_p + offs, m, mask=mask)
    tl.store(v_p + offs, v, mask=mask)
    if LOW_PRECISION:
        tl.store(param_p + offs, _round_to_bf16(master), mask=mask)


@triton.jit
def adamw_kernel(blocks_ptr, numels_ptr, grads_ptr, masters_ptr, exp_avgs_ptr, exp_avg_sqs_ptr,
                 params_ptr, scale_ptr, decay, weight1, beta2, weight2, eps, neg_step_size,
                 bc2_sqrt, LOW_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk of one tensor: blocks_ptr[pid] = (tensor index, first element)."""
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    numel = tl.load(numels_ptr + t)
    master_p = tl.load(masters_ptr + t).to(tl.pointer_type(tl.float32))
    m_p = tl.load(exp_avgs_ptr + t).to(tl.pointer_type(tl.float32))
    v_p = tl.load(exp_avg_sqs_ptr + t).to(tl.pointer_type(tl.float32))
    if LOW_PRECISION:
        grad_p = tl.load(grads_ptr + t).to(tl.pointer_type(tl.bfloat16))
        param_p = tl.load(params_ptr + t).to(tl.pointer_type(tl.bfloat16))
    else:
        grad_p = tl.load(grads_ptr + t).to(tl.pointer_type(tl.float32))
        param_p = master_p                          # not written
    if ALIGNED:     # every address 16-byte aligned, chunks start at multiples of 16: vector
        start = tl.multiple_of(start, 16)           # loads and stores (128 bits per thread)
        master_p = tl.multiple_of(master_p, 16)
        m_p = tl.multiple_of(m_p, 16)
        v_p = tl.multiple_of(v_p, 16)
        grad_p = tl.multiple_of(grad_p, 16)
        param_p = tl.multiple_of(param_p, 16)
    scale = tl.load(scale_ptr)
    # A whole chunk needs no mask: unmasked accesses can be vectors (a mask against a numel
    # of unknown divisibility would split them into single elements).
    if start + CHUNK <= numel:
        for i in tl.static_range(0, CHUNK, BLOCK):
            _adamw_block(start + i + tl.arange(0, BLOCK), None, grad_p, master_p, m_p, v_p,
                         param_p, scale, decay, weight1, beta2, weight2, eps, neg_step_size,
                         bc2_sqrt, LOW_PRECISION, BLOCK)
    else:
        for i in tl.static_range(0, CHUNK, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            _adamw_block(offs, offs < numel, grad_p, master_p, m_p, v_p, param_p, scale, decay,
                         weight1, beta2, weight2, eps, neg_step_size, bc2_sqrt, LOW_PRECISION,
                         BLOCK)


def _addresses(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 device table of the tensors' data pointers (a pageable non-blocking copy: staged
    at once, no device sync)."""
    return torch.tensor([x.data_ptr() for x in tensors], dtype=torch.int64).to(
        device, non_blocking=True)


def _aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor starts at a multiple of 16 bytes (separate allocations do; a view
    into a flat buffer may not): the kernel then loads 128 bits per thread."""
    return all(x.data_ptr() % 16 == 0 for x in tensors)


class MultiTensorAdamW:
    """The device tables of one list of tensors stepped together (same step count, same
    hyperparameters, one variant): masters, their exp_avg / exp_avg_sq, and the bf16 params
    (None: every master is its own fp32 parameter). Build once; the tensors must not move."""

    def __init__(self, masters: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                 exp_avg_sqs: List[torch.Tensor], params: Optional[List[torch.Tensor]],
                 chunk: int = CHUNK, block: int = BLOCK):
        assert chunk % block == 0
        low = params is not None
        for i, master in enumerate(masters):
            group = [master, exp_avgs[i], exp_avg_sqs[i]] + ([params[i]] if low else [])
            assert all(x.is_contiguous() and x.numel() == master.numel() for x in group)
            assert master.dtype == exp_avgs[i].dtype == exp_avg_sqs[i].dtype == torch.float32
            assert not low or params[i].dtype == torch.bfloat16
        device = masters[0].device
        self.device, self.low_precision, self.chunk, self.block = device, low, chunk, block
        self.numels = [m.numel() for m in masters]
        rows = [(t, start) for t, n in enumerate(self.numels) for start in range(0, n, chunk)]
        self.num_programs = len(rows)
        self.blocks = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)
        self.numel_table = torch.tensor(self.numels, dtype=torch.int64).to(device)
        self.masters = _addresses(masters, device)
        self.exp_avgs = _addresses(exp_avgs, device)
        self.exp_avg_sqs = _addresses(exp_avg_sqs, device)
        self.params = _addresses(params, device) if low else self.masters   # unused if not low
        self.aligned = chunk % 16 == 0 and _aligned(masters + exp_avgs + exp_avg_sqs +
                                                     (params if low else []))
        self._grad_pointers: List[int] = []
        self._grads, self._grads_aligned = self.masters, True

    def _grad_table(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The grads' address table, rewritten when an address changed (grads set to None by
        zero_grad are usually reallocated at the same addresses by the caching allocator)."""
        pointers = [g.data_ptr() for g in grads]
        if pointers != self._grad_pointers:
            want = torch.bfloat16 if self.low_precision else torch.float32
            for g, n in zip(grads, self.numels):
                assert g.dtype == want and g.is_contiguous() and g.numel() == n
            self._grads = torch.tensor(pointers, dtype=torch.int64).to(self.device,
                                                                      non_blocking=True)
            self._grad_pointers = pointers
            self._grads_aligned = _aligned(grads)
        return self._grads

    def step(self, grads: Sequence[torch.Tensor], clip_scale: torch.Tensor, *, lr: float,
             weight_decay: float, beta1: float, beta2: float, eps: float, step: int) -> None:
        """One AdamW step of every tensor with gradients `grads` multiplied by the device fp32
        scalar `clip_scale`; `step` is the step number after this update (1 at the first)."""
        if self.num_programs == 0:
            return
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        adamw_kernel[(self.num_programs,)](
            self.blocks, self.numel_table, self._grad_table(grads), self.masters, self.exp_avgs,
            self.exp_avg_sqs, self.params, clip_scale,
            float(1 - lr * weight_decay), float(1 - beta1), float(beta2), float(1 - beta2),
            float(eps), float((lr / bc1) * -1), float(bc2 ** 0.5),
            LOW_PRECISION=self.low_precision, ALIGNED=self.aligned and self._grads_aligned,
            CHUNK=self.chunk, BLOCK=self.block, num_warps=NUM_WARPS)
