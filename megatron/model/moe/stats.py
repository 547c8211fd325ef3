"""Per-layer MoE statistics, computed from a RoutingDecision with tensor ops only (no host sync).

Shapes: the letters of megatron/model/__init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.model.moe.router import RoutingDecision

@dataclass(frozen=True)
class MoEStats:
    """Detached statistics of one MoE layer's forward (tensors stay on the device; read lazily).

    wanted_per_token: mean experts per token chosen by the router (before capacity)
    used_per_token:   mean experts per token after capacity
    dropped_fraction: dropped pairs / wanted pairs
    expert_load_E:    int64 [E] kept pairs per expert
    top1_prob_median: fp32 median of each token's top-1 probability (linear interpolation,
                      torch.quantile's q = 0.5; the log's top-1 p50)
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
    top1_prob_median: torch.Tensor
    flops_vs_topk: torch.Tensor
    flops_vs_dense: torch.Tensor
    token_experts_TK: Optional[torch.Tensor] = None


def interpolated_median(values_T: torch.Tensor) -> torch.Tensor:
    """torch.quantile(values, 0.5) (linear interpolation) without a host sync: torch.quantile
    checks a tensor q on the host; the two middle positions come from the static size.

    Only the median: the statistics run at every MoE layer's every step, where each small op
    is host time in eager training (the other quantiles this once computed were never read).
    """
    values = values_T.detach().float().reshape(-1)
    n = values.numel()
    if n == 0:
        return values.new_full((), float("nan"))
    lo = (n - 1) // 2
    middle = torch.sort(values).values[lo:lo + 2]
    return middle.mean() if n % 2 == 0 else middle[0]


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
        top1_prob_median=interpolated_median(decision.top1_prob_T),
        flops_vs_topk=kept / (t * topk),
        flops_vs_dense=kept * expert_ffn_hidden_size / (t * dense_ffn_hidden_size),
    )


@torch.no_grad()
def token_experts(decision: RoutingDecision) -> torch.Tensor:
    """int64 [T, K]: the experts each token uses (kept pairs, in choice order), -1 in its other
    slots (not chosen, or dropped by capacity). One device op, no host sync."""
    return torch.where(decision.kept_TK, decision.experts_TK, -1)
