"""Row-wise cross-entropy over a language model's logits, and its gradient written in place.

Shapes: the letters of megatron/model/__init__.py (T tokens, V padded vocabulary).

One program per token row loops over the vocabulary in BLOCK-wide pieces:
1. the row's maximum m and s = sum exp(z - m) in fp32 in one pass (an online maximum: the
   running sum is rescaled whenever the maximum grows), then
   loss = logsumexp(z) - z[label] = log(s) - (z[label] - m) (fp32);
2. with WRITE_GRAD, a second pass over the same row overwrites the logits with
   G = softmax(z) - onehot(label) = exp((z - m) - log(s)) - onehot(label), rounded to the
   logits' dtype (to nearest even on the GPU; triton's interpreter truncates).
The row is read twice and written once (the second read mostly from L2); nothing of size
[T, V] besides the logits themselves is allocated, and nothing is saved in fp32. The upstream
gradient of the loss is not applied here: megatron/model/lm_loss.py scales the [T, D] GEMM
operands by it, so G does not depend on it (and the log-sum-exp need not be returned: backward
needs only G).

Logits are read in their own dtype (bf16 on CUDA in bf16 runs, fp32 for fp32 models and under
triton's interpreter) and every sum, exp and log is fp32: the same numerics as
F.cross_entropy(logits.float()). Rows are indexed with int64 offsets (T * V passes 2^31 at
T = 42,691 for V = 50,304). A label outside [0, V) reads nothing: its loss is NaN (so the bad
batch shows in the logged loss; torch's CUDA kernel raises a device-side assert instead) and
its G row is the plain softmax. CPU inputs are validated before the model runs
(gpt_model.validate_inputs). Needs triton; on CPU the kernel runs only under triton's
interpreter (TRITON_INTERPRET=1, the tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def cross_entropy_kernel(logits_ptr, labels_ptr, loss_ptr, V, WRITE_GRAD: tl.constexpr,
                         BLOCK: tl.constexpr):
    """loss[t] = logsumexp(z_t) - z_t[label_t] for z_t = logits[t, :V]; with WRITE_GRAD,
    logits[t] = softmax(z_t) - onehot(label_t) in place."""
    row = tl.program_id(0)
    row_start = tl.cast(row, tl.int64) * V          # int64: T * V may pass 2^31
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = (label >= 0) & (label < V)

    # The first piece is never empty (V >= 1), so the running maximum is finite from then on
    # and exp(m - m_new) never sees -inf - (-inf); masked lanes read -inf and add exp(-inf) = 0.
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BLOCK):
        live = v0 + cols < V
        z = tl.load(logits_ptr + row_start + v0 + cols, mask=live,
                    other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # lse = m + log_s is never formed: z - m is exact for logits near the maximum, so the loss
    # and G keep the accuracy of torch's log_softmax ((z - m) - log_s) at any logit magnitude.
    log_s = tl.log(s)
    z_label = tl.load(logits_ptr + row_start + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, log_s - (z_label - m), float("nan")))

    if WRITE_GRAD:
        for v0 in range(0, V, BLOCK):
            live = v0 + cols < V
            z = tl.load(logits_ptr + row_start + v0 + cols, mask=live,
                        other=0.0).to(tl.float32)
            g = tl.exp((z - m) - log_s) - tl.where(v0 + cols == label, 1.0, 0.0)
            tl.store(logits_ptr + row_start + v0 + cols,
                     g.to(logits_ptr.dtype.element_ty), mask=live)


# Launch settings: BLOCK elements per step of a row, 16 per thread at 8 warps (fp32 values in
# registers, no spills); a power of two as tl.arange needs. Not tuned on a GPU yet.
BLOCK = 4096
NUM_WARPS = 8


def cross_entropy(logits_TV: torch.Tensor, labels_T: torch.Tensor, write_grad: bool,
                  block: Optional[int] = None) -> torch.Tensor:
    """fp32 loss [T] = logsumexp(logits[t]) - logits[t, labels[t]]. With write_grad, logits_TV
    (contiguous) is overwritten with softmax - onehot(label) in its own dtype. `block` (a power
    of two; default BLOCK) lets the tests cover rows of several pieces with a small V."""
    assert logits_TV.dim() == 2 and logits_TV.is_contiguous(), "contiguous [T, V] logits"
    T, V = logits_TV.shape
    assert labels_T.shape == (T,), (labels_T.shape, T)
    loss_T = torch.empty(T, dtype=torch.float32, device=logits_TV.device)
    if T == 0:
        return loss_T
    if V == 0:
        return loss_T.fill_(float("nan"))       # no class: every label is out of range
    block = min(block or BLOCK, triton.next_power_of_2(V))
    cross_entropy_kernel[(T,)](logits_TV, labels_T.contiguous(), loss_T, V,
                               WRITE_GRAD=write_grad, BLOCK=block,
                               num_warps=NUM_WARPS if block >= 1024 else 4)
    return loss_T
