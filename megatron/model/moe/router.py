"""Routers for MoE layers: threshold (XMoE), top-k, switch top-1 and hash routing.

Shapes: the letters of megatron/model/__init__.py (K choice slots per token is an upper bound:
threshold routing uses a different number of slots per token, given by the `wanted_TK` mask).

Every router is a pure function of the fp32 router logits (plus explicit noise / token ids)
returning a `RoutingDecision`: first the choice (which experts each token wants, in order), then
capacity (which of those pairs are kept) through a `CapacityFn`, so an MoE backend can apply
capacity its own way (`route_with_capacity`). The contract (consumed by megatron/model/moe/*;
change both together):

- Choice slots are ordered: slot k = 0 is each token's first choice (its most probable expert
  for threshold / top-k / switch, its hashed expert for hash routing). `wanted_TK` is a prefix
  of the slots of each token (always including slot 0), and `experts_TK` holds a valid expert
  id in every slot, wanted or not, so consumers may gather with it unmasked. A token's slots
  name distinct experts (count_per_expert and make_plan rely on it).
- Capacity keeps at most C pairs per expert, by priority: lower slot k first, then higher
  probability, then lower token index. Dropped pairs have `kept_TK` False and weight 0.
- `weights_TK` is the softmax probability over all E experts (not renormalised over the chosen
  ones; 1.0 for hash routing), carrying autograd to the logits. The MoE layer computes
  `sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_t)` over kept pairs.
- aux_loss / z_loss are unscaled fp32 scalars; the layer applies the coefficients.
- Nothing here synchronises with the host except hash routing's token-id range check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.config import MoEConfig


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


# ----------------------------------------------------------------------------- losses and noise

def load_balancing_loss(probs_TE: torch.Tensor, first_choice_T: torch.Tensor,
                        num_experts: int) -> torch.Tensor:
    """Switch-style balance loss E * sum_e mean_t p[t, e] * frac_t(first_choice_t == e).

    Equals 1 when routing is uniform. The dispatch fraction is a count (no gradient); gradient
    flows through the mean probability only (Fedus et al. 2021, eq. 4). Zero for T = 0.
    """
    num_tokens = probs_TE.shape[0]
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=probs_TE.device)
    counts_E.scatter_add_(0, first_choice_T, torch.ones_like(first_choice_T, dtype=torch.float32))
    denom = max(num_tokens, 1)
    mean_prob_E = probs_TE.float().sum(dim=0) / denom
    return num_experts * torch.sum(mean_prob_E * (counts_E / denom))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss mean_t logsumexp(logits_t)^2 (Zoph et al. 2022, eq. 5). 0 for T = 0."""
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return lse_T.square().sum() / max(lse_T.shape[0], 1)


