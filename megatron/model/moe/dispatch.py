"""Dispatch plan, dispatch (gather token rows by expert) and combine (weighted scatter back).

Shapes: the letters of megatron/model/__init__.py.

A `RoutingDecision` says which (token, expert) pairs are kept. `make_plan` orders the kept pairs by
expert (each expert's rows in token order) and records where each expert's group ends; the
experts then run one grouped GEMM over contiguous row groups, so expert compute is
proportional to kept pairs, never to capacity (unlike the [E, C, D] einsum dispatch of
Megatron-DeepSpeed / GShard, which computes E * C rows whatever the load).

Two variants (MoEConfig.sync_free):
- exact: P = number of kept pairs, read to the host with ONE sync per layer (the group ends are
  read in the same transfer: expert parallelism's split sizes need no second one);
- sync-free: P = a static upper bound (T * K, or E * C when capacity is smaller); rows past the
  last kept pair have weight 0, are marked invalid in `valid_P`, and point at token p mod T
  (not all at token 0: the scatter-adds of combine and of dispatch's backward would then pile
  tens of thousands of atomic adds onto one row, which serialises them on the GPU). Their expert
  outputs may be garbage (grouped_mm leaves rows past offs[-1] uninitialised, and 0 * NaN = NaN),
  so `Experts` masks them with `torch.where` before any arithmetic, and returns exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.model.moe.router import RoutingDecision, capacity_and_counts


@dataclass(frozen=True)
class DispatchPlan:
    """Kept (token, expert) pairs sorted by expert, as rows of the dispatch buffer.

    token_idx_P:     int64 [P] source token of each row (p mod T on padding rows)
    weight_P:        fp32  [P] combine weight of each row (differentiable; 0 on padding rows)
    group_offsets_E: int32 [E] cumulative kept rows per expert: expert e owns rows
                     [offsets[e-1], offsets[e]) (the `offs` argument of torch._grouped_mm)
    valid_P:         bool  [P] row holds a kept pair; None when every row does (exact variant)
    group_ends:      host copy of group_offsets_E (exact variant only; None when sync-free)
    num_tokens:      T, the number of rows of the combined output
    bag_rows_J:      int64 [J] the rows regrouped by token (token-major CSR, one entry per kept
                     pair): token t's rows are bag_rows_J[bag_offsets_G[t]:bag_offsets_G[t+1]]
    bag_offsets_G:   int64 [G] bag starts, G >= T; bags past the first T are scratch (the
                     sync-free padding entries, cut into short bags), read and discarded
    """

    token_idx_P: torch.Tensor
    weight_P: torch.Tensor
    group_offsets_E: torch.Tensor
    valid_P: Optional[torch.Tensor]
    group_ends: Optional[Tuple[int, ...]]
    num_tokens: int
    bag_rows_J: Optional[torch.Tensor] = None
    bag_offsets_G: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.token_idx_P.shape[0]


SCRATCH_BAG = 32     # entries per scratch bag of the sync-free plan
DUMP = 1024          # scratch slots for the scatters' dropped pairs (a power of 2)


def dispatch_bound(num_tokens: int, num_slots: int, num_experts: int,
                   capacity: Optional[int]) -> int:
    """Static row bound of the sync-free buffer: T * K pairs, or E * C if capacity is smaller."""
    bound = num_tokens * num_slots
    if capacity is not None:
        bound = min(bound, num_experts * capacity)
    return bound


class PlanRows(NamedTuple):
    """Where the kept pairs go, as a capacity strategy computes it (arrays of the static length
    `bound` = dispatch_bound(...); rows past the kept pairs hold filler): see plan_core."""

    offsets_E: torch.Tensor         # int32 [E] cumulative kept rows per expert
    pair_P: torch.Tensor            # int64 [P] flat pair index n = t * K + k of each row
    rows_J: torch.Tensor            # int64 [J = P] rows regrouped by token (token-major CSR)
    bag_offsets_T: torch.Tensor     # int64 [T] each token's first entry in rows_J


@dataclass(frozen=True)
class PlanCore:
    """The part of a plan computed without knowing the number of kept pairs (no host sync).

    Arrays of the static length P = `bound` (rows past the kept pairs hold filler); see
    make_plan.
    """

    token_P: torch.Tensor           # int64 [P] source token of each row
    weight_P: torch.Tensor          # fp32  [P] combine weight of each row
    offsets_E: torch.Tensor         # int32 [E] cumulative kept rows per expert
    rows_J: torch.Tensor            # int64 [J = P] rows regrouped by token (token-major CSR)
    bag_offsets_T: torch.Tensor     # int64 [T] each token's first entry in rows_J
    num_tokens: int


def make_plan(decision: RoutingDecision, sync_free: bool) -> DispatchPlan:
    """Order the kept pairs of `decision` by expert, then token (tensor ops only, plus one sync
    if exact), with the torch scans: finish_plan(plan_core(decision, rows_by_scans(...)))."""
    E = decision.tokens_per_expert_E.shape[0]
    rows = rows_by_scans(decision.experts_TK, decision.kept_TK, E, decision.capacity)
    return finish_plan(plan_core(decision, rows), sync_free)


def plan_core(decision: RoutingDecision, rows: PlanRows) -> PlanCore:
    """The sync-free part of make_plan: the combine weight and source token of every row.

    `rows` (each kept pair's row in expert-major, token-minor order, and the token bags) come
    from the capacity strategy that decided the pairs: rows_by_scans (torch) or the capacity
    kernels (ops.triton_capacity), computed in the same pass as the decisions.
    """
    K = decision.experts_TK.shape[1]
    # index_select, not advanced indexing: its backward is an index_add, not a sort.
    weight_P = decision.weights_TK.reshape(-1).float().index_select(0, rows.pair_P)
    token_P = rows.pair_P // K
    return PlanCore(token_P=token_P, weight_P=weight_P, offsets_E=rows.offsets_E,
                    rows_J=rows.rows_J, bag_offsets_T=rows.bag_offsets_T,
                    num_tokens=decision.experts_TK.shape[0])


def capacity_with_rows(experts_TK: torch.Tensor, wanted_TK: torch.Tensor,
                       probs_TK: torch.Tensor, num_experts: int, capacity: Optional[int]
                       ) -> Tuple[torch.Tensor, torch.Tensor, PlanRows]:
    """The torch backend's capacity strategy (a router.CapacityFn): router.capacity_and_counts
    (one sort), and the dispatch rows of the kept pairs by rows_by_scans."""
    kept_TK, tokens_per_expert_E = capacity_and_counts(experts_TK, wanted_TK, probs_TK,
                                                       num_experts, capacity)
    return kept_TK, tokens_per_expert_E, rows_by_scans(experts_TK, kept_TK, num_experts,
                                                       capacity)


def rows_by_scans(experts_TK: torch.Tensor, kept_TK: torch.Tensor, E: int,
                  capacity: Optional[int]) -> PlanRows:
    """The plan's rows of the kept pairs with torch scans and scatters, no sort (see
    _number_pairs)."""
    T, K = experts_TK.shape
    bound = dispatch_bound(T, K, E, capacity)
    device = experts_TK.device
    kept_N = kept_TK.reshape(-1)
    offsets_E, row_N = _number_pairs(experts_TK, kept_N, E, T)

    # pair_P[p] = flat pair index n = t * K + k of row p. Rows past the kept pairs keep the
    # filler p (a valid, spread pair index: bound <= T * K), so the index_select backward of
    # the weights does not pile atomic adds onto one element. Dropped pairs write to DUMP
    # scratch slots past `bound` (spread: ~T * K stores to one address would serialise),
    # sliced off.
    n_N = torch.arange(T * K, device=device)
    dump_N = bound + (n_N & (DUMP - 1))
    dest_N = torch.where(kept_N, row_N, dump_N)
    pair_P = torch.arange(bound + DUMP, device=device).scatter(0, dest_N, n_N)[:bound]

    # The same rows regrouped by token (kept pairs are already token-major in n = t * K + k):
    # a scan numbers them, a scatter stores each one's row. Entries past the kept pairs
    # (sync-free) point at row 0 and fall into scratch bags.
    slot_N = torch.cumsum(kept_N, 0) - 1
    rows_J = torch.zeros(bound + DUMP, dtype=torch.int64, device=device)
    rows_J = rows_J.scatter(0, torch.where(kept_N, slot_N, dump_N), dest_N)[:bound]
    bag_ends_T = slot_N.view(T, K)[:, -1] + 1 if K > 0 else slot_N.new_zeros(T)
    bag_offsets_T = F.pad(bag_ends_T[:-1], (1, 0)) if T > 0 else bag_ends_T
    return PlanRows(offsets_E, pair_P, rows_J, bag_offsets_T)


def _number_pairs(experts_TK: torch.Tensor, kept_N: torch.Tensor, E: int, T: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(group ends int32 [E], row of each kept pair int64 [T * K]) without a sort.

    The kept flags are laid out on an [E, T] grid (cell e * T + t; a token's slots name
    distinct experts, so no cell is hit twice) and ONE inclusive scan over the flattened grid
    numbers the kept pairs in expert-major, token-minor order: a pair's row is its cell's scan
    value - 1, and expert e's group ends at the scan value of cell e * T + T - 1. The grid
    costs O(T * E), like the router's [T, E] probabilities.
    """
    device = experts_TK.device
    index_dtype = torch.int32 if E * T < 2**31 else torch.int64
    cell_N = (experts_TK * T + torch.arange(T, device=device)[:, None]).reshape(-1)
    grid_ET = torch.zeros(E * T, dtype=index_dtype, device=device)     # [E, T], flattened
    grid_ET.scatter_add_(0, cell_N, kept_N.to(index_dtype))
    ends_ET = torch.cumsum(grid_ET, 0, dtype=index_dtype)
    if T > 0:
        offsets_E = ends_ET.view(E, T)[:, -1].to(torch.int32).contiguous()
    else:
        offsets_E = torch.zeros(E, dtype=torch.int32, device=device)
    return offsets_E, ends_ET.index_select(0, cell_N).long() - 1


