"""Per-layer MoE statistics, computed from a RoutingDecision with tensor ops only (no host sync).

Shapes: the letters of megatron/model/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.model.moe.router import RoutingDecision

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class MoEStats:
    """Detached statistics of one MoE layer's forward (tensors stay on the device; read lazily).

    wanted_per_token: mean experts per token chosen by the router (before capacity)
    used_per_token:   mean experts per token after capacity
    dropped_fraction: dropped pairs / wanted pairs
    expert_load_E:    int64 [E] kept pairs per expert
    top1_prob_quantiles: fp32 [5] of each token's top-1 probability at q = QUANTILES
    flops_vs_topk:    kept pairs / (T * topk): expert FLOPs relative to a top-k router
    flops_vs_dense:   kept pairs * F_expert / (T * F_dense): relative to the dense FFN
    token_experts_TK: int64 [T, K] each token's kept experts in choice order (most probable
                      first), -1 in the slots it does not use; only with the MoE layer's
                      record_experts (generation), else None: training never computes it
    """

    layer_number: int
    num_experts: int
    wanted_per_token: torch.Tensor
    used_per_token: torch.Tensor
    dropped_fraction: torch.Tensor
    expert_load_E: torch.Tensor
    top1_prob_quantiles: torch.Tensor
    flops_vs_topk: torch.Tensor
    flops_vs_dense: torch.Tensor
    token_experts_TK: Optional[torch.Tensor] = None


def sorted_quantiles(values_T: torch.Tensor, qs=QUANTILES) -> torch.Tensor:
    """Linear-interpolation quantiles (torch.quantile's default) without a host sync.

    torch.quantile checks a tensor q on the host, and building index tensors from Python lists
    costs a host-to-device copy; positions come from the static T, and each quantile is a view
    of the sorted values combined with Python-float weights.
    """
    values = values_T.detach().float().reshape(-1)
    n = values.numel()
    if n == 0:
        return values.new_full((len(qs),), float("nan"))
    sorted_T = torch.sort(values).values
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(sorted_T[lo] * (1.0 - frac) + sorted_T[hi] * frac)
    return torch.stack(out)


@torch.no_grad()
def compute_stats(decision: RoutingDecision, layer_number: int, topk: int,
                  expert_ffn_hidden_size: int, dense_ffn_hidden_size: int) -> MoEStats:
    """Statistics of `decision` (see MoEStats); T is taken from its static shape."""
    T = decision.experts_TK.shape[0]
    E = decision.tokens_per_expert_E.shape[0]
    wanted = decision.wanted_TK.sum().float()
    kept = decision.kept_TK.sum().float()
    t = float(max(T, 1))
    return MoEStats(
        layer_number=layer_number,
        num_experts=E,
        wanted_per_token=wanted / t,
        used_per_token=kept / t,
        dropped_fraction=(wanted - kept) / wanted.clamp(min=1.0),
        expert_load_E=decision.tokens_per_expert_E.detach().to(torch.int64).clone(),
        top1_prob_quantiles=sorted_quantiles(decision.top1_prob_T),
        flops_vs_topk=kept / (t * topk),
        flops_vs_dense=kept * expert_ffn_hidden_size / (t * dense_ffn_hidden_size),
    )


@torch.no_grad()
def token_experts(decision: RoutingDecision) -> torch.Tensor:
    """int64 [T, K]: the experts each token uses (kept pairs, in choice order), -1 in its other
    slots (not chosen, or dropped by capacity). One device op, no host sync."""
    return torch.where(decision.kept_TK, decision.experts_TK, -1)
