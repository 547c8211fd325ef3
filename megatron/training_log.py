"""What the training loop reports: interval statistics, Megatron's log lines, TensorBoard, FLOPs.

Per-step values stay on the device (losses, MoE statistics, a computed grad norm) and are summed
into an `IntervalStats`; at each log interval one all-reduce (mean over data-parallel ranks) and
ONE device-to-host copy turn them into an `IntervalSummary`, so logging costs no host sync per
step. Every rank calls `IntervalStats.reduce` (it is a collective); rank 0 prints and writes.
Evaluations (megatron/evaluation.EvalResult) are printed and written here too.

Expert load balance is reported relative to the mean load (`load_balance`): min, max and
standard deviation of (each expert's kept pairs / the mean over the layer's experts), so 1, 1, 0
is a perfectly balanced layer whatever its number of experts (max over mean E: one expert took
everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.model.moe.stats import MoEStats

if TYPE_CHECKING:
    from megatron.evaluation import EvalResult

# Columns of the per-layer MoE statistics summed per step: [L, len(MOE_FIELDS)].
MOE_FIELDS = ("wanted_per_token", "used_per_token", "dropped_fraction", "top1_p50",
              "flops_vs_topk", "flops_vs_dense")


def moe_stats_tensors(stats: Sequence[MoEStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fields [L, 6] fp32, expert loads [sum of E] fp32) of one forward; device ops only."""
    fields = torch.stack([torch.stack([s.wanted_per_token, s.used_per_token, s.dropped_fraction,
                                       s.top1_prob_median, s.flops_vs_topk,
                                       s.flops_vs_dense]).float() for s in stats])
    loads = torch.cat([s.expert_load_E.float() for s in stats])
    return fields, loads


@dataclass(frozen=True)
class StepReport:
    """One iteration: device tensors (lm_loss, aux_loss averaged over its micro-batches;
    grad_norm when computed on the device) and host values from the engine."""

    iteration: int
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    grad_norm: Optional[torch.Tensor | float]
    learning_rate: float
    loss_scale: float
    skipped: bool
    moe_fields: Optional[torch.Tensor]          # [L, 6] mean over micro-batches
    moe_loads: Optional[torch.Tensor]           # [sum E] mean over micro-batches


@dataclass(frozen=True)
class MoELayerSummary:
    layer_number: int
    values: dict                                # MOE_FIELDS -> mean over the interval
    load_fractions: np.ndarray                  # [E] share of kept pairs per expert


@dataclass(frozen=True)
class IntervalSummary:
    iterations: List[int]
    lm_losses: List[float]
    aux_losses: List[float]
    grad_norms: List[Optional[float]]
    learning_rates: List[float]
    loss_scales: List[float]
    skipped: List[bool]
    moe_layers: List[MoELayerSummary]

    @property
    def num_nan(self) -> int:
        return sum(not math.isfinite(x) for x in self.lm_losses)

    def mean(self, values: List[float]) -> float:
        """Mean over the iterations with a finite lm loss. Iterations whose update was skipped
        (fp16 overflow) count: their forward loss is valid, only their gradients overflowed,
        and so an interval of skipped iterations (a falling fp16 loss scale) still shows a loss."""
        kept = [v for v, lm in zip(values, self.lm_losses) if math.isfinite(lm)]
        return sum(kept) / len(kept) if kept else float("nan")


