"""Capacity and the dispatch plan's rows in four Triton kernels, without a sort.

Shapes: the letters of megatron/model/__init__.py.

The same decisions as router.capacity_and_counts (priority within an expert: lower slot k,
then higher probability, then lower token index) plus what dispatch.rows_by_scans derives from
them, the dispatch row of every kept pair (expert-major, token-minor). The torch path sorts
all T * K pairs on a 43-bit key and then scans an [E, T] grid, a large share of the layer's
time at threshold routing's K = E (measured in benchmarks/HISTORY.md). Here:

1. `slot_grid_kernel`: grid[e, t] = k + 1 if token t wants expert e at slot k, else 0 (a
   token's slots name distinct experts, so each cell is written at most once), and counts[e,
   k + 1] += 1 per wanted pair (integer atomics: the same counts in any order).
2. `cutoff_kernel`, one program per expert: reads its wanted pairs per slot. If they fit in C
   (the usual case), every pair is kept and the program is done. Otherwise the pairs of the
   slots before the cut slot s* are kept, and of slot s* the m = C - (pairs before s*) most
   probable: an MSB-first radix select (4 passes of 8 bits) over the probabilities' IEEE bits
   (non-negative floats order like their bits as integers) finds the m-th largest value v* and
   how many of the pairs equal to v* are kept - the lowest-token ones.
3. `rows_kernel`, one program per expert: walks its tokens in order, keeps pairs by that cut
   and numbers them from the expert's group start (the kept counts of the experts before it).
4. `token_bags_kernel` (token_bags): from those rows, the plan's pair index of every row and
   the token-major bags, in one pass over [T, K] (dispatch.PlanRows).

Nothing is read on the host. The Triton backend's capacity strategy (ops.triton_capacity); CPU
tests run the kernels under triton's interpreter and compare them with the torch path, exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_NO_VALUE = tl.constexpr(0x7FFFFFFF)     # above every probability's bits: keeps none of s*


@triton.jit
def _prob_bits(probs_ptr, t, K, s, live):
    """IEEE bits (sign cleared: -0.0 ties with 0.0) of probs[t, s - 1] where live, else 0."""
    p = tl.load(probs_ptr + tl.cast(t, tl.int64) * K + (s - 1), mask=live, other=0.0)
    return p.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def slot_grid_kernel(experts_ptr, wanted_ptr, grid_ptr, counts_ptr, T, K, KB: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """grid[e, t] = k + 1 and counts[e, k + 1] += 1 for every wanted pair (t, k) with
    experts[t, k] = e (counts: [E, KB] zeros before)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    inside = (t < T)[:, None] & (k < K)[None, :]
    at = tl.cast(t, tl.int64)[:, None] * K + k[None, :]
    e = tl.load(experts_ptr + at, mask=inside, other=0)
    wanted = tl.load(wanted_ptr + at, mask=inside, other=0) != 0
    slot = tl.broadcast_to((k + 1)[None, :], (BLOCK_T, BLOCK_K))
    tl.store(grid_ptr + e * T + t[:, None], slot, mask=inside & wanted)
    tl.atomic_add(counts_ptr + e * KB + slot, 1, mask=inside & wanted)


@triton.jit
def _radix_select(row_ptr, probs_ptr, T, K, cut, m, BLOCK_T: tl.constexpr):
    """(v*, quota): the m-th largest bits among the cells of slot `cut` (m >= 1), and how many
    of the cells whose bits equal v* rank within the m (they are kept in token order)."""
    prefix = cut * 0
    digits = tl.arange(0, 256)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            s = tl.load(row_ptr + t, mask=t < T, other=0)
            live = s == cut
            bits = _prob_bits(probs_ptr, t, K, s, live)
            if p > 0:
                live = live & ((bits >> (shift + 8)) == (prefix >> (shift + 8)))
            # Cells that are not live land in bin 0 too. Harmless: bin 0 enters no count of
            # digits > d, and d = 0 is what the search falls back to anyway.
            hist += tl.histogram(tl.where(live, (bits >> shift) & 255, 0), 256)
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist   # digit >= d
        d = tl.max(tl.where(at_least >= m, digits, 0), axis=0)   # largest d with >= m at or above
        m -= tl.sum(tl.where(digits > d, hist, 0), axis=0)
        prefix = prefix | (d << shift)
    return prefix, m


