"""Routers for MoE layers: threshold (XMoE), top-k, switch top-1 and hash routing.

Letters: T tokens, E experts, K choice slots per token (an upper bound: threshold routing uses
a different number of slots per token, given by the `wanted_TK` mask).

Every router is a pure function of the fp32 router logits (plus explicit noise / token ids)
returning a `RoutingDecision`. CONTRACT (filled in by the routers helper; do not change fields
without updating megatron/model/moe/*):
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RoutingDecision:
    """Which experts each token uses, with what weight, after capacity.

    experts_TK:   int64 [T, K]  expert at choice rank k (k = 0 most probable); valid ids everywhere
    weights_TK:   fp32  [T, K]  combine weight = raw softmax probability where kept, 0 elsewhere
                                (differentiable w.r.t. the logits)
    wanted_TK:    bool  [T, K]  the router chose this pair (before capacity)
    kept_TK:      bool  [T, K]  chosen and within its expert's capacity (subset of wanted_TK)
    probs_TK:     fp32  [T, K]  softmax probability of experts_TK (no grad needed; stats, priority)
    tokens_per_expert_E: int64 [E] kept pairs per expert
    aux_loss:     fp32 scalar   unscaled switch load-balancing loss (0 for hash routing)
    z_loss:       fp32 scalar   unscaled router z-loss mean(logsumexp(logits)^2) (0 for hash)
    top1_prob_T:  fp32  [T]     probability of each token's first choice (stats; detached)
    capacity:     Optional[int] per-expert capacity used (None when dropless)
    """

    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    wanted_TK: torch.Tensor
    kept_TK: torch.Tensor
    probs_TK: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    top1_prob_T: torch.Tensor
    capacity: Optional[int]