def gumbel_noise_like(logits_TE: torch.Tensor, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
    """Gumbel(0, 1) noise -log(-log(U)), U ~ uniform[tiny, 1), fp32, shaped like the logits.

    U is clamped at the smallest normal fp32 so the noise stays finite (the lower tail ends
    near -4.5). `generator` (on the logits' device) makes the draw reproducible; None uses
    torch's global generator.
    """
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(logits_TE.shape, generator=generator, dtype=torch.float32,
                   device=logits_TE.device)
    return -torch.log(-torch.log(u.clamp_min(tiny)))


# ----------------------------------------------------------------------------- capacity

def count_per_expert(experts_TK: torch.Tensor, mask_TK: torch.Tensor,
                     num_experts: int) -> torch.Tensor:
    """int64 [E]: pairs of mask_TK per expert, without atomics contending on E bins.

    A token's slots name distinct experts, so adding its flags into a [T, E] grid never hits
    one cell twice; a column sum then counts. (scatter_add of T * K flags straight into E bins
    serialises ~T * K / E atomic adds per bin on a GPU.)
    """
    grid_TE = torch.zeros(experts_TK.shape[0], num_experts, dtype=torch.int32,
                          device=experts_TK.device)
    grid_TE.scatter_add_(1, experts_TK, mask_TK.to(torch.int32))
    return grid_TE.sum(dim=0, dtype=torch.int64)


def apply_capacity(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                   num_experts: int, capacity: Optional[int]) -> torch.Tensor:
    """Keep at most `capacity` wanted pairs per expert; return the bool mask kept_TK.

    Priority within an expert: lower choice slot k first (every first choice before any second
    choice), then higher probability, then lower token index. capacity None keeps every wanted
    pair (dropless); capacity 0 keeps none.
    """
    return capacity_and_counts(experts_TK, wanted_TK, probs_TK, num_experts, capacity)[0]


def capacity_and_counts(experts_TK: torch.Tensor, wanted_TK: torch.Tensor,
                        probs_TK: torch.Tensor, num_experts: int, capacity: Optional[int]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """apply_capacity's kept_TK, and the kept pairs per expert (int64 [E]).

    Sync-free and atomic-free: ONE stable sort of the flattened pairs (n = t * K + k) on an
    int64 key ((expert * K + k) << 31) | (2^31 - 1 - bits(prob)), unwanted pairs keyed
    (E * K) << 31 (after every expert). Non-negative fp32 values order like their IEEE bits
    read as integers (the sign bit is masked, so -0.0 ties with 0.0), so the key orders by
    (expert, k, -prob), and stability breaks ties by n, i.e. by lower token index. Binary
    search of each expert's first key in the sorted keys gives the expert's start; a pair is
    kept iff its sorted index minus its expert's start is < capacity.
    """
    if capacity is None:
        return wanted_TK.clone(), count_per_expert(experts_TK, wanted_TK, num_experts)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 (set by the capacity factors and "
                         f"--moe-min-capacity), got {capacity}")
    num_tokens, num_slots = experts_TK.shape
    if capacity >= num_tokens:
        # A token's slots name distinct experts, so no expert is wanted by more than T pairs:
        # capacity cannot bind, and the sort below would only confirm that.
        return wanted_TK.clone(), count_per_expert(experts_TK, wanted_TK, num_experts)
    device = experts_TK.device
    slot_1K = torch.arange(num_slots, device=device)
    group_TK = torch.where(wanted_TK, experts_TK * num_slots + slot_1K,
                           num_experts * num_slots)
    bits_TK = probs_TK.detach().float().contiguous().view(torch.int32) & 0x7FFFFFFF
    key_N = ((group_TK << 31) | (0x7FFFFFFF - bits_TK).long()).reshape(-1)
    sorted_key_N, order_N = torch.sort(key_N, stable=True)

    # start_E[e] = first sorted index of expert e; start_E[E] = number of wanted pairs.
    bounds_E = (torch.arange(num_experts + 1, device=device) * num_slots) << 31
    start_E = torch.searchsorted(sorted_key_N, bounds_E)
    sorted_expert_N = (sorted_key_N >> 31) // num_slots           # E for unwanted pairs
    position_N = torch.arange(key_N.numel(), device=device) - start_E[sorted_expert_N]
    kept_sorted_N = (sorted_expert_N < num_experts) & (position_N < capacity)

    kept_N = torch.empty_like(kept_sorted_N)
    kept_N[order_N] = kept_sorted_N
    tokens_per_expert_E = torch.diff(start_E).clamp(max=capacity)
    return kept_N.view(num_tokens, num_slots), tokens_per_expert_E


# (experts_TK, wanted_TK, probs_TK, num_experts, capacity) -> (kept_TK, kept pairs per expert,
# extra). `extra` is whatever the implementation computed beside the decisions, handed back by
# route_with_capacity and opaque here: torch_capacity's is None; the MoE backends' capacity
# strategies (moe/backend.py) return the dispatch plan's rows there, which they compute in the
# same pass, so the plan builder gets them without the decision carrying them.
CapacityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Optional[int]],
                      Tuple[torch.Tensor, torch.Tensor, Any]]


def torch_capacity(experts_TK: torch.Tensor, wanted_TK: torch.Tensor, probs_TK: torch.Tensor,
                   num_experts: int, capacity: Optional[int]
                   ) -> Tuple[torch.Tensor, torch.Tensor, None]:
    """capacity_and_counts as a CapacityFn (nothing extra)."""
    kept_TK, tokens_per_expert_E = capacity_and_counts(experts_TK, wanted_TK, probs_TK,
                                                       num_experts, capacity)
    return kept_TK, tokens_per_expert_E, None


# ----------------------------------------------------------------------------- routers

