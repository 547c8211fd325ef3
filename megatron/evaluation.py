"""The evaluation pass (its micro-batch forward, shared with training: megatron/lm_forward.py).

`evaluate` returns the mean lm loss and, per MoE layer, what routing did over the evaluated
tokens (`EvalResult`): experts per token the router wanted and used (after capacity), the
dropped share of wanted pairs, expert FLOPs relative to computing every expert of the layer and
relative to the dense FFN, and the expert load. Statistics are summed on the device over the
batches and reduced over data-parallel ranks once at the end (one all-reduce, one host copy),
as the training interval statistics are (megatron/training_log.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.lm_forward import forward_lm
from megatron.training_log import MOE_FIELDS, moe_stats_tensors

_WANTED, _USED, _FLOPS_VS_DENSE = (MOE_FIELDS.index(name) for name in (
    "wanted_per_token", "used_per_token", "flops_vs_dense"))
MEAN_FIELDS = ("wanted_per_token", "used_per_token", "dropped_fraction", "flops_vs_all",
               "flops_vs_dense")


@dataclass(frozen=True)
class MoELayerEval:
    """One MoE layer over an evaluation.

    wanted_per_token / used_per_token: experts per token chosen by the router / computed after
    capacity (mean over all evaluated tokens); dropped_fraction: 1 - used / wanted over all
    pairs; flops_vs_all: used / E (expert FLOPs relative to every expert of the layer, what
    threshold 1.0 would compute without drops); flops_vs_dense: used * F_expert / F_dense
    (relative to the dense FFN); load_fractions: each expert's share of the kept pairs (sums
    to 1).
    """

    layer_number: int
    num_experts: int
    wanted_per_token: float
    used_per_token: float
    dropped_fraction: float
    flops_vs_all: float
    flops_vs_dense: float
    load_fractions: Tuple[float, ...]


@dataclass(frozen=True)
class EvalResult:
    """lm_loss: mean over micro-batches and ranks; tokens: tokens evaluated over all ranks."""

    lm_loss: float
    tokens: int
    moe_layers: List[MoELayerEval]

    @property
    def ppl(self) -> float:
        """Perplexity, exp(loss) with Megatron's cap of the exponent at 20."""
        return math.exp(min(20.0, self.lm_loss))

    @property
    def moe_mean(self) -> Optional[Dict[str, float]]:
        """MEAN_FIELDS averaged over the MoE layers (each layer counts once); None if dense."""
        if not self.moe_layers:
            return None
        return {name: float(np.mean([getattr(layer, name) for layer in self.moe_layers]))
                for name in MEAN_FIELDS}


def evaluate(model: torch.nn.Module, data_iterator: Iterator, num_iters: int,
             micro_batches_per_iter: int, device: torch.device) -> EvalResult:
    """Mean lm loss and MoE statistics over num_iters global batches (no grad, dropout off,
    eval capacity). All ranks must call it (one all-reduce at the end).

    Every micro-batch has the same number of tokens, so means of the per-batch means are means
    over all tokens; dropped_fraction is pooled over all pairs (1 - used / wanted).
    """
    # A DeepSpeed engine forwards train()/eval() to its module but keeps its own flag stale.
    was_training = getattr(model, "module", model).training
    model.eval()
    count = num_iters * micro_batches_per_iter
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    fields_sum = loads_sum = None
    layers: List[Tuple[int, int]] = []
    tokens = 0
    with torch.no_grad():
        for _ in range(count):
            lm_loss, out = forward_lm(model, next(data_iterator), device)
            loss_sum += lm_loss.float()
            tokens += out.loss.numel()
            if out.moe_stats:
                fields, loads = moe_stats_tensors(out.moe_stats)     # device ops only
                fields_sum = fields if fields_sum is None else fields_sum + fields
                loads_sum = loads if loads_sum is None else loads_sum + loads
                layers = [(s.layer_number, s.num_experts) for s in out.moe_stats]
    if was_training:
        model.train()
    parts = [loss_sum.view(1)]
    if fields_sum is not None:
        parts += [fields_sum.flatten(), loads_sum]
    flat = torch.cat(parts) / max(count, 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(flat)
        flat = flat / world
    host = flat.cpu().double().numpy()                  # the one device-to-host copy
    return EvalResult(lm_loss=float(host[0]), tokens=tokens * world,
                      moe_layers=_layer_results(host[1:], layers))


def _layer_results(rest: np.ndarray, layers: Sequence[Tuple[int, int]]) -> List[MoELayerEval]:
    """Per-layer results from the reduced [L, len(MOE_FIELDS)] field means (flops_vs_dense of
    a batch is kept * F_expert / (T * F_dense), so its mean is used * F_expert / F_dense) and
    the [sum E] load means."""
    if not layers:
        return []
    width = len(MOE_FIELDS)
    fields = rest[:len(layers) * width].reshape(len(layers), width)
    loads = rest[len(layers) * width:]
    out, start = [], 0
    for (number, experts), row in zip(layers, fields):
        load = loads[start:start + experts]
        start += experts
        wanted, used = float(row[_WANTED]), float(row[_USED])
        total = load.sum()
        out.append(MoELayerEval(
            layer_number=number, num_experts=experts, wanted_per_token=wanted,
            used_per_token=used, dropped_fraction=1.0 - used / wanted if wanted > 0 else 0.0,
            flops_vs_all=used / experts, flops_vs_dense=float(row[_FLOPS_VS_DENSE]),
            load_fractions=tuple(float(x) for x in (load / total if total > 0 else load))))
    return out
