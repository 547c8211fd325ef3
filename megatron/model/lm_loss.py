"""The language model's output layer and per-token cross-entropy in one function.

Shapes: the letters of megatron/model/__init__.py (T tokens, D hidden, V padded vocabulary).

loss_T = cross_entropy(hidden_TD @ weight_VD^T, labels_T), fp32. Two paths compute it, chosen
once per call from the tensors (`fused_path`):
- torch (CPU, no triton, fp16): the logits in the params dtype, then F.cross_entropy of their
  fp32 copy, as Megatron does. That materialises fp32 [T, V] tensors (the cast, log_softmax's
  output kept for backward, their gradients): at T = 16,384 and V = 50,304 each is 3.3 GB.
- fused (CUDA with triton; CPU under triton's interpreter, the tests): the logits from one GEMM
  in the params dtype, then megatron/kernels/cross_entropy.py computes each row's fp32
  log-sum-exp and loss and, when a gradient is wanted, overwrites the logits in place with
  G = softmax - onehot(label) in their dtype. Nothing else of size [T, V] is allocated; G is
  what backward keeps.
Both run the same logits GEMM and compute the loss from those logits in fp32, so the losses
agree to fp32 rounding. Backward, exact for any upstream gradient g_T (training takes a mean,
evaluation a sum; nothing assumes g uniform), scales the small [T, D] operands, not G:
    dL/dhidden = g[:, None] * (G @ W),    dL/dW = G^T @ (g[:, None] * hidden).
The torch path rounds g * (p - y) to the params dtype before the two GEMMs; the fused path
rounds p - y, then applies g to a GEMM result (dL/dhidden: one more rounding to the params
dtype) or operand (dL/dW: hidden * g rounded once), so a bf16 gradient carries three roundings
instead of two (tests/model/test_lm_loss.py bounds both). When g is a power of two (a mean
over 2^k tokens, a sum) the scalings are exact and both paths round the same quantities.
Under torch.compile the fused path stays in the model's graph (see _FusedLMCrossEntropy).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

# triton decides between compiling and interpreting its kernels when it decorates them, from
# this variable: read once at import, as triton does (and never inside a traced forward).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Whether triton is installed (CUDA builds of torch ship it); imported only when used.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_path(hidden_TD: torch.Tensor, weight_VD: torch.Tensor) -> bool:
    """Whether lm_cross_entropy runs the Triton kernel: on CUDA (or under the interpreter)
    when triton is installed, for bf16 and fp32 logits. fp16 keeps the torch path: there the
    loss scale is applied only to g, so an unscaled G = p - y would lose the probabilities
    below fp16's normal range (6e-5) that the torch path keeps by rounding g * (p - y)."""
    dtype = hidden_TD.dtype
    return (_HAS_TRITON and (hidden_TD.is_cuda or _INTERPRETED)
            and dtype in (torch.bfloat16, torch.float32) and weight_VD.dtype == dtype)


def lm_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor,
                     labels_T: torch.Tensor) -> torch.Tensor:
    """fp32 per-token loss [T] of the logits hidden_TD @ weight_VD^T (params dtype) against
    labels_T in [0, V) (see the module docstring for the two paths)."""
    if not fused_path(hidden_TD, weight_VD):
        return torch_lm_cross_entropy(hidden_TD, weight_VD, labels_T)
    if torch.is_grad_enabled() and (hidden_TD.requires_grad or weight_VD.requires_grad):
        return _FusedLMCrossEntropy.apply(hidden_TD, weight_VD, labels_T)
    from megatron.kernels import cross_entropy as kernels     # needs triton: imported here

    logits_TV = F.linear(hidden_TD, weight_VD)
    return kernels.cross_entropy(logits_TV, labels_T, write_grad=False)


def torch_lm_cross_entropy(hidden_TD: torch.Tensor, weight_VD: torch.Tensor,
                           labels_T: torch.Tensor) -> torch.Tensor:
    """The torch path: cross-entropy in fp32 whatever the params dtype (Megatron casts the
    logits to float)."""
    logits_TV = F.linear(hidden_TD, weight_VD)
    return F.cross_entropy(logits_TV.float(), labels_T, reduction="none")


class _FusedLMCrossEntropy(torch.autograd.Function):
    """Forward: logits GEMM, then the kernel's loss with G written over the logits; backward:
    two GEMMs with G, the upstream gradient applied to their [T, D] operand or result.

    Like the MoE layer's Triton ops (megatron/model/moe/ops.py), a plain autograd Function
    whose forward launches a user Triton kernel, rather than a torch.library.triton_op: dynamo
    traces it into the model's graph (no graph break), AOT autograd functionalises the
    kernel's write to the logits (an intermediate of this forward) and inductor's re-inplacing
    turns it back into an in-place write, so no copy of the [T, V] logits is made (test:
    test_fused_path_is_one_graph_without_a_copy_of_the_logits).
    """

    @staticmethod
    def forward(ctx, hidden_TD, weight_VD, labels_T):
        from megatron.kernels import cross_entropy as kernels

        logits_TV = F.linear(hidden_TD, weight_VD).contiguous()
        loss_T = kernels.cross_entropy(logits_TV, labels_T, write_grad=True)
        ctx.save_for_backward(logits_TV, hidden_TD, weight_VD)      # logits_TV now holds G
        return loss_T

    @staticmethod
    def backward(ctx, grad_T):
        p_minus_y_TV, hidden_TD, weight_VD = ctx.saved_tensors         # G, params dtype
        g_T1 = grad_T.float()[:, None]
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((p_minus_y_TV @ weight_VD) * g_T1).to(hidden_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = p_minus_y_TV.t() @ (hidden_TD * g_T1).to(weight_VD.dtype)
        return grad_hidden, grad_weight, None
