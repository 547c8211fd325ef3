"""Expert parallelism in training: DeepSpeed's process groups, and making its engine treat our
expert parameters as expert parameters.

Groups (DeepSpeed's `groups._create_expert_and_data_parallel`, named "ep_size_N"): with world
size W and expert-parallel size N, ranks [k N, (k + 1) N) form expert-parallel group k (they
exchange tokens, each holding E / N experts of every MoE layer); ranks with the same position in
their group form an expert-data-parallel group of W / N ranks holding the same experts.

DeepSpeed reduces a parameter's gradient over the expert-data-parallel group, and ZeRO partitions
its optimizer state there, when the parameter is tagged `allreduce = False`, `group_name = name`,
sits in an optimizer group marked {"moe": True, "name": name}, AND the engine found a module of
its own MoE class in the model (`isinstance(m, deepspeed.moe.layer.MoE)`; otherwise it ignores the
tags and fails). Our MoELayer is not that class, so `attach_deepspeed_moe_marker` adds one
parameterless instance of it: its only job is to switch on the engine's expert handling. It owns
no experts, so DeepSpeed writes no per-expert checkpoint files for it: our checkpoints store the
expert shards themselves (megatron/checkpointing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from megatron.model.moe import MoELayer, named_expert_parameters


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's expert-parallel (EP) and expert-data-parallel (EDP) groups."""

    name: str                               # DeepSpeed's group name, "ep_size_N"
    size: int                               # N
    rank: int                               # position in the EP group
    group: dist.ProcessGroup                # EP group: all_to_all of the dispatch rows
    data_parallel_group: dist.ProcessGroup  # EDP group: reduces this rank's expert gradients
    data_parallel_rank: int
    data_parallel_size: int


def group_name(expert_parallel_size: int) -> str:
    return f"ep_size_{expert_parallel_size}"


def create_expert_parallel_groups(expert_parallel_size: int) -> ExpertParallelGroups:
    """Create (once) DeepSpeed's groups of size N; every rank must call."""
    from deepspeed.utils import groups  # heavy; only when training

    world = dist.get_world_size()
    if expert_parallel_size < 1 or world % expert_parallel_size:
        raise ValueError(f"the world size ({world}) must be divisible by "
                         f"--moe-expert-parallel-size ({expert_parallel_size})")
    name = group_name(expert_parallel_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(expert_parallel_size)
    ep, edp = groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
    return ExpertParallelGroups(name=name, size=expert_parallel_size, rank=dist.get_rank(ep),
                                group=ep, data_parallel_group=edp,
                                data_parallel_rank=dist.get_rank(edp),
                                data_parallel_size=dist.get_world_size(edp))


def expert_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of every MoELayer's experts (router excluded)."""
    return list(named_expert_parameters(model).values())


def tag_expert_parameters(model: nn.Module, name: str) -> None:
    """DeepSpeed's expert-parameter attributes (see the module docstring)."""
    for p in expert_parameters(model):
        p.allreduce = False
        p.group_name = name


def attach_deepspeed_moe_marker(model: nn.Module, ep: ExpertParallelGroups) -> None:
    """Add the parameterless DeepSpeed-MoE instance that switches on the engine's expert
    handling (see the module docstring); call before deepspeed.initialize."""
    from deepspeed.moe.layer import MoE  # heavy; only when training

    class DeepSpeedMoEMarker(MoE):
        """Stands for our MoE layers in DeepSpeed's engine; owns nothing, never runs."""

        def __init__(self, num_experts: int) -> None:
            nn.Module.__init__(self)            # not MoE.__init__: it would build experts
            self.num_experts = num_experts
            self.ep_size = ep.size
            self.expert_group_name = ep.name
            self.num_local_experts = 0          # no DeepSpeed per-expert checkpoint files

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False):
            pass                                # the groups exist already

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker, not a layer")

    num_experts = max((m.num_experts for m in model.modules() if isinstance(m, MoELayer)),
                      default=0)
    model.add_module("deepspeed_moe_marker", DeepSpeedMoEMarker(num_experts))


def global_grad_norm(model: nn.Module, ep: ExpertParallelGroups | None) -> torch.Tensor:
    """L2 norm of all gradients after the data-parallel reduction, each parameter once.

    Non-expert gradients are identical on every rank; expert gradients are identical within an
    expert-data-parallel group and differ across the expert-parallel group, so their squares
    are summed over the EP group (DeepSpeed's stage-0 fp32 clipping averages per-rank norms
    instead, which mixes shards: we clip ourselves there). Multi-tensor (foreach) norms: a few
    kernels per step, no host sync.
    """
    experts = {id(p) for p in expert_parameters(model)} if ep is not None else set()
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if id(p) in experts else dense).append(p.grad.detach())
    device = next(model.parameters()).device
    dense_sq, expert_sq = _sum_of_squares(dense, device), _sum_of_squares(expert, device)
    if ep is not None:
        dist.all_reduce(expert_sq, group=ep.group)
    return (dense_sq + expert_sq).sqrt()


def _sum_of_squares(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp32 sum of squares of all `grads` (bf16 ones included: each norm is taken in fp32).

    One foreach norm per dtype: torch's multi-tensor kernel takes a list of one dtype only, and
    a mixed list (bf16 grads with the fp32 router weights') falls back to one reduction kernel
    per tensor."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for group in by_dtype.values()
             for n in torch._foreach_norm(group, 2.0, dtype=torch.float32)]
    return torch.stack(norms).square().sum()


def clip_gradients_(model: nn.Module, max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_norm / (total_norm + 1e-6)) (DeepSpeed's rule), with
    multi-tensor kernels."""
    torch.nn.utils.clip_grads_with_norm_(list(model.parameters()), max_norm, total_norm)
