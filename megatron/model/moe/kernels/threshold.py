"""The threshold router's choice slots in one Triton pass: each token's experts ranked by
probability and the prefix of them it wants.

Shapes: the letters of megatron/model/__init__.py.

The torch path (router.torch_threshold_slots) sorts the [T, E] probabilities (a segmented
sort: several kernels), scans the sorted rows in fp64 and compares. Here one program ranks the
rows of a block of tokens with a bitonic sort of int64 keys (probability bits << 32 | reversed
expert index: descending probability, ties to the lower expert index, i.e. torch's stable
descending sort; probabilities are non-negative, so their IEEE bits order like the values),
then takes the exclusive fp64 prefix sums of the sorted probabilities, rounded to fp32 and
compared with the fp32 threshold, as the torch path does.

The fp64 scan adds in a tree order on a GPU (as torch's CUDA scan does, and in sequence under
triton's interpreter, as on CPU): fp64 sums of fp32 probabilities round to the same fp32 prefix
but in ties at an fp32 rounding boundary, the reason the torch path scans in fp64.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def threshold_slots_kernel(probs_ptr, experts_ptr, wanted_ptr, T, threshold, E: tl.constexpr,
                           EB: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """experts[t, k] = the expert at rank k of token t (k < K); wanted[t, k] = 1 where the
    probability ranked before k sums to < threshold (fp32)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, EB)
    inside = (t < T)[:, None] & (e < E)[None, :]
    p = tl.load(probs_ptr + tl.cast(t, tl.int64)[:, None] * E + e[None, :], mask=inside,
                other=0.0)
    bits = (p.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)   # -0.0 ties with 0.0
    key = tl.where(inside, (bits << 32) | (EB - 1 - e)[None, :].to(tl.int64), -1)
    key = tl.sort(key, dim=1, descending=True)                         # padding (-1) last
    expert = (EB - 1) - (key & 0xFFFFFFFF)
    sorted_p = tl.where(key >= 0, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    wide = sorted_p.to(tl.float64)
    before = (tl.cumsum(wide, axis=1) - wide).to(tl.float32)          # exclusive prefix sums
    before = tl.where((e == 0)[None, :], 0.0, before)   # slot 0 always wanted (NaN rows too)
    wanted = before < threshold
    slot = (t < T)[:, None] & (e < K)[None, :]
    at = tl.cast(t, tl.int64)[:, None] * K + e[None, :]
    tl.store(experts_ptr + at, expert, mask=slot)
    tl.store(wanted_ptr + at, wanted.to(tl.uint8), mask=slot)


def threshold_slots(probs_TE: torch.Tensor, threshold: float, num_slots: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(experts_TK int64, wanted_TK bool) of the threshold router (K = num_slots <= E), from
    fp32 probabilities [T, E]."""
    T, E = probs_TE.shape
    probs_TE = probs_TE.detach().float().contiguous()
    experts_TK = torch.empty(T, num_slots, dtype=torch.int64, device=probs_TE.device)
    wanted_TK = torch.empty(T, num_slots, dtype=torch.uint8, device=probs_TE.device)
    if T and num_slots:
        block_e = triton.next_power_of_2(E)
        block_t = max(1, 1024 // block_e)
        threshold_slots_kernel[(triton.cdiv(T, block_t),)](
            probs_TE, experts_TK, wanted_TK, T, threshold, E=E, EB=block_e, K=num_slots,
            BLOCK_T=block_t, num_warps=4)
    # a uint8 buffer converted by torch: no dtype-changing view of a kernel output under
    # torch.compile's functionalization
    return experts_TK, wanted_TK.bool()
