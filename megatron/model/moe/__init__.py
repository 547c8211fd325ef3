"""Mixture-of-experts layer: dispatch plan (dispatch.py), stacked-weight experts (experts.py),
the layer pipeline route -> dispatch -> experts -> combine (layer.py) and statistics (stats.py).
Routers live in megatron/model/mlp_gating.py."""

from megatron.model.moe.dispatch import DispatchPlan, combine, dispatch, make_plan
from megatron.model.moe.experts import Experts
from megatron.model.moe.layer import (MoELayer, MoEOutput, named_expert_parameters,
                                      shard_moe_layers_)
from megatron.model.moe.stats import MoEStats, compute_stats

__all__ = ["MoELayer", "MoEOutput", "shard_moe_layers_", "named_expert_parameters", "MoEStats", "Experts", "DispatchPlan", "make_plan",
           "dispatch", "combine", "compute_stats"]