class IntervalStats:
    """Accumulates StepReports between two log lines (see the module docstring)."""

    def __init__(self, layer_numbers: Sequence[int], experts_per_layer: Sequence[int]) -> None:
        self.layer_numbers = list(layer_numbers)
        self.experts_per_layer = list(experts_per_layer)
        self.steps: List[StepReport] = []

    def add(self, step: StepReport) -> None:
        self.steps.append(step)

    def __len__(self) -> int:
        return len(self.steps)

    def reduce(self) -> IntervalSummary:
        """Mean over ranks, one host copy; clears the interval. All ranks must call it."""
        steps, self.steps = self.steps, []
        zero = torch.zeros((), dtype=torch.float32, device=steps[0].lm_loss.device)
        on_device = [isinstance(s.grad_norm, torch.Tensor) for s in steps]
        per_step = torch.stack([torch.stack([s.lm_loss.float(), s.aux_loss.float(),
                                             s.grad_norm.float() if dev else zero])
                                for s, dev in zip(steps, on_device)])          # [n, 3]
        parts = [per_step.flatten()]
        moe = [s for s in steps if s.moe_fields is not None]
        if moe:
            parts.append(torch.stack([s.moe_fields for s in moe]).mean(0).flatten())
            parts.append(torch.stack([s.moe_loads for s in moe]).mean(0))
        flat = torch.cat(parts)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            flat = flat / dist.get_world_size()
        host = flat.cpu().numpy().astype(np.float64)        # the one device-to-host copy
        n = len(steps)
        table = host[:3 * n].reshape(n, 3)
        grad_norms = [float(table[i, 2]) if dev else
                      (None if s.grad_norm is None else float(s.grad_norm))
                      for i, (s, dev) in enumerate(zip(steps, on_device))]
        return IntervalSummary(
            iterations=[s.iteration for s in steps], lm_losses=table[:, 0].tolist(),
            aux_losses=table[:, 1].tolist(), grad_norms=grad_norms,
            learning_rates=[s.learning_rate for s in steps],
            loss_scales=[s.loss_scale for s in steps], skipped=[s.skipped for s in steps],
            moe_layers=self._moe_summaries(host[3 * n:]) if moe else [])

    def _moe_summaries(self, rest: np.ndarray) -> List[MoELayerSummary]:
        num_layers, width = len(self.layer_numbers), len(MOE_FIELDS)
        fields = rest[:num_layers * width].reshape(num_layers, width)
        loads = rest[num_layers * width:]
        out, start = [], 0
        for k, (layer, experts) in enumerate(zip(self.layer_numbers, self.experts_per_layer)):
            load = loads[start:start + experts]
            start += experts
            total = load.sum()
            out.append(MoELayerSummary(layer, dict(zip(MOE_FIELDS, fields[k].tolist())),
                                       load / total if total > 0 else load))
        return out


# ----------------------------------------------------------------------------------------------
# FLOPs


@dataclass(frozen=True)
class FlopsModel:
    """Model FLOPs of one iteration, counted on ACTIVE parameters.

        FLOPs = c * (N_dense + sum_l u_l * P_l) * B * s  +  (2c) * L * h * s^2 * B

    with c = 6 (forward 2 + backward 4 per matmul weight and token; 8 with activation
    recomputation, one more forward), N_dense the matmul weights every token uses (all
    parameters except the expert weights and the position table, a lookup; the tied word
    embedding counts once, as the output layer), u_l the measured experts per token actually
    computed (after capacity) in MoE layer l and P_l the parameters of one of its experts,
    B the global batch in samples, s the sequence length, L layers, h hidden size. The second
    term is attention scores and their weighting (QK^T and AV: 2 * 2 * s^2 * h forward per layer
    and sample, times 3 for backward), full (not causal-halved), as Megatron counts it.
    """

    dense_params: int
    expert_params: tuple                        # P_l per MoE layer, in layer order
    num_layers: int
    hidden_size: int
    seq_length: int
    recompute: bool

    @classmethod
    def of_model(cls, model: torch.nn.Module, seq_length: int, recompute: bool) -> "FlopsModel":
        counts = model.parameter_counts()
        positions = model.embedding.position_embeddings.weight.numel()
        # The layer's own count: every rank's shard under expert parallelism (a count of the
        # local parameters would under-report every expert-parallel run's TFLOPs).
        per_expert = tuple(layer.mlp.num_expert_parameters() / layer.num_experts
                           for layer in model.transformer.layers if layer.is_moe)
        return cls(counts["non_expert"] - positions, per_expert, model.config.num_layers,
                   model.config.hidden_size, seq_length, recompute)

    def per_iteration(self, global_batch_size: int, used_per_token: Sequence[float]) -> float:
        c = 8.0 if self.recompute else 6.0
        active = self.dense_params + sum(u * p for u, p in zip(used_per_token,
                                                               self.expert_params))
        tokens = global_batch_size * self.seq_length
        attention = 2 * c * self.num_layers * self.hidden_size * self.seq_length ** 2
        return c * active * tokens + attention * global_batch_size


