"""Expert parallelism: run the experts of an MoE layer across an expert-parallel process group.

Shapes: the letters of megatron/model/__init__.py (P dispatch rows of this rank, expert-major;
R rows received by this rank; W ranks of the group; L = E / W experts per rank).

Rank r owns experts [r * L, (r + 1) * L) (a slice of the stacked weights, see `shard_experts`).
The plan's rows are sorted by expert, so they are already grouped by destination rank: rank d's
rows are the contiguous run of experts d * L .. d * L + L - 1. One step runs:

  1. counts:   all_to_all of the per-expert row counts [W, L] (one host read for the splits);
  2. send:     all_to_all_single of the rows, uneven splits (rows for rank d go to rank d);
  3. regroup:  received rows are source-major (each source's block expert-sorted); a
               permutation makes them local-expert-major for one grouped GEMM;
  4. experts:  the local experts over contiguous local groups;
  5. return:   the inverse permutation, then all_to_all_single back with the splits swapped,
               so the result lines up with the caller's plan rows for `combine`.

The all_to_all is a torch.autograd.Function whose backward is the same collective with input and
output splits swapped (the gradient of a permutation of rows across ranks is the inverse
permutation). torch.distributed.nn.functional.all_to_all_single does the same but is deprecated
in favour of the functional collectives, whose autograd support varies by version; ours is ten
lines and runs on gloo and NCCL alike.

Only the exact plan is supported: the sync-free plan's padded buffer has no host split sizes
(a sync-free expert-parallel exchange needs a fixed per-rank capacity; not done here).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from megatron.model.moe.dispatch import DispatchPlan, combine, dispatch
from megatron.model.moe.experts import Experts

# local_experts(x_RD, group_offsets_L) -> y_RD; `Experts` fits.
LocalExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expert_range(num_experts: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[first, last) global expert ids owned by `rank` of an expert-parallel group."""
    if num_experts % world_size != 0:
        raise ValueError(f"--num-experts ({num_experts}) must be divisible by the "
                         f"expert-parallel size ({world_size})")
    local = num_experts // world_size
    return rank * local, (rank + 1) * local


def shard_experts(experts: Experts, rank: int, world_size: int) -> Experts:
    """A new `Experts` holding copies of this rank's slice of the stacked weights."""
    first, last = expert_range(experts.num_experts, rank, world_size)
    D, Fh = experts.w1.shape[1], experts.w1.shape[2]
    local = Experts(last - first, D, Fh, init_std=1.0, output_init_std=1.0,
                    bias=experts.b1 is not None, params_dtype=experts.w1.dtype,
                    activation=experts.activation).to(experts.w1.device)
    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(getattr(experts, name)[first:last])
    return local


