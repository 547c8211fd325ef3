"""Routers for MoE layers (threshold / XMoE, top-k, switch, hash): the public module.

The XMoE fork and its users' scripts import routers from here; the code lives in
megatron/model/moe/router.py (the MoE package reads router -> plan -> experts -> combine).
"""

from megatron.model.moe.router import (CapacityFn, RoutingDecision, apply_capacity,
                                       capacity_and_counts, count_per_expert, gumbel_noise_like,
                                       hash_route, load_balancing_loss, make_hash_table, route,
                                       route_with_capacity, router_z_loss, switch_route,
                                       threshold_route, topk_route, torch_capacity)

__all__ = ["RoutingDecision", "CapacityFn", "route", "route_with_capacity", "threshold_route",
           "topk_route", "switch_route", "hash_route", "make_hash_table", "apply_capacity",
           "capacity_and_counts", "count_per_expert", "torch_capacity", "load_balancing_loss",
           "router_z_loss", "gumbel_noise_like"]