# ----------------------------------------------------------------------------------------------
# log lines


def iteration_line(summary: IntervalSummary, total_iters: int, consumed_samples: int,
                   elapsed_s: float, global_batch_size: int, seq_length: int,
                   tflops: float) -> str:
    """Megatron's iteration line over the interval that ends at summary.iterations[-1]."""
    n = len(summary.iterations)
    per_iter = elapsed_s / n
    grad_norm = summary.grad_norms[-1]
    parts = [f" iteration {summary.iterations[-1]:8d}/{total_iters:8d}",
             f" consumed samples: {consumed_samples:12d}",
             f" elapsed time per iteration (ms): {per_iter * 1000.0:.1f}",
             f" learning rate: {summary.learning_rates[-1]:.3E}",
             f" global batch size: {global_batch_size:5d}",
             f" lm loss: {summary.mean(summary.lm_losses):.6E}"]
    if summary.moe_layers:
        parts.append(f" moe aux loss: {summary.mean(summary.aux_losses):.6E}")
    parts += [f" loss scale: {summary.loss_scales[-1]:.1f}",
              f" grad norm: {'nan' if grad_norm is None else f'{grad_norm:.3f}'}",
              f" number of skipped iterations: {sum(summary.skipped):3d}",
              f" number of nan iterations: {summary.num_nan:3d}",
              f" samples per second: {global_batch_size / per_iter:.1f}",
              f" tokens per second: {global_batch_size * seq_length / per_iter:.0f}",
              f" TFLOPs: {tflops:.2f}"]
    return " |".join(parts) + " |"


def moe_lines(summary: IntervalSummary) -> List[str]:
    """One line per MoE layer: routing statistics averaged over the interval."""
    lines = []
    for layer in summary.moe_layers:
        v = layer.values
        lines.append(f"   moe layer {layer.layer_number}: experts/token wanted "
                     f"{v['wanted_per_token']:.2f} used {v['used_per_token']:.2f} | dropped "
                     f"{100.0 * v['dropped_fraction']:.1f}% | top1 p50 {v['top1_p50']:.2f} | "
                     f"expert FLOPs vs top-k {v['flops_vs_topk']:.2f}, vs dense "
                     f"{v['flops_vs_dense']:.2f}")
    return lines


def load_balance(load_fractions: Sequence[float]) -> Optional[Tuple[float, float, float]]:
    """(min, max, std) of the experts' loads relative to their mean (see the module docstring);
    None when nothing was kept."""
    load = np.asarray(load_fractions, dtype=np.float64)
    if load.size == 0 or not load.sum() > 0:
        return None
    relative = load * load.size / load.sum()
    return float(relative.min()), float(relative.max()), float(relative.std())


def eval_moe_lines(what: str, result: "EvalResult") -> List[str]:
    """Per MoE layer and their mean, under the evaluation block: experts per token wanted and
    used, dropped %, expert FLOPs vs every expert and vs the dense FFN, load balance.
    (Worded unlike the training lines, so that parsers of those never pick these up.)"""
    def columns(v: dict) -> str:
        return (f"wanted {v['wanted_per_token']:.2f} used {v['used_per_token']:.2f} "
                f"experts/token | dropped {100.0 * v['dropped_fraction']:.1f}% | expert FLOPs "
                f"vs all experts {v['flops_vs_all']:.2f}, vs dense FFN {v['flops_vs_dense']:.2f}")

    lines = []
    for layer in result.moe_layers:
        line = f"   {what} MoE layer {layer.layer_number}: {columns(vars(layer))}"
        balance = load_balance(layer.load_fractions)
        if balance is not None:
            line += " | load vs mean min {:.2f} max {:.2f} std {:.2f}".format(*balance)
        lines.append(line)
    if result.moe_mean is not None:
        lines.append(f"   {what} MoE mean:    {columns(result.moe_mean)}")
    return lines


def eval_block(what: str, iteration: int, lm_loss: float) -> str:
    """Megatron's evaluation block; `what` is "validation" or "test"."""
    ppl = math.exp(min(20.0, lm_loss))          # Megatron caps the exponent at 20
    line = (f" {what} loss at iteration {iteration} | lm loss value: {lm_loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} | ")
    rule = "-" * len(line)
    return f"{rule}\n{line}\n{rule}"


