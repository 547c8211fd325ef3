"""Mixture-of-experts layer, read top-down: router (router.py) -> plan (dispatch.py) -> experts
(experts.py) -> combine (dispatch.py), assembled by layer.py. backend.py is the one place that
says which implementation runs each step: torch ops, or the Triton operations of ops.py (autograd
Functions and the capacity strategy) over the raw kernels of kernels/. expert_parallel.py runs
the experts across ranks, stats.py summarises a layer's routing, and reference.py is the
per-expert loop the tests check every backend against. megatron/model/mlp_gating.py re-exports
the routers (the original layout's public module). Shape letters: megatron/model/__init__.py.
"""

from megatron.model.moe.backend import Backend, resolve_backend
from megatron.model.moe.dispatch import DispatchPlan, combine, dispatch, make_plan
from megatron.model.moe.experts import Experts
from megatron.model.moe.layer import (MoELayer, MoEOutput, named_expert_parameters,
                                      shard_moe_layers_)
from megatron.model.moe.router import RoutingDecision, route
from megatron.model.moe.stats import MoEStats, compute_stats

__all__ = ["MoELayer", "MoEOutput", "shard_moe_layers_", "named_expert_parameters", "MoEStats",
           "Experts", "DispatchPlan", "make_plan", "dispatch", "combine", "compute_stats",
           "Backend", "resolve_backend", "RoutingDecision", "route"]
