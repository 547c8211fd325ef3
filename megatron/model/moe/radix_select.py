"""Radix selection in Triton: the m-th largest of non-negative fp32 values without sorting.

Non-negative floats order like their IEEE bits read as integers (the sign bit cleared, so -0.0
ties with 0.0), so the m-th largest value is found digit by digit, most significant first:
four passes of an 8-bit histogram over the candidates whose higher digits match the prefix
chosen so far. Used by the capacity kernels (an overfull expert's cut, capacity_kernels.py) and
for the MoE statistics' quantiles of the top-1 probability (`quantiles`, replacing a sort of T
values per layer).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _digit_histogram(bits, live, prefix, P: tl.constexpr):
    """Counts of digit P (8 bits, P = 0 the most significant) of the live `bits` whose higher
    digits equal those of `prefix`. Cells that are not live land in bin 0: harmless, as bin 0
    enters no count of digits above a chosen one and 0 is what _take_digit falls back to."""
    shift = 24 - 8 * P
    if P > 0:
        live = live & ((bits >> (shift + 8)) == (prefix >> (shift + 8)))
    return tl.histogram(tl.where(live, (bits >> shift) & 255, 0), 256)


@triton.jit
def _take_digit(hist, prefix, m, P: tl.constexpr):
    """Digit P of the m-th largest (m >= 1) given its histogram: (prefix with that digit set,
    the rank m among the candidates that share the new prefix)."""
    digits = tl.arange(0, 256)
    at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist    # digit >= d
    d = tl.max(tl.where(at_least >= m, digits, 0), axis=0)       # largest d with >= m at or above
    m -= tl.sum(tl.where(digits > d, hist, 0), axis=0)
    return prefix | (d << (24 - 8 * P)), m


@triton.jit
def _bits(values_ptr, i, live):
    v = tl.load(values_ptr + i, mask=live, other=0.0).to(tl.float32)
    return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _kth_smallest(values_ptr, n, rank, BLOCK: tl.constexpr):
    """The rank-th smallest (0-based) of values[:n] as fp32."""
    prefix = rank * 0
    m = n - rank                                    # ... is the m-th largest
    for p in tl.static_range(4):
        hist = tl.zeros([256], dtype=tl.int32)
        for i0 in range(0, n, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            live = i < n
            hist += _digit_histogram(_bits(values_ptr, i, live), live, prefix, p)
        prefix, m = _take_digit(hist, prefix, m, p)
    return prefix.to(tl.float32, bitcast=True)


@triton.jit
def _quantiles_kernel(values_ptr, pos_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[j] = linear interpolation at position pos[j] in sorted(values[:n]) (torch.quantile's
    default), from the two order statistics around it."""
    j = tl.program_id(0)
    pos = tl.load(pos_ptr + j)
    lo = tl.cast(pos, tl.int32)
    hi = tl.minimum(lo + 1, n - 1)
    frac = pos - lo.to(tl.float32)
    low = _kth_smallest(values_ptr, n, lo, BLOCK)
    high = _kth_smallest(values_ptr, n, hi, BLOCK)
    tl.store(out_ptr + j, low * (1.0 - frac) + high * frac)


def quantiles(values_T: torch.Tensor, qs: Sequence[float], block: int = 4096) -> torch.Tensor:
    """fp32 [len(qs)] quantiles (linear interpolation) of non-negative values, on the device.

    The positions q * (n - 1) are made with tensor ops from a device arange (no host-to-device
    copy of a Python list, no sync); NaN for empty input, like torch.quantile.
    """
    values = values_T.detach().float().reshape(-1).contiguous()
    n = values.numel()
    if n == 0:
        return values.new_full((len(qs),), float("nan"))
    index = torch.arange(len(qs), device=values.device, dtype=torch.float32)
    q = torch.zeros_like(index)
    for j, qj in enumerate(qs):           # elementwise selects of Python floats: no copies
        q = torch.where(index == j, qj, q)
    out = torch.empty(len(qs), dtype=torch.float32, device=values.device)
    _quantiles_kernel[(len(qs),)](values, q * (n - 1), out, n,
                                  BLOCK=min(block, triton.next_power_of_2(max(n, 16))),
                                  num_warps=8)
    return out
