"""Dispatch plan, dispatch (gather token rows by expert) and combine (weighted scatter back).

Letters: T tokens, D hidden, E experts, K choice slots per token, P rows of the dispatch buffer.

A `RoutingDecision` says which (token, expert) pairs are kept. `make_plan` sorts the kept pairs by
expert (stable, so each expert's rows stay in token order) and records where each expert's group
ends; the experts then run one grouped GEMM over contiguous row groups, so expert compute is
proportional to kept pairs, never to capacity (unlike the [E, C, D] einsum dispatch of
Megatron-DeepSpeed / GShard, which computes E * C rows whatever the load).

Two variants (MoEConfig.sync_free):
- exact: P = number of kept pairs, read to the host with ONE sync per layer (the group ends are
  read in the same transfer, so the per-expert loop path needs no second one);
- sync-free: P = a static upper bound (T * K, or E * C when capacity is smaller); rows past the
  last kept pair have weight 0, are marked invalid in `valid_P`, and point at token p mod T
  (not all at token 0: the scatter-adds of combine and of dispatch's backward would then pile
  tens of thousands of atomic adds onto one row, which serialises them on the GPU). Their expert
  outputs may be garbage (grouped_mm leaves rows past offs[-1] uninitialised, and 0 * NaN = NaN),
  so `Experts` masks them with `torch.where` before any arithmetic, and returns exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron.model.mlp_gating import RoutingDecision


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
    """

    token_idx_P: torch.Tensor
    weight_P: torch.Tensor
    group_offsets_E: torch.Tensor
    valid_P: Optional[torch.Tensor]
    group_ends: Optional[Tuple[int, ...]]
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return self.token_idx_P.shape[0]


def dispatch_bound(num_tokens: int, num_slots: int, num_experts: int,
                   capacity: Optional[int]) -> int:
    """Static row bound of the sync-free buffer: T * K pairs, or E * C if capacity is smaller."""
    bound = num_tokens * num_slots
    if capacity is not None:
        bound = min(bound, num_experts * capacity)
    return bound


def make_plan(decision: RoutingDecision, sync_free: bool) -> DispatchPlan:
    """Sort the kept pairs of `decision` by expert (tensor ops only, plus one sync if exact)."""
    experts_TK, kept_TK = decision.experts_TK, decision.kept_TK
    T, K = experts_TK.shape
    E = decision.tokens_per_expert_E.shape[0]
    # Sort key: the expert id for kept pairs, E (sorts last) for dropped or unwanted ones. The
    # stable sort keeps each expert's rows in (token, rank) order, which makes results
    # independent of the sort implementation.
    key_N = torch.where(kept_TK, experts_TK, torch.full_like(experts_TK, E)).reshape(-1)
    order_N = torch.argsort(key_N.to(torch.int32), stable=True)   # 32-bit radix sort: faster
    # Group ends by binary search in the sorted keys: no atomics (a scatter_add count over
    # T * K pairs into E bins contends heavily) and no host sync (CUDA bincount reads max).
    sorted_key_N = key_N[order_N]
    experts_E = torch.arange(E, device=key_N.device, dtype=key_N.dtype)
    offsets_E = torch.searchsorted(sorted_key_N, experts_E, right=True).to(torch.int32)
    weights_N = decision.weights_TK.reshape(-1).float()

    if not sync_free:
        group_ends = tuple(offsets_E.tolist())          # the one host sync of this layer
        P = group_ends[-1] if group_ends else 0
        order_P = order_N[:P]
        return DispatchPlan(token_idx_P=order_P // K, weight_P=weights_N[order_P],
                            group_offsets_E=offsets_E, valid_P=None, group_ends=group_ends,
                            num_tokens=T)

    P = dispatch_bound(T, K, E, decision.capacity)
    order_P = order_N[:P]
    valid_P = sorted_key_N[:P] < E
    spread_P = torch.arange(P, device=order_P.device) % max(T, 1)
    token_idx_P = torch.where(valid_P, order_P // K, spread_P)
    weight_P = torch.where(valid_P, weights_N[order_P], torch.zeros_like(weights_N[order_P]))
    return DispatchPlan(token_idx_P=token_idx_P, weight_P=weight_P, group_offsets_E=offsets_E,
                        valid_P=valid_P, group_ends=None, num_tokens=T)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather the token row of every dispatch row: x_PD[p] = x_TD[token_idx_P[p]]."""
    return x_TD.index_select(0, plan.token_idx_P)


def combine(y_PD: torch.Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> torch.Tensor:
    """out_TD[t] = sum over rows p of token t of weight_P[p] * y_PD[p], accumulated in fp32.

    Tokens whose pairs were all dropped get 0 (the transformer's residual carries them).
    Padding rows of the sync-free plan: `Experts` returns exact zeros there (torch.where on its
    outputs, applied before any multiply, so uninitialised grouped_mm rows, even NaN, never
    meet a 0 weight: 0 * NaN = NaN); they add 0 * 0 to spread tokens.
    """
    # bf16 * fp32 promotes to fp32 inside one kernel: no separate fp32 copy of y_PD.
    contrib_PD = y_PD * plan.weight_P[:, None]
    out_TD = contrib_PD.new_zeros(plan.num_tokens, y_PD.shape[1])
    # index_add over a fresh zeros tensor (out of place, so autograd sees a plain function).
    # On CUDA this uses atomics: bitwise run-to-run nondeterministic in the summation order.
    out_TD = out_TD.index_add(0, plan.token_idx_P, contrib_PD)
    return out_TD.to(out_dtype)