def finish_plan(core: PlanCore, sync_free: bool) -> DispatchPlan:
    """Exact: read the group ends (the one host sync) and cut the arrays to the kept pairs.
    Sync-free: mark the rows past the kept pairs invalid and cut their bag entries into
    scratch bags (tensor ops only)."""
    token_P, weight_P, offsets_E = core.token_P, core.weight_P, core.offsets_E
    rows_J, bag_offsets_T, T = core.rows_J, core.bag_offsets_T, core.num_tokens
    bound = token_P.shape[0]
    device = token_P.device
    if not sync_free:
        group_ends = tuple(offsets_E.tolist())          # the one host sync of this layer
        P = group_ends[-1] if group_ends else 0
        return DispatchPlan(token_idx_P=token_P[:P], weight_P=weight_P[:P],
                            group_offsets_E=offsets_E, valid_P=None, group_ends=group_ends,
                            num_tokens=T, bag_rows_J=rows_J[:P], bag_offsets_G=bag_offsets_T)

    rows_P = torch.arange(bound, device=device)
    valid_P = rows_P < offsets_E[-1]
    token_idx_P = torch.where(valid_P, token_P, rows_P % max(T, 1))
    weight_P = torch.where(valid_P, weight_P, torch.zeros_like(weight_P))
    # Scratch bags of <= SCRATCH_BAG entries from the number of kept pairs on: the last token's
    # bag then ends at the kept pairs, and no single bag sums the whole padding serially.
    num_scratch = -(-bound // SCRATCH_BAG)
    scratch_G = torch.arange(num_scratch, device=device) * SCRATCH_BAG + offsets_E[-1].long()
    bag_offsets_G = torch.cat([bag_offsets_T, scratch_G.clamp(max=bound)])
    return DispatchPlan(token_idx_P=token_idx_P, weight_P=weight_P, group_offsets_E=offsets_E,
                        valid_P=valid_P, group_ends=None, num_tokens=T, bag_rows_J=rows_J,
                        bag_offsets_G=bag_offsets_G)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather the token row of every dispatch row: x_PD[p] = x_TD[token_idx_P[p]].

    Backward sums each token's row gradients per token bag (a gather, fp32 accumulation inside
    the kernel, no atomics) rather than index_select's scatter-add.
    """
    if plan.bag_rows_J is None or plan.num_rows == 0:
        return x_TD.index_select(0, plan.token_idx_P)
    return _Dispatch.apply(x_TD, plan.token_idx_P, plan.bag_rows_J, plan.bag_offsets_G)


def combine(y_PD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """out_TD[t] = sum over rows p of token t of weight_P[p] * y_PD[p], accumulated in fp32.

    Tokens whose pairs were all dropped get 0 (the transformer's residual carries them).
    Padding rows of the sync-free plan: `Experts` returns exact zeros there (torch.where on its
    outputs, applied before any multiply, so uninitialised grouped_mm rows, even NaN, never
    meet a 0 weight: 0 * NaN = NaN); they belong to no token's bag.
    """
    if plan.bag_rows_J is None or plan.num_rows == 0:
        # bf16 * fp32 promotes to fp32 inside one kernel: no separate fp32 copy of y_PD.
        contrib_PD = y_PD * plan.weight_P[:, None]
        out_TD = contrib_PD.new_zeros(plan.num_tokens, y_PD.shape[1])
        out_TD = out_TD.index_add(0, plan.token_idx_P, contrib_PD)   # CUDA: atomics
        return out_TD.to(out_dtype)
    out_TD = _Combine.apply(y_PD, plan.weight_P, plan.token_idx_P, plan.bag_rows_J,
                            plan.bag_offsets_G, plan.num_tokens)
    return out_TD.to(out_dtype)


class _Dispatch(torch.autograd.Function):
    """index_select forward; backward = per-token bag sums of the row gradients."""

    @staticmethod
    def forward(ctx, x_TD, token_idx_P, bag_rows_J, bag_offsets_G):
        ctx.save_for_backward(bag_rows_J, bag_offsets_G)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, token_idx_P)

    @staticmethod
    def backward(ctx, grad_PD):
        bag_rows_J, bag_offsets_G = ctx.saved_tensors
        grad_TD = F.embedding_bag(bag_rows_J, grad_PD.contiguous(), bag_offsets_G, mode="sum")
        return grad_TD[:ctx.num_tokens], None, None, None


class _Combine(torch.autograd.Function):
    """fp32 out_TD = per-token bag sums of weight_P[p] * y_PD[p] (embedding_bag with
    per-sample weights: a gather, no atomics); backward gathers dL/dout per row."""

    @staticmethod
    def forward(ctx, y_PD, weight_P, token_idx_P, bag_rows_J, bag_offsets_G, num_tokens):
        ctx.save_for_backward(y_PD, weight_P, token_idx_P)
        bag_weights_J = weight_P.index_select(0, bag_rows_J)
        if y_PD.is_cuda and y_PD.element_size() < 4:
            # CUDA's embedding_bag accumulates 16-bit rows in fp32 (acc_type) and rounds once
            # at the end, so bf16 rows need no fp32 copy of the whole [P, D] buffer (the
            # sync-free buffer is ~8 T rows); the weights are rounded to bf16 for the kernel,
            # an error (2^-9 relative) no larger than that of the bf16 rows themselves.
            out_GD = F.embedding_bag(bag_rows_J, y_PD, bag_offsets_G, mode="sum",
                                     per_sample_weights=bag_weights_J.to(y_PD.dtype))
        else:
            out_GD = F.embedding_bag(bag_rows_J, y_PD.float(), bag_offsets_G, mode="sum",
                                     per_sample_weights=bag_weights_J)
        return out_GD[:num_tokens]

    @staticmethod
    def backward(ctx, grad_TD):
        y_PD, weight_P, token_idx_P = ctx.saved_tensors
        grad_PD = grad_TD.float().index_select(0, token_idx_P)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad_PD * weight_P[:, None]).to(y_PD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_PD * y_PD).sum(dim=1)
        return grad_y, grad_w, None, None, None, None