# ----------------------------------------------------------------------------------------------
# TensorBoard


# TensorBoard name -> EvalResult field, per MoE layer and for their mean.
_EVAL_SCALARS = (("experts-per-token-wanted", "wanted_per_token"),
                 ("experts-per-token-used", "used_per_token"),
                 ("dropped-fraction", "dropped_fraction"),
                 ("expert-flops-vs-all", "flops_vs_all"),
                 ("expert-flops-vs-dense", "flops_vs_dense"))


class TensorBoardWriter:
    """Scalars and histograms under --tensorboard-dir (rank 0 only; None dir: writes nothing).

    Per-iteration values (every --tensorboard-log-interval iterations): lm-loss, learning-rate,
    grad-norm, loss-scale, moe/aux-loss. Per log interval: tokens-per-second and, per MoE layer
    (moe/layerL/), experts per token wanted/used, dropped fraction, top-1 probability p50, load
    min/max/std over the mean and a histogram of the experts' load fractions. Evaluations:
    {validation,test}/lm-loss and -ppl, and per MoE layer ({what}/moe-layer-L/) and their mean
    ({what}/moe-mean/) experts per token wanted/used, dropped fraction, expert FLOPs vs all
    experts and vs dense, load min/max/std over the mean (layers) and the load histogram.
    """

    def __init__(self, log_dir: Optional[str], interval: int) -> None:
        self.interval = interval
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            self.writer = SummaryWriter(log_dir=log_dir)

    def write_interval(self, summary: IntervalSummary, tokens_per_second: float) -> None:
        w = self.writer
        if w is None:
            return
        for k, it in enumerate(summary.iterations):
            if it % self.interval:
                continue
            w.add_scalar("lm-loss", summary.lm_losses[k], it)
            w.add_scalar("learning-rate", summary.learning_rates[k], it)
            w.add_scalar("loss-scale", summary.loss_scales[k], it)
            if summary.grad_norms[k] is not None:
                w.add_scalar("grad-norm", summary.grad_norms[k], it)
            if summary.moe_layers:
                w.add_scalar("moe/aux-loss", summary.aux_losses[k], it)
        it = summary.iterations[-1]
        w.add_scalar("tokens-per-second", tokens_per_second, it)
        for layer in summary.moe_layers:
            tag, v = f"moe/layer{layer.layer_number}", layer.values
            w.add_scalar(f"{tag}/experts-per-token-wanted", v["wanted_per_token"], it)
            w.add_scalar(f"{tag}/experts-per-token-used", v["used_per_token"], it)
            w.add_scalar(f"{tag}/dropped-fraction", v["dropped_fraction"], it)
            w.add_scalar(f"{tag}/top1-prob-p50", v["top1_p50"], it)
            self._write_load(tag, layer.load_fractions, it)

    def _write_load(self, tag: str, load_fractions: Sequence[float], step: int) -> None:
        balance = load_balance(load_fractions)
        if balance is None:
            return
        for name, value in zip(("min", "max", "std"), balance):
            self.writer.add_scalar(f"{tag}/load-{name}-over-mean", value, step)
        self.writer.add_histogram(f"{tag}/expert-load-fraction", np.asarray(load_fractions),
                                  step)

    def write_eval(self, what: str, iteration: int, result: "EvalResult") -> None:
        """One evaluation (`what`: validation or test) at `iteration`."""
        w = self.writer
        if w is None:
            return
        w.add_scalar(f"{what}/lm-loss", result.lm_loss, iteration)
        w.add_scalar(f"{what}/lm-loss-ppl", result.ppl, iteration)
        groups = [(f"{what}/moe-layer-{layer.layer_number}", vars(layer))
                  for layer in result.moe_layers]
        if result.moe_mean is not None:
            groups.append((f"{what}/moe-mean", result.moe_mean))
        for tag, v in groups:
            for name, key in _EVAL_SCALARS:
                w.add_scalar(f"{tag}/{name}", v[key], iteration)
        for layer in result.moe_layers:
            self._write_load(f"{what}/moe-layer-{layer.layer_number}", layer.load_fractions,
                             iteration)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
