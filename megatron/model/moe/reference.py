"""The per-expert loop: the slow, obviously correct reference the tests check every backend
against. Never chosen by --moe-backend.

Shapes: the letters of megatron/model/__init__.py.

`loop_experts` is `Experts.forward` written as one Linear-GeLU-Linear per expert over its row
slice (fp32 math when the weights are fp32, on any device); `use_reference_experts(layer)` makes
an MoE layer run its experts that way (dispatch -> loop -> combine, or the expert-parallel
exchange around the loop), keeping its router, capacity and plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import torch

from megatron.model.moe.dispatch import DispatchPlan, combine, dispatch
from megatron.model.moe.expert_parallel import expert_parallel_experts
from megatron.model.moe.experts import Experts


def loop_experts(experts: Experts, x_PD: torch.Tensor,
                 group_ends: Union[Sequence[int], torch.Tensor],
                 valid_P: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_PD[p] = expert_e(x_PD[p]) for the rows p of group e (ends: cumulative, host ints or a
    tensor read here); rows past the last group are 0. valid_P is implied by the ends."""
    if isinstance(group_ends, torch.Tensor):
        group_ends = group_ends.tolist()
    x = x_PD.to(experts.w1.dtype)
    outs, start = [], 0
    for e, end in enumerate(group_ends):
        if end > start:
            h = x[start:end] @ experts.w1[e]
            if experts.b1 is not None:
                h = h + experts.b1[e]
            y = experts.activation_fn(h) @ experts.w2[e]
            if experts.b2 is not None:
                y = y + experts.b2[e]
            outs.append(y)
        start = end
    outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))   # padding rows (sync-free)
    return torch.cat(outs).to(x_PD.dtype)


def reference_moe_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                          out_dtype: torch.dtype,
                          group: Optional["torch.distributed.ProcessGroup"] = None
                          ) -> torch.Tensor:
    """A backend's experts step (see backend.Backend) with the loop: dispatch -> loop_experts
    (across `group` when sharded) -> combine."""
    x_PD = dispatch(x_TD, plan)
    ends = plan.group_ends if plan.group_ends is not None else plan.group_offsets_E
    if group is None:
        y_PD = loop_experts(experts, x_PD, ends)
    else:
        y_PD = expert_parallel_experts(x_PD, ends, functools.partial(loop_experts, experts),
                                       group)
    return combine(y_PD, plan, out_dtype)


def use_reference_experts(layer: "torch.nn.Module") -> None:
    """Run `layer`'s (an MoELayer's) experts as the per-expert loop from now on (tests)."""
    experts = functools.partial(reference_moe_experts, group=layer.expert_group)
    layer.backend = dataclasses.replace(layer.backend, experts=experts)