@triton.jit
def cutoff_kernel(grid_ptr, probs_ptr, counts_ptr, cut_ptr, T, K, capacity, KB: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Per expert: cut slot (KB when all wanted pairs fit), v*, quota and kept count. Only an
    overflowing expert reads its grid row (a histogram of the whole row per expert, 64
    programs scanning [E, T], took most of the capacity step's time)."""
    e = tl.program_id(0)
    row_ptr = grid_ptr + tl.cast(e, tl.int64) * T
    bins = tl.arange(0, KB)
    hist = tl.load(counts_ptr + e * KB + bins)          # bin 0 (cells nobody wants) is 0
    total = tl.sum(hist, axis=0)
    cut = tl.min(tl.where(tl.cumsum(hist, axis=0) > capacity, bins, KB), axis=0)
    quota = capacity - tl.sum(tl.where(bins < cut, hist, 0), axis=0)
    value = cut * 0 + _NO_VALUE
    if (cut < KB) & (quota > 0):       # only an overflowing expert pays for the select
        value, quota = _radix_select(row_ptr, probs_ptr, T, K, cut, quota, BLOCK_T)
    out = cut_ptr + e * 4
    tl.store(out, cut)
    tl.store(out + 1, value)
    tl.store(out + 2, quota)
    tl.store(out + 3, tl.minimum(total, capacity))


@triton.jit
def rows_kernel(grid_ptr, probs_ptr, cut_ptr, kept_ptr, rows_ptr, counts_ptr, T, K,
                 num_experts, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per expert, tokens in order: kept[t, k] and row[t, k] = group start + kept pairs so far."""
    e = tl.program_id(0)
    before = tl.arange(0, BLOCK_E)
    base = tl.sum(tl.load(cut_ptr + before * 4 + 3, mask=before < e, other=0), axis=0)
    cut = tl.load(cut_ptr + e * 4)
    value = tl.load(cut_ptr + e * 4 + 1)
    quota = tl.load(cut_ptr + e * 4 + 2)
    row_ptr = grid_ptr + tl.cast(e, tl.int64) * T
    kept_so_far = base * 0
    ties_so_far = base * 0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        s = tl.load(row_ptr + t, mask=t < T, other=0)
        at_cut = s == cut
        bits = _prob_bits(probs_ptr, t, K, s, at_cut)
        tie = (at_cut & (bits == value)).to(tl.int32)
        tie_rank = ties_so_far + tl.cumsum(tie, axis=0) - tie
        keep = (s > 0) & ((s < cut) | (at_cut & ((bits > value)
                                                 | ((tie != 0) & (tie_rank < quota)))))
        keep_i = keep.to(tl.int32)
        row = base + kept_so_far + tl.cumsum(keep_i, axis=0) - keep_i
        pair = tl.cast(t, tl.int64) * K + (s - 1)
        tl.store(kept_ptr + pair, keep_i.to(tl.uint8), mask=keep)
        tl.store(rows_ptr + pair, row, mask=keep)
        kept_so_far += tl.sum(keep_i, axis=0)
        ties_so_far += tl.sum(tie, axis=0)
    tl.store(counts_ptr + e, kept_so_far.to(tl.int64))


@triton.jit
def token_bags_kernel(kept_ptr, rows_ptr, bag_start_ptr, pair_ptr, bag_rows_ptr, T, K,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each kept pair (t, k) with row r: pair[r] = t * K + k, and r is entry j of token
    t's bag (j = kept slots of t before k): bag_rows[bag_start[t] + j] = r."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_K)
    inside = (t < T)[:, None] & (k < K)[None, :]
    at = tl.cast(t, tl.int64)[:, None] * K + k[None, :]
    keep = tl.load(kept_ptr + at, mask=inside, other=0) != 0
    keep_i = keep.to(tl.int32)
    j = tl.cumsum(keep_i, axis=1) - keep_i
    row = tl.load(rows_ptr + at, mask=keep, other=0)
    start = tl.load(bag_start_ptr + t, mask=t < T, other=0)
    tl.store(bag_rows_ptr + start[:, None] + j, row.to(tl.int64), mask=keep)
    tl.store(pair_ptr + row, at, mask=keep)


def capacity_rows(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                  num_experts: int, capacity: Optional[int], scan_block: int = 2048
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept_TK bool, kept pairs per expert int64 [E], rows_TK int32) for capacity C (None:
    dropless). rows_TK[t, k] is the dispatch row of a kept pair (rows of expert e follow those
    of experts < e, in token order); undefined where not kept. `scan_block`: tokens per step
    of the per-expert scans (tests make it small to cross block boundaries)."""
    T, K = experts_TK.shape
    E = num_experts
    device = experts_TK.device
    # A token's slots name distinct experts, so no expert gets more than T pairs: a larger
    # capacity (or none) cannot bind, and T keeps the kernels' arithmetic in int32.
    cap = T if capacity is None else min(capacity, T)
    grid_ET = torch.zeros(E, T, dtype=torch.int32, device=device)
    block_k = triton.next_power_of_2(K)
    block_t = max(1, 4096 // block_k)
    slot_bins = triton.next_power_of_2(K + 1)           # counts per slot k + 1; bin 0 unused
    counts_EK = torch.zeros(E, slot_bins, dtype=torch.int32, device=device)
    slot_grid_kernel[(triton.cdiv(T, block_t),)](
        experts_TK.contiguous(), wanted_TK.to(torch.uint8), grid_ET, counts_EK, T, K,
        KB=slot_bins, BLOCK_T=block_t, BLOCK_K=block_k)
    probs_TK = probs_TK.detach().float().contiguous()
    # per expert: cut slot, v* bits, quota, kept count (the kernels' stride of 4)
    cut_E4 = torch.empty(E, 4, dtype=torch.int32, device=device)
    scan = min(scan_block, triton.next_power_of_2(max(T, 16)))
    cutoff_kernel[(E,)](grid_ET, probs_TK, counts_EK, cut_E4, T, K, cap, KB=slot_bins,
                         BLOCK_T=scan, num_warps=8)
    kept_TK = torch.zeros(T, K, dtype=torch.uint8, device=device)
    rows_TK = torch.empty(T, K, dtype=torch.int32, device=device)
    counts_E = torch.empty(E, dtype=torch.int64, device=device)
    rows_kernel[(E,)](grid_ET, probs_TK, cut_E4, kept_TK, rows_TK, counts_E, T, K, E,
                       BLOCK_T=scan, BLOCK_E=triton.next_power_of_2(E), num_warps=8)
    # uint8 buffers, converted by torch: no dtype-changing views of kernel outputs under
    # torch.compile's functionalization.
    return kept_TK.bool(), counts_E, rows_TK


def token_bags(kept_TK: torch.Tensor, rows_TK: torch.Tensor, bound: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of the dispatch plan's rows from capacity_rows' output (see dispatch.PlanRows):
    pair_P int64 [P = bound] (the flat pair index t * K + k of each row; filler p past the
    kept pairs), rows_J int64 [P] (rows regrouped by token, token-major; 0 past the kept
    pairs) and bag_offsets_T int64 [T] (each token's first entry). One pass over [T, K], where
    the torch path scans and scatters all T * K slots."""
    T, K = kept_TK.shape
    kept_T = kept_TK.sum(dim=1)
    bag_offsets_T = torch.cumsum(kept_T, 0) - kept_T
    pair_P = torch.arange(bound, device=kept_TK.device)
    rows_J = torch.zeros(bound, dtype=torch.int64, device=kept_TK.device)
    if T and K:
        block_k = triton.next_power_of_2(K)
        block_t = max(1, 4096 // block_k)
        token_bags_kernel[(triton.cdiv(T, block_t),)](
            kept_TK.to(torch.uint8), rows_TK, bag_offsets_T, pair_P, rows_J, T, K,
            BLOCK_T=block_t, BLOCK_K=block_k)
    return pair_P, rows_J, bag_offsets_T