def _check_logits(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.dim() != 2 or logits_TE.shape[1] < 1:
        raise ValueError(f"router logits must be [tokens, experts >= 1], "
                         f"got {tuple(logits_TE.shape)}")
    return logits_TE.float()  # routing math is fp32 whatever the model dtype (cast keeps autograd)


# A softmax router's choice: (fp32 logits_TE, probs_TE, experts_TK, wanted_TK).
_Choice = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _decide(choice: _Choice, capacity: Optional[int], capacity_fn: CapacityFn
            ) -> Tuple[RoutingDecision, Any]:
    """Shared tail of the softmax routers: capacity, weights, counts and losses; and the
    capacity function's extra value."""
    logits_TE, probs_TE, experts_TK, wanted_TK = choice
    num_experts = probs_TE.shape[1]
    picked_TK = probs_TE.gather(1, experts_TK)                  # keeps autograd to the logits
    probs_TK = picked_TK.detach()
    kept_TK, tokens_per_expert_E, extra = capacity_fn(experts_TK, wanted_TK, probs_TK,
                                                      num_experts, capacity)
    return RoutingDecision(
        experts_TK=experts_TK,
        weights_TK=torch.where(kept_TK, picked_TK, 0.0),
        wanted_TK=wanted_TK,
        kept_TK=kept_TK,
        probs_TK=probs_TK,
        tokens_per_expert_E=tokens_per_expert_E,
        aux_loss=load_balancing_loss(probs_TE, experts_TK[:, 0], num_experts),
        z_loss=router_z_loss(logits_TE),
        top1_prob_T=probs_TK[:, 0],
        capacity=capacity,
    ), extra


def threshold_route(logits_TE: torch.Tensor, threshold: float, capacity: Optional[int],
                    max_experts: Optional[int] = None) -> RoutingDecision:
    """XMoE threshold routing (see _threshold_choice) with capacity `capacity` (None: dropless)."""
    return _decide(_threshold_choice(logits_TE, threshold, max_experts), capacity,
                   torch_capacity)[0]


# (probs_TE, threshold, num_slots) -> (experts_TK, wanted_TK): the threshold router's ranked
# slots (see _threshold_choice), decided from fp32 probabilities; an MoE backend may compute
# them its own way (moe/backend.py), with the same decisions.
ThresholdSlotsFn = Callable[[torch.Tensor, float, int], Tuple[torch.Tensor, torch.Tensor]]


def torch_threshold_slots(probs_TE: torch.Tensor, threshold: float, num_slots: int
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A stable descending sort, an fp64 prefix sum and the comparison (see _threshold_choice)."""
    sorted_TE, order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    sorted_TK, experts_TK = sorted_TE[:, :num_slots], order_TE[:, :num_slots]
    before_TK = F.pad(torch.cumsum(sorted_TK.double(), dim=-1)[:, :-1], (1, 0)).float()
    wanted_TK = before_TK < threshold        # fp32 tensor vs Python float: compared in fp32
    return experts_TK, wanted_TK


def _threshold_choice(logits_TE: torch.Tensor, threshold: float, max_experts: Optional[int],
                      slots_fn: ThresholdSlotsFn = torch_threshold_slots) -> _Choice:
    """XMoE threshold routing (Yang et al. 2024, sec. 3.2): the fewest experts whose mass >= t.

    Experts are ranked by probability (stable: ties go to the lower expert index) and a token
    takes the expert at rank j iff the probability of the experts ranked before it is < t, so
    the expert that crosses t is included and every token takes >= 1 expert. K = E, or
    min(max_experts, E) with the optional cap.

    Numerics: prefix sums accumulate in fp64 and are rounded to fp32, then compared with t
    rounded to fp32. This is what torch.cumsum does for fp32 on CPU; asking for it explicitly
    keeps CUDA (whose fp32 scan order differs) on the same decisions. fp32 probabilities can
    sum to just under 1, so t = 1.0 may take all E experts; that is the defined behaviour.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    if max_experts is not None and max_experts < 1:
        raise ValueError(f"--threshold-max-experts must be >= 1, got {max_experts}")
    logits_TE = _check_logits(logits_TE)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    num_experts = probs_TE.shape[1]
    num_slots = num_experts if max_experts is None else min(max_experts, num_experts)

    experts_TK, wanted_TK = slots_fn(probs_TE, threshold, num_slots)
    return logits_TE, probs_TE, experts_TK, wanted_TK


def topk_route(logits_TE: torch.Tensor, k: int, capacity: Optional[int],
               noise_TE: Optional[torch.Tensor] = None) -> RoutingDecision:
    """Top-k routing (see _topk_choice) with capacity `capacity` (None: dropless)."""
    return _decide(_topk_choice(logits_TE, k, noise_TE), capacity, torch_capacity)[0]


def _topk_choice(logits_TE: torch.Tensor, k: int, noise_TE: Optional[torch.Tensor]) -> _Choice:
    """Top-k routing; K = k, every slot wanted.

    The first choice is argmax of the softmax probabilities (ties: lowest index). The other
    k - 1 differ between training and evaluation:
      - training (noise_TE given): the k - 1 largest of logits + noise over the experts other
        than the first choice, by noised value descending (ties: lower index), as in
        DeepSpeed / XMoE top-2 gating with Gumbel noise on the second choice;
      - evaluation (noise_TE None): plain top-k of the probabilities (stable descending sort).
    Either way the combine weight of a kept pair is its raw softmax probability (of the
    un-noised logits); noise only changes which experts are chosen.
    """
    logits_TE = _check_logits(logits_TE)
    num_tokens, num_experts = logits_TE.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"--topk must be in [1, num_experts={num_experts}], got {k}")
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if noise_TE is None or k == 1:
        experts_TK = torch.sort(probs_TE.detach(), dim=-1, descending=True,
                                stable=True).indices[:, :k]
    else:
        if noise_TE.shape != logits_TE.shape:
            raise ValueError(f"noise shape {tuple(noise_TE.shape)} != logits shape "
                             f"{tuple(logits_TE.shape)}")
        # the first of a stable descending sort, without sorting: argmax returns the first
        # maximal index
        first_T1 = probs_TE.detach().argmax(dim=-1, keepdim=True)
        noised_TE = logits_TE.detach() + noise_TE.to(torch.float32)
        noised_order_TE = torch.sort(noised_TE, dim=-1, descending=True, stable=True).indices
        # Drop the first choice from the noised ranking: slots at or after its position shift
        # by one. (Masking it to -inf instead would misorder rows whose logits are -inf.)
        first_pos_T1 = (noised_order_TE == first_T1).long().argmax(dim=-1, keepdim=True)
        slot_1K = torch.arange(k - 1, device=logits_TE.device).unsqueeze(0)   # the k - 1 later
        rest_TK = noised_order_TE.gather(1, slot_1K + (slot_1K >= first_pos_T1).long())
        experts_TK = torch.cat([first_T1, rest_TK], dim=1)
    wanted_TK = torch.ones((num_tokens, k), dtype=torch.bool, device=logits_TE.device)
    return logits_TE, probs_TE, experts_TK, wanted_TK


def switch_route(logits_TE: torch.Tensor, capacity: Optional[int]) -> RoutingDecision:
    """Switch Transformer top-1 routing (Fedus et al. 2021): K = 1, weight = top-1 probability."""
    return topk_route(logits_TE, 1, capacity)


def make_hash_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """Frozen random token -> expert map (Roller et al. 2021, "Hash Layers"), int64 [V] on CPU.

    A seeded random permutation of arange(V) taken mod E: every expert owns floor(V / E) or
    ceil(V / E) token ids, so all experts are used when V >= E. Same seed, same table.
    """
    if vocab_size < 1 or num_experts < 1:
        raise ValueError(f"hash table needs vocab_size >= 1 and num_experts >= 1, "
                         f"got {vocab_size}, {num_experts}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=generator) % num_experts


def hash_route(token_ids_T: Optional[torch.Tensor], hash_table_V: Optional[torch.Tensor],
               num_experts: int, capacity: Optional[int]) -> RoutingDecision:
    """Hash routing (see _hash_decide) with capacity `capacity` (None: dropless)."""
    return _hash_decide(token_ids_T, hash_table_V, num_experts, capacity, torch_capacity)[0]


def _hash_decide(token_ids_T: Optional[torch.Tensor], hash_table_V: Optional[torch.Tensor],
                 num_experts: int, capacity: Optional[int], capacity_fn: CapacityFn
                 ) -> Tuple[RoutingDecision, Any]:
    """Hash routing: expert = hash_table_V[token_id], weight 1, K = 1, no router losses.

    With capacity, the earlier tokens of an expert are kept (every probability is 1). The
    token-id range check reads one value on the host; hash layers are a baseline, not the
    hot path.
    """
    if token_ids_T is None or hash_table_V is None:
        raise ValueError("hash routing (--use-hash-layer) needs token ids and a hash table")
    vocab_size = hash_table_V.shape[0]
    token_ids_T = token_ids_T.reshape(-1)
    if token_ids_T.numel() and bool(((token_ids_T < 0) | (token_ids_T >= vocab_size)).any()):
        raise ValueError(f"token ids must be in [0, {vocab_size}) (the hash table's vocab_size)")
    device = token_ids_T.device
    experts_TK = hash_table_V.to(device)[token_ids_T].long().unsqueeze(1)
    ones_TK = torch.ones(experts_TK.shape, dtype=torch.float32, device=device)
    wanted_TK = torch.ones(experts_TK.shape, dtype=torch.bool, device=device)
    kept_TK, tokens_per_expert_E, extra = capacity_fn(experts_TK, wanted_TK, ones_TK,
                                                      num_experts, capacity)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return RoutingDecision(
        experts_TK=experts_TK, weights_TK=kept_TK.float(), wanted_TK=wanted_TK,
        kept_TK=kept_TK, probs_TK=ones_TK, tokens_per_expert_E=tokens_per_expert_E,
        aux_loss=zero, z_loss=zero.clone(), top1_prob_T=ones_TK[:, 0], capacity=capacity), extra


# ----------------------------------------------------------------------------- dispatcher

def route(logits_TE: Optional[torch.Tensor], config: MoEConfig, num_experts: int, *,
          training: bool, token_ids_T: Optional[torch.Tensor] = None,
          hash_table_V: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None,
          noise_TE: Optional[torch.Tensor] = None) -> RoutingDecision:
    """Route with the router `config.router` names, at the train or eval capacity.

    Top-k draws Gumbel noise (from `generator`) only when training and k > 1, unless the
    caller drew it already (`noise_TE`, used only then). Hash routing reads token ids and the
    table instead of the logits, which may then be None.
    """
    return route_with_capacity(logits_TE, config, num_experts, torch_capacity,
                               training=training, token_ids_T=token_ids_T,
                               hash_table_V=hash_table_V, generator=generator,
                               noise_TE=noise_TE)[0]


def route_with_capacity(logits_TE: Optional[torch.Tensor], config: MoEConfig, num_experts: int,
                        capacity_fn: CapacityFn, *, training: bool,
                        token_ids_T: Optional[torch.Tensor] = None,
                        hash_table_V: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None,
                        noise_TE: Optional[torch.Tensor] = None,
                        threshold_slots: ThresholdSlotsFn = torch_threshold_slots
                        ) -> Tuple[RoutingDecision, Any]:
    """route() with capacity applied by `capacity_fn` (and the threshold router's slots by
    `threshold_slots`); returns the decision and the capacity function's extra value (an MoE
    backend's dispatch rows: see CapacityFn)."""
    if config.router == "hash":
        num_tokens = 0 if token_ids_T is None else token_ids_T.numel()
        capacity = config.capacity(num_tokens, num_experts, training)
        return _hash_decide(token_ids_T, hash_table_V, num_experts, capacity, capacity_fn)
    if logits_TE is None or logits_TE.dim() != 2 or logits_TE.shape[1] != num_experts:
        shape = None if logits_TE is None else tuple(logits_TE.shape)
        raise ValueError(f"router logits must be [tokens, {num_experts}], got {shape}")
    capacity = config.capacity(logits_TE.shape[0], num_experts, training)
    if config.router == "threshold":
        choice = _threshold_choice(logits_TE, config.threshold, config.threshold_max_experts,
                                   threshold_slots)
    elif config.router in ("topk", "switch"):
        k = config.topk if config.router == "topk" else 1
        if not (training and k > 1):
            noise_TE = None
        elif noise_TE is None:
            noise_TE = gumbel_noise_like(logits_TE, generator)
        choice = _topk_choice(logits_TE, k, noise_TE)
    else:
        raise AssertionError(f"unhandled router {config.router!r}")  # MoEConfig validates it
    return _decide(choice, capacity, capacity_fn)
