"""The router study's results: one record per configuration, results.md and results.json.

A configuration's record (runs/NAME/result.json, written when the configuration is finished)
holds what its training log says (parameters, the loss, validation and routing curves, the test
evaluation, speed) and its evaluation on the first --eval-iters validation batches: from
tools/threshold_sweep.py's sweep.json for MoE models ("as trained", plus the thresholds of the
dense-to-sparse sweep), from `pretrain_gpt.py --eval-only` for the dense model. results.md and
results.json are rebuilt from the records after every configuration.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from study_configs import StudyConfig, StudySettings, active_parameters
from study_logs import TrainingLog, routing_curves

SWEEP_KEYS = ("checkpoint", "iteration", "router", "rows")
ROW_KEYS = ("threshold", "val_loss", "val_ppl", "experts_per_token", "wanted_per_token",
            "dropped_fraction", "expert_flops_vs_all", "expert_flops_vs_dense", "layers")
LAYER_KEYS = ("layer", "experts", "wanted_per_token", "used_per_token", "dropped_fraction",
              "expert_flops_vs_all", "expert_flops_vs_dense", "expert_load")


def check_sweep(sweep: dict, path: str) -> dict:
    """ValueError naming `path` and the key when sweep.json lacks what the study reads (the
    schema agreed with tools/threshold_sweep.py)."""
    where = f"{path} (has tools/threshold_sweep.py's sweep.json schema changed?)"
    for key in SWEEP_KEYS:
        if key not in sweep:
            raise ValueError(f"{where}: no {key!r}")
    if not isinstance(sweep["rows"], list) or not sweep["rows"]:
        raise ValueError(f"{where}: 'rows' is empty")
    for k, row in enumerate(sweep["rows"]):
        for key in ROW_KEYS:
            if key not in row:
                raise ValueError(f"{where}: row {k} has no {key!r}")
        for layer in row["layers"]:
            for key in LAYER_KEYS:
                if key not in layer:
                    raise ValueError(f"{where}: row {k}, a layer has no {key!r}")
    return sweep


def as_trained_row(sweep: dict, config: StudyConfig) -> dict:
    """The sweep row evaluated with the routing the configuration trained with."""
    rows = sweep["rows"]
    if not config.is_threshold:
        return rows[0]
    for row in rows:
        if row["threshold"] is not None and math.isclose(row["threshold"], config.threshold):
            return row
    raise ValueError(f"{sweep['checkpoint']}: the sweep has no row at the trained threshold "
                     f"{config.threshold}")


def config_record(config: StudyConfig, s: StudySettings, log: TrainingLog,
                  evaluation: dict, sweep: Optional[dict], timing: dict) -> dict:
    """The record of one finished configuration (see the module docstring)."""
    final = log.final_routing()
    layers = [{"layer": layer, "wanted_per_token": r.wanted, "used_per_token": r.used,
               "dropped_fraction": r.dropped, "top1_p50": r.top1_p50,
               "flops_vs_topk": r.flops_vs_topk, "flops_vs_dense": r.flops_vs_dense}
              for layer, r in sorted(final.items())]
    used = [entry["used_per_token"] for entry in layers]
    test_it, test_loss, test_ppl = log.test
    return {
        "name": config.name, "kind": config.kind, "description": config.description,
        "router": config.router, "num_experts": config.num_experts,
        "expert_ffn": config.expert_ffn, "dense_ffn": config.dense_ffn, "topk": config.topk,
        "threshold": config.threshold, "dropless": config.dropless,
        "parameters": {"total": log.total_params, "expert": log.expert_params,
                       "active": active_parameters(log.total_params, log.expert_params,
                                                   config.num_experts, used)},
        "end_of_training": {
            "iteration": max(log.routing) if log.routing else log.last_iteration,
            "wanted_per_token": _mean([e["wanted_per_token"] for e in layers]),
            "used_per_token": _mean(used),
            "dropped_fraction": _mean([e["dropped_fraction"] for e in layers]),
            "expert_flops_vs_dense": _mean([e["flops_vs_dense"] for e in layers]) if layers
            else 1.0,
            "layers": layers},
        "loss_curve": [[it, i.lm_loss] for it, i in sorted(log.intervals.items())],
        "validation": [{"iteration": it, "tokens": it * s.tokens_per_iteration, "loss": loss,
                        "ppl": ppl} for it, (loss, ppl) in sorted(log.validation.items())],
        "test": {"iteration": test_it, "loss": test_loss, "ppl": test_ppl},
        "routing_curves": {str(layer): points
                           for layer, points in routing_curves(log).items()},
        "tokens_per_second": log.steady_tokens_per_second(),
        "train_seconds": log.train_seconds(),
        "evaluation": evaluation, "sweep": sweep, **timing}


def evaluation_from_row(row: dict, source: str) -> dict:
    return {"source": source, "val_loss": row["val_loss"], "val_ppl": row["val_ppl"],
            "experts_per_token": row["experts_per_token"],
            "wanted_per_token": row["wanted_per_token"],
            "dropped_fraction": row["dropped_fraction"],
            "expert_flops_vs_dense": row["expert_flops_vs_dense"],
            "expert_load": [layer["expert_load"] for layer in row["layers"]],
            "layers": [layer["layer"] for layer in row["layers"]]}


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------------
# results.md


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s" if minutes \
        else f"{sec}s"


def _num(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def header_lines(s: StudySettings) -> List[str]:
    return [
        "# Router study",
        "",
        f"**Token budget: {s.train_tokens:,} tokens per configuration** ({s.train_iters} "
        f"iterations x {s.global_batch_size} samples x {s.seq_length} tokens), seed {s.seed}: "
        f"the same data order and LR schedule for all (cosine from {s.lr:g} to {s.min_lr:g}, "
        f"{s.warmup_iters} warmup iterations).",
        f"Model: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads, "
        f"sequence {s.seq_length}, dense FFN {4 * s.hidden_size}; MoE in every "
        f"{_ordinal(s.expert_interval)} layer (capacity factor {s.capacity_factor:g}, in "
        f"evaluation {s.eval_capacity_factor:g}, minimum {s.min_capacity}; d2s dropless).",
        f"Data: {' '.join(s.data_path)} (split {s.split}); extra pretrain_gpt.py flags: "
        f"{' '.join(s.extra_args) or 'none'}.",
        ""]


MAIN_COLUMNS = ("config", "params", "active params/token", "experts/token wanted",
                "experts/token used", "expert FLOPs vs dense", "val ppl", "test ppl",
                "tokens/s", "train time", "wall time")
NOTES = [
    "- experts/token: mean over the MoE layers in the last logged training interval; *used* "
    "is after capacity (pairs over an expert's capacity are dropped).",
    "- expert FLOPs vs dense: mean over the MoE layers of used experts x expert FFN / dense "
    "FFN, the MoE layers' FFN compute relative to a dense FFN in their place (dense: 1).",
    "- active params/token: every non-expert parameter (embeddings, attention, dense FFNs, "
    "norms, routers) plus used experts x one expert's parameters, per MoE layer.",
    "- val ppl: the last validation in the training log (iteration = the budget); test ppl: "
    "the test split after training (documents never trained on).",
    "- tokens/s: median over log intervals, each run's first interval left out (warm-up); "
    "train time: the logged training time (no evaluation or saves); wall time: the training "
    "processes' lifetimes (start-up, evaluations, saves; an attempt killed with the study is "
    "not counted).",
]


def main_table(records: List[dict]) -> List[str]:
    lines = ["| " + " | ".join(MAIN_COLUMNS) + " |", "|" + "---|" * len(MAIN_COLUMNS)]
    for r in records:
        end, p = r["end_of_training"], r["parameters"]
        lines.append("| " + " | ".join([
            r["name"], _count(p["total"]), _count(p["active"]),
            _num(end["wanted_per_token"]), _num(end["used_per_token"]),
            _num(end["expert_flops_vs_dense"]), _num(r["validation"][-1]["ppl"]),
            _num(r["test"]["ppl"]), f"{r['tokens_per_second']:,.0f}",
            _duration(r["train_seconds"]), _duration(r.get("wall_seconds"))]) + " |")
    return lines


def eval_table(records: List[dict], s: StudySettings) -> List[str]:
    lines = [f"Evaluated after training on the same first {s.eval_iters} validation batches "
             "(MoE: tools/threshold_sweep.py with the routing each trained with; dense: "
             "pretrain_gpt.py --eval-only):", "",
             "| config | experts/token used | dropped | expert FLOPs vs dense | val loss | "
             "val ppl |", "|---|---|---|---|---|---|"]
    for r in records:
        e = r["evaluation"]
        dropped = e.get("dropped_fraction")
        lines.append(f"| {r['name']} | {_num(e.get('experts_per_token'))} | "
                     f"{'-' if dropped is None else f'{100 * dropped:.1f}%'} | "
                     f"{_num(e['expert_flops_vs_dense'])} | {_num(e['val_loss'], '.4f')} | "
                     f"{_num(e['val_ppl'])} |")
    return lines


def sweep_table(record: dict) -> List[str]:
    sweep = record["sweep"]
    capacity = sweep.get("capacity_factor")
    routing = "dropless" if capacity is None else f"capacity factor {capacity:g}"
    lines = [f"Dense-to-sparse sweep of {record['name']} (checkpoint iteration "
             f"{sweep['iteration']}, {routing}, the same validation batches at every "
             "threshold):", "",
             "| threshold | experts/token wanted | used | dropped | expert FLOPs vs all | "
             "vs dense | val loss | val ppl |", "|---|---|---|---|---|---|---|---|"]
    for row in sweep["rows"]:
        lines.append(f"| {row['threshold']:.2f} | {row['wanted_per_token']:.2f} | "
                     f"{row['experts_per_token']:.2f} | {100 * row['dropped_fraction']:.1f}% | "
                     f"{row['expert_flops_vs_all']:.3f} | {row['expert_flops_vs_dense']:.2f} | "
                     f"{row['val_loss']:.4f} | {row['val_ppl']:.2f} |")
    return lines


def results_markdown(s: StudySettings, records: List[dict], pending: Sequence[str],
                     plots: Sequence[str]) -> str:
    lines = header_lines(s) + main_table(records) + [""] + NOTES + [""]
    if pending:
        lines += [f"Not finished yet: {', '.join(pending)} (rerun the same command to go on).",
                  ""]
    lines += eval_table(records, s) + [""]
    for r in records:
        if r["kind"] == "d2s" and r["sweep"] is not None:
            lines += sweep_table(r) + [""]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p}]({p})" for p in plots), ""]
    lines.append("Per configuration: runs/NAME/train.log (the whole log), runs/NAME/tensorboard/, "
                 "runs/NAME/checkpoint/ (the final checkpoint), runs/NAME/sweep/ (sweep.json, "
                 "sweep.csv), runs/NAME/result.json.")
    return "\n".join(lines) + "\n"


def results_json(s: StudySettings, records: List[dict], pending: Sequence[str]) -> Dict:
    return {"budget": {"tokens": s.train_tokens, "iterations": s.train_iters,
                       "global_batch_size": s.global_batch_size, "seq_length": s.seq_length},
            "finished": [r["name"] for r in records], "pending": list(pending),
            "configs": records}
