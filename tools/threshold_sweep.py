#!/usr/bin/env python3
"""Evaluate one checkpoint at many thresholds: one model load, the same validation batches.

    python tools/threshold_sweep.py --load CKPT --data-path PREFIX --vocab-file V --merge-file M \\
        [--thresholds 0.5 0.6 0.7 0.8 0.9 1.0] [--eval-iters N] [--micro-batch-size B] \\
        [--split 969,30,1] [--moe-eval-capacity-factor X | --dropless] [--out DIR] [--device D]

XMoE's dense-to-sparse use: a model trained at threshold 1.0 (every small expert) run at lower
thresholds computes fewer expert FLOPs; the sweep shows what that costs in perplexity. Per
threshold it prints a row (experts per token per MoE layer and their mean, wanted per token,
dropped %, validation loss and perplexity, expert FLOPs vs every expert and vs the dense FFN)
and writes DIR/sweep.json, DIR/sweep.csv and, with matplotlib, DIR/sweep.png (perplexity vs
expert FLOPs relative to the dense FFN), each file atomically.

Each row equals `pretrain_gpt.py --eval-only --use-checkpoint-args --load CKPT --threshold T`
with the same data, batch and capacity flags, run as one process (its validation numbers;
`pretrain_argv` is that command line): the model and the run
come from the same flags (the checkpoint's model flags, --use-checkpoint-args), the batches are
the first N micro-batches of the validation split, and each row re-routes the one loaded model
(GPTModel.set_routing). Only threshold-router checkpoints take --thresholds; without it, a
top-k or switch checkpoint gives one row "as trained" (threshold null).

The weights are read without DeepSpeed: the model file's "module" (DeepSpeed's
mp_rank_00_model_states.pt); an expert-parallel checkpoint's expert shards are merged, so any
--moe-expert-parallel-size evaluates here on one device. The model runs in fp32.
Bad input (a missing checkpoint or dataset, a threshold outside (0, 1], --thresholds for a
checkpoint of another router) ends with one line `threshold_sweep.py: error: ...`, exit 2, and
nothing written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

# Run as a script: import the megatron next to it (as pretrain_gpt.py does).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import OneLineParser, error_line  # noqa: E402

PROG = "threshold_sweep.py"
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_LAYER_KEYS = ("wanted_per_token", "used_per_token", "dropped_fraction", "flops_vs_all",
               "flops_vs_dense")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="Checkpoint directory (pretrain_gpt --save).")
    p.add_argument("--data-path", nargs="+", required=True, help="As pretrain_gpt.py's.")
    p.add_argument("--vocab-file", required=True)
    p.add_argument("--merge-file", required=True)
    p.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help=f"Thresholds in (0, 1] (default {' '.join(map(str, DEFAULT_THRESHOLDS))}"
                        "; threshold-router checkpoints only).")
    p.add_argument("--eval-iters", type=int, default=100,
                   help="Validation micro-batches per threshold (default 100): "
                        "pretrain_gpt.py's --eval-iters of one process whose global batch is "
                        "one micro-batch.")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--split", default="969,30,1", help="As pretrain_gpt.py's --split.")
    p.add_argument("--seq-length", type=int, default=None,
                   help="Default: the checkpoint's --max-position-embeddings.")
    p.add_argument("--seed", type=int, default=1234, help="The data order's seed (as trained).")
    p.add_argument("--data-cache-path", default=None)
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                          help="Default: the checkpoint's.")
    capacity.add_argument("--dropless", action="store_true",
                          help="No capacity limit (--disable-moe-token-dropping).")
    p.add_argument("--out", default="threshold_sweep", help="Output directory.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    args = p.parse_args(argv)
    for t in args.thresholds or ():
        if not 0.0 < t <= 1.0:
            raise ValueError(f"--thresholds must be in (0, 1], got {t}")
    return args


def pretrain_argv(args: argparse.Namespace) -> List[str]:
    """The pretrain_gpt.py command line whose --eval-only validation each row equals."""
    argv = ["--use-checkpoint-args", "--load", args.load, "--eval-only",
            "--data-path", *args.data_path, "--vocab-file", args.vocab_file,
            "--merge-file", args.merge_file, "--micro-batch-size", str(args.micro_batch_size),
            "--eval-iters", str(args.eval_iters), "--split", args.split, "--seed",
            str(args.seed), "--num-workers", "0", "--distributed-backend", "gloo"]
    if args.seq_length is not None:
        argv += ["--seq-length", str(args.seq_length)]
    if args.data_cache_path is not None:
        argv += ["--data-cache-path", args.data_cache_path]
    if args.moe_eval_capacity_factor is not None:
        argv += ["--moe-eval-capacity-factor", str(args.moe_eval_capacity_factor)]
    if args.dropless:
        argv.append("--disable-moe-token-dropping")
    return argv


def build_run(args: argparse.Namespace):
    """(RunConfig, tokenizer) exactly as pretrain_gpt.py builds them for pretrain_argv."""
    from megatron import arguments
    from megatron.tokenizer import build_tokenizer

    if args.eval_iters < 1:
        raise ValueError(f"--eval-iters must be >= 1, got {args.eval_iters}")
    run_args = arguments.parse_args(pretrain_argv(args))
    validated = arguments.validate_args(run_args, 1)
    data = arguments.build_data_config(validated.flags)
    tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file,
                                make_vocab_size_divisible_by=data.make_vocab_size_divisible_by)
    return arguments.build_configs(validated, tokenizer.padded_vocab_size), tokenizer


def thresholds_for(args: argparse.Namespace, run) -> List[Optional[float]]:
    """The rows: --thresholds (threshold routers only), the defaults, or [None] (as trained)."""
    model = run.model
    if all(model.experts_for_layer(L) == 1 for L in range(1, model.num_layers + 1)):
        raise ValueError(f"--load {args.load}: the model has no MoE layer, nothing to sweep")
    router = model.moe.router
    if router == "threshold":
        return list(args.thresholds or DEFAULT_THRESHOLDS)
    if args.thresholds:
        raise ValueError(f"--thresholds: {args.load} was trained with the {router} router; a "
                         "threshold sweep needs a threshold-router checkpoint (leave "
                         "--thresholds out for one row as trained)")
    return [None]


def validation_batches(run, vocab_size: int) -> list:
    """The first eval_iters x accumulation micro-batches of the validation split, as
    pretrain_gpt.py --eval-only reads them (same sample counts, seed and order)."""
    from megatron.training import build_datasets, data_iterator, sample_counts

    t = run.training
    valid = build_datasets(run, sample_counts(t, 0), vocab_size)[1]
    if valid is None:
        raise ValueError(f"--split {run.data.split} leaves no validation documents")
    it = data_iterator(valid, 0, t, num_workers=0)
    return [next(it) for _ in range(t.eval_iters * t.gradient_accumulation_steps)]


def sweep(model, batches: list, thresholds: List[Optional[float]], run, device
          ) -> List[Dict[str, Any]]:
    """One row (sweep.json's schema) per threshold, all on the same batches. A row's
    experts_per_token, wanted_per_token, dropped_fraction and expert FLOPs are means over the
    MoE layers (each layer counts once; megatron/evaluation.py defines the per-layer values);
    val_ppl is exp(val_loss) with Megatron's cap of the exponent at 20; a layer's expert_load
    is each expert's share of its kept pairs (sums to 1)."""
    from megatron.evaluation import evaluate

    rows = []
    for threshold in thresholds:
        if threshold is not None:
            model.set_routing(threshold=threshold)
        result = evaluate(model, iter(batches), run.training.eval_iters,
                          run.training.gradient_accumulation_steps, device)
        mean = result.moe_mean
        layers = [{"layer": m.layer_number, "experts": m.num_experts,
                   "wanted_per_token": m.wanted_per_token, "used_per_token": m.used_per_token,
                   "dropped_fraction": m.dropped_fraction,
                   "expert_flops_vs_all": m.flops_vs_all,
                   "expert_flops_vs_dense": m.flops_vs_dense,
                   "expert_load": list(m.load_fractions)} for m in result.moe_layers]
        rows.append({"threshold": threshold, "val_loss": result.lm_loss, "val_ppl": result.ppl,
                     "experts_per_token": mean["used_per_token"],
                     "wanted_per_token": mean["wanted_per_token"],
                     "dropped_fraction": mean["dropped_fraction"],
                     "expert_flops_vs_all": mean["flops_vs_all"],
                     "expert_flops_vs_dense": mean["flops_vs_dense"], "layers": layers})
    return rows


# ----------------------------------------------------------------------------------------------
# output


def table_lines(rows: List[Dict[str, Any]]) -> List[str]:
    layer_numbers = [layer["layer"] for layer in rows[0]["layers"]]
    head = (["threshold"] + [f"L{n} used" for n in layer_numbers]
            + ["mean used", "wanted", "dropped %", "val loss", "val ppl", "FLOPs/all",
               "FLOPs/dense"])
    lines = [" ".join(f"{h:>9}" for h in head)]
    for r in rows:
        cells = ["as trained" if r["threshold"] is None else f"{r['threshold']:.2f}"]
        cells += [f"{layer['used_per_token']:.2f}" for layer in r["layers"]]
        cells += [f"{r['experts_per_token']:.2f}", f"{r['wanted_per_token']:.2f}",
                  f"{100 * r['dropped_fraction']:.1f}", f"{r['val_loss']:.4f}",
                  f"{r['val_ppl']:.2f}", f"{r['expert_flops_vs_all']:.3f}",
                  f"{r['expert_flops_vs_dense']:.3f}"]
        lines.append(" ".join(f"{c:>9}" for c in cells))
    return lines


def csv_text(rows: List[Dict[str, Any]]) -> str:
    """One line per threshold: the row's scalars, then each layer's."""
    scalars = [k for k in rows[0] if k != "layers"]
    per_layer = [f"layer{layer['layer']}_{k}" for layer in rows[0]["layers"]
                 for k in ("wanted_per_token", "used_per_token", "dropped_fraction")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(scalars + per_layer)
    for r in rows:
        writer.writerow([r[k] for k in scalars] + [layer[k] for layer in r["layers"] for k in (
            "wanted_per_token", "used_per_token", "dropped_fraction")])
    return out.getvalue()


def plot_png(report: Dict[str, Any]) -> bytes:
    """Validation perplexity vs expert FLOPs relative to the dense FFN, one point per row
    (ImportError without matplotlib)."""
    from matplotlib.figure import Figure     # no pyplot: no global state, no display

    rows = report["rows"]
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    xs, ys = [r["expert_flops_vs_dense"] for r in rows], [r["val_ppl"] for r in rows]
    ax.plot(xs, ys, marker="o")
    for r, x, y in zip(rows, xs, ys):
        label = "as trained" if r["threshold"] is None else f"t={r['threshold']:g}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("expert FLOPs relative to the dense FFN (mean over MoE layers)")
    ax.set_ylabel("validation perplexity")
    trained = report["trained_threshold"]
    ax.set_title(f"{os.path.basename(os.path.normpath(report['checkpoint']))}, iteration "
                 f"{report['iteration']}: {report['router']} router"
                 + (f" trained at {trained:g}" if trained is not None else ""), fontsize=9)
    ax.ticklabel_format(axis="both", useOffset=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    return out.getvalue()


def write_outputs(report: Dict[str, Any], out_dir: str) -> List[str]:
    """sweep.json, sweep.csv and (with matplotlib) sweep.png, each atomically; the lines to
    print about them."""
    from megatron.fileio import atomic_write

    paths = [os.path.join(out_dir, name) for name in ("sweep.json", "sweep.csv", "sweep.png")]
    with atomic_write(paths[0], "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with atomic_write(paths[1], "w") as f:
        f.write(csv_text(report["rows"]))
    try:
        png = plot_png(report)
    except ImportError:
        return [f"{PROG}: matplotlib is not installed, so no plot (pip install matplotlib); "
                f"wrote {paths[0]} and {paths[1]}"]
    with atomic_write(paths[2]) as f:
        f.write(png)
    return [f"wrote {', '.join(paths)}"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        run, tokenizer = build_run(args)
        thresholds = thresholds_for(args, run)
        import torch

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here")
        from megatron.checkpoint_model import load_model

        model, iteration = load_model(args.load, run.model, device)
        batches = validation_batches(run, tokenizer.vocab_size)
        moe = run.model.moe
        print(f"{PROG}: {args.load} (iteration {iteration}, {moe.router} router), "
              f"{len(batches)} validation micro-batches of {run.training.micro_batch_size} x "
              f"{run.training.seq_length} tokens per row, on {device}", flush=True)
        rows = sweep(model, batches, thresholds, run, device)
        report = {"checkpoint": args.load, "iteration": iteration, "router": moe.router,
                  "trained_threshold": moe.threshold if moe.router == "threshold" else None,
                  "eval_tokens": len(batches) * run.training.micro_batch_size
                  * run.training.seq_length,
                  "capacity_factor": moe.eval_capacity_factor if moe.drop_tokens else None,
                  "rows": rows}
        print("\n".join(table_lines(rows)), flush=True)
        print("\n".join(write_outputs(report, args.out)), flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(error_line(PROG, e), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
