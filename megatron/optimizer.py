"""Optimizer parameter groups (weight decay, MoE expert groups) and the AdamW optimizer.

Weight decay follows Megatron's `get_params_for_weight_decay_optimization`: every weight decays
(embeddings and the MoE router `gate_weight` included; Megatron-DeepSpeed's gate `wg` is an
ordinary Linear weight, decayed, and DeepSpeed does not special-case it), biases and LayerNorm
parameters do not. Expert biases `b1`/`b2` are biases.

With create_moe_param_group the expert parameters (those under each `MoELayer.experts`) go into
their own groups, marked the way DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`
marks them: `{"moe": True, "name": <expert group name>}`, one group per weight-decay value.

The expert parameters are NOT tagged `allreduce = False` / `group_name` (DeepSpeed's expert-param
attributes): DeepSpeed's engine only sets up expert process groups when the model contains its
own `deepspeed.moe.layer.MoE` modules; with our MoELayer a tagged parameter makes
`deepspeed.initialize` fail (`_broadcast_model`: "expert data parallel group is not
initialized") and, with the groups created by hand, backward fail (KeyError in
`_get_gradients_for_reduction`). Our experts are replicated on every data-parallel rank (no
expert parallelism), so DeepSpeed's dense all-reduce over the data-parallel group is the right
reduction for them. With expert parallelism (--moe-expert-parallel-size > 1) they ARE tagged, and
megatron/expert_groups.py makes the engine accept the tags.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from megatron.model.moe import named_expert_parameters
from megatron.model.moe.experts import Experts

logger = logging.getLogger(__name__)

EXPERT_GROUP_NAME = "ep_size_1"   # DeepSpeed's name for the expert group of expert-parallel size 1


def _no_weight_decay(module: nn.Module, name: str) -> bool:
    """Biases and normalisation parameters (LayerNorm, RMSNorm, apex fused norms)."""
    if isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__:
        return True
    if name == "bias":
        return True
    return isinstance(module, Experts) and name in ("b1", "b2")


def expert_parameter_ids(model: nn.Module) -> Set[int]:
    """ids of the parameters inside every MoELayer's `experts` (not the router)."""
    return {id(p) for p in named_expert_parameters(model).values()}


def _named_trainable(model: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Parameter]]:
    """(owning module, local name, parameter) once per distinct trainable parameter."""
    seen: Set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield module, name, p


def param_groups(model: nn.Module, weight_decay: float,
                 create_moe_param_group: bool = False,
                 expert_group_name: str = EXPERT_GROUP_NAME) -> List[Dict[str, Any]]:
    """Optimizer groups: each trainable parameter exactly once; empty groups left out.

    Groups: {"name": "decay"} and {"name": "no_decay", "weight_decay": 0.0}; with
    create_moe_param_group also {"name": expert_group_name, "moe": True} for decayed and for
    non-decayed expert parameters. Every group has "name", "weight_decay" and "params".
    """
    experts = expert_parameter_ids(model) if create_moe_param_group else set()
    buckets: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for module, name, p in _named_trainable(model):
        key = (id(p) in experts, not _no_weight_decay(module, name))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (is_expert, decays), params in sorted(buckets.items()):
        group: Dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_expert:
            group.update(name=expert_group_name, moe=True)
        else:
            group["name"] = "decay" if decays else "no_decay"
        groups.append(group)
    return groups


def build_optimizer(model: nn.Module, config: Any, use_apex: bool = False,
                    expert_group_name: Optional[str] = None,
                    master_weights: bool = False) -> torch.optim.Optimizer:
    """AdamW over `param_groups(model, ...)` with config's lr, betas, eps and weight decay.

    expert_group_name (expert parallelism, "ep_size_N"): expert parameters always go into
    their own MoE groups of that name, whatever config.create_moe_param_group says (DeepSpeed
    reduces and partitions them over the expert-data-parallel group of that name).
    master_weights: AdamW on fp32 master copies of the bf16 parameters
    (megatron.mixed_precision.MasterWeightAdamW; bf16 without DeepSpeed's wrapper).

    torch's fused AdamW when every parameter is on CUDA, its foreach path otherwise. With
    use_apex, apex's FusedAdam (AdamW mode) if apex is importable, else torch's with a warning.
    Gradient clipping (config.clip_grad) belongs to the DeepSpeed config, not the optimizer.
    """
    if expert_group_name is None:
        groups = param_groups(model, config.weight_decay, config.create_moe_param_group)
    else:
        groups = param_groups(model, config.weight_decay, True, expert_group_name)
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    if use_apex:
        try:
            from apex.optimizers import FusedAdam  # optional accelerator, imported lazily
        except ImportError:
            logger.warning("apex FusedAdam requested but apex is not importable; "
                           "using torch.optim.AdamW")
        else:
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
    if master_weights:
        from megatron.mixed_precision import MasterWeightAdamW
        return MasterWeightAdamW(groups, **kwargs)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if on_cuda:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)