class _AllToAll(torch.autograd.Function):
    """Rows x[sum(in_splits[:j]) : ...] go to rank j; output is source-rank-major."""

    @staticmethod
    def forward(ctx, x_PD: torch.Tensor, out_splits: List[int], in_splits: List[int],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x_PD, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad_RD, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x_PD: torch.Tensor, out_splits: List[int], in_splits: List[int],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    out = x_PD.new_empty((sum(out_splits),) + tuple(x_PD.shape[1:]))
    dist.all_to_all_single(out, x_PD.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all_rows(x_PD: torch.Tensor, out_splits: List[int], in_splits: List[int],
                    group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Differentiable all_to_all_single along dim 0 with uneven splits (backward swaps them)."""
    return _AllToAll.apply(x_PD, list(out_splits), list(in_splits), group)


def exchange_counts(counts_E: Sequence[int], group: Optional[dist.ProcessGroup],
                    device: torch.device) -> List[List[int]]:
    """recv[s][l] = rows rank s sends to this rank's local expert l (host ints, one sync)."""
    W = dist.get_world_size(group)
    send_WL = torch.tensor(list(counts_E), dtype=torch.int64, device=device).view(W, -1)
    recv_WL = torch.empty_like(send_WL)
    dist.all_to_all_single(recv_WL, send_WL, group=group)
    return recv_WL.tolist()                 # the host sync of the split sizes


def local_order(recv_WL: Sequence[Sequence[int]], device: torch.device
                ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, ...]]:
    """Permutation from received (source-major) order to local-expert-major order.

    Returns perm_R (x_local = x_recv[perm_R]), its inverse, and the local group ends.
    Built from host counts, so no further sync.
    """
    counts_WL = torch.tensor(recv_WL, dtype=torch.int64).reshape(len(recv_WL), -1)
    W, L = counts_WL.shape
    starts_WL = (torch.cumsum(counts_WL.reshape(-1), 0) - counts_WL.reshape(-1)).view(W, L)
    counts_LW = counts_WL.t().reshape(-1)              # blocks in (local expert, src) order
    starts_LW = starts_WL.t().reshape(-1)
    R = int(counts_LW.sum())
    block_first_LW = torch.cumsum(counts_LW, 0) - counts_LW    # where each block lands locally
    within_R = torch.arange(R) - torch.repeat_interleave(block_first_LW, counts_LW)
    perm_R = torch.repeat_interleave(starts_LW, counts_LW) + within_R
    inverse_R = torch.empty_like(perm_R)
    inverse_R[perm_R] = torch.arange(R)
    ends = tuple(torch.cumsum(counts_WL.sum(0), 0).tolist())
    return perm_R.to(device), inverse_R.to(device), ends


def expert_parallel_experts(x_PD: torch.Tensor,
                            group_ends: Union[Sequence[int], torch.Tensor],
                            local_experts: LocalExperts,
                            group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """y_PD[p] = expert_e(x_PD[p]) for the plan's rows, expert e living on rank e // L.

    x_PD: this rank's dispatch rows, sorted by global expert (exact plan, P = group_ends[-1]).
    group_ends: cumulative row ends per global expert [E] (host ints, or a tensor read once).
    local_experts: this rank's L experts, called (x_RD, group_offsets_L).
    Every rank of `group` must call this the same number of times (forward and backward).
    """
    if isinstance(group_ends, torch.Tensor):
        group_ends = group_ends.tolist()
    ends = [int(e) for e in group_ends]
    W = dist.get_world_size(group)
    if len(ends) % W != 0:
        raise ValueError(f"--num-experts ({len(ends)}) must be divisible by the "
                         f"expert-parallel size ({W})")
    assert x_PD.shape[0] == (ends[-1] if ends else 0), (x_PD.shape, ends[-1:])
    L = len(ends) // W
    counts_E = [b - a for a, b in zip([0] + ends[:-1], ends)]
    send_W = [sum(counts_E[d * L:(d + 1) * L]) for d in range(W)]

    recv_WL = exchange_counts(counts_E, group, x_PD.device)
    recv_W = [sum(row) for row in recv_WL]
    perm_R, inverse_R, local_ends = local_order(recv_WL, x_PD.device)

    x_RD = all_to_all_rows(x_PD, recv_W, send_W, group)
    # index_select (backward: index_add over unique rows) into local-expert-major order.
    x_local = x_RD.index_select(0, perm_R)
    offsets_L = torch.tensor(local_ends, dtype=torch.int32, device=x_PD.device)
    if x_local.shape[0] > 0:
        y_local = local_experts(x_local, offsets_L)
    else:
        # No rows for this rank's experts: pass the empty received buffer on, so the return
        # all_to_all's output stays in the autograd graph and this rank runs both backward
        # collectives like its peers (an output without grad_fn would skip them: deadlock).
        y_local = x_local
    y_RD = y_local.index_select(0, inverse_R)
    return all_to_all_rows(y_RD, send_W, recv_W, group)


def expert_parallel_moe(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                        out_dtype: torch.dtype, group: dist.ProcessGroup) -> torch.Tensor:
    """The experts step of a sharded MoE layer (see backend.Backend): dispatch, the experts
    across `group` (expert_parallel_experts, on the exact plan's host group ends), combine."""
    x_PD = dispatch(x_TD, plan)
    y_PD = expert_parallel_experts(x_PD, plan.group_ends, experts, group)
    return combine(y_PD, plan, out_dtype)
