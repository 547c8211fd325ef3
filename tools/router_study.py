#!/usr/bin/env python3
"""The router study, one command: the same GPT with dense, top-k, switch, XMoE and
dense-to-sparse FFN layers, trained on the same tokens, compared in a table and plots.

    python tools/router_study.py --data-path PREFIX --vocab-file V --merge-file M \
        --train-tokens 500000000 --out-dir study [--configs dense xmoe ...] [-- --bf16]

For each configuration (tools/study_configs.py: the names, sizes and shared flags, and why) it
runs pretrain_gpt.py in a subprocess (optionally under --launcher, e.g. "torchrun
--nproc_per_node 8") into OUT/runs/NAME/ (checkpoint/, tensorboard/, train.log), reads the log
(tools/study_logs.py), evaluates the final checkpoint (tools/threshold_sweep.py for MoE models,
the d2s model at every --sweep-thresholds; pretrain_gpt.py --eval-only for the dense one) and
writes OUT/runs/NAME/result.json (tools/study_run.py). After every configuration it rewrites
OUT/results.md, results.json and the PNGs (tools/study_report.py, tools/study_plots.py).

Resuming: rerun the same command. A configuration with a result.json is skipped; an unfinished
one resumes from its checkpoint (--save and --load are the same directory). OUT/study.json
records the settings that make the runs comparable (study_configs.COMPARED); a rerun with
another value is refused naming it: results of different settings are never mixed in one table
(there is no --force: use another --out-dir, or move the old one away). One study per OUT at a
time (a lock).

Bad input (an unknown configuration, a threshold outside (0, 1], missing data or vocabulary
files, a command pretrain_gpt.py would refuse for any configuration) stops before any run with
one line and exit code 2; a run that fails ends the study with one line naming it and its log,
exit code 1; SIGTERM or Ctrl-C stops the running process too (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for path in (REPO, TOOLS):
    if path not in sys.path:
        sys.path.insert(0, path)

import study_plots  # noqa: E402
from megatron.cli import OneLineParser, error_line  # noqa: E402
from study_configs import (COMPARED, D2S_THRESHOLD, DEFAULT_KINDS, StudyConfig,  # noqa: E402
                           StudySettings, check_extra_args, iterations_for_tokens, select_configs,
                           training_flags)
from study_report import results_json, results_markdown  # noqa: E402
from study_run import SWEEP_TOOL, Study, StudyError, run_config, run_paths  # noqa: E402
from study_runner import (StudyLock, child_env, read_json, write_json_atomic,  # noqa: E402
                          write_text_atomic)

PROG = "router_study.py"
DEFAULT_SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Setting -> the flag that sets it, for the study.json mismatch line.
SETTING_FLAGS = {"warmup_iters": "--lr-warmup-fraction (warmup iterations)",
                 "train_iters": "--train-tokens / --train-iters (iterations)",
                 "extra_args": "the arguments after --",
                 "capacity_factor": "--capacity-factor",
                 "eval_capacity_factor": "--eval-capacity-factor",
                 "min_capacity": "--moe-min-capacity"}


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """(the study's arguments, the arguments after `--` for every pretrain_gpt.py run)."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = OneLineParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()),
                epilog="Arguments after `--` go to every pretrain_gpt.py run (e.g. -- --bf16).",
                allow_abbrev=False)
    a = p.add_argument
    a("--data-path", nargs="+", required=True, help="PREFIX, or WEIGHT PREFIX pairs")
    a("--vocab-file", required=True)
    a("--merge-file", required=True)
    a("--split", default="97,2,1", help="train, valid, test (default: the XMoE fork's)")
    a("--out-dir", default="router_study_output")
    a("--configs", nargs="+", default=None, help="names or kinds (default: all six)")
    a("--train-tokens", type=int, default=None, help="token budget of every configuration")
    a("--train-iters", type=int, default=None, help="or the budget in iterations")
    a("--num-layers", type=int, default=12)
    a("--hidden-size", type=int, default=768, help="dense FFN 4x; experts scale with it")
    a("--num-attention-heads", type=int, default=12)
    a("--seq-length", type=int, default=1024)
    a("--expert-interval", type=int, default=2)
    a("--micro-batch-size", type=int, default=16)
    a("--global-batch-size", type=int, default=256)
    a("--lr", type=float, default=4.5e-4)
    a("--min-lr", type=float, default=None, help="default --lr / 100")
    a("--lr-warmup-fraction", type=float, default=0.1, help="of the budget (cosine after)")
    a("--capacity-factor", type=float, default=8.0, help="training (XMoE-small's 8)")
    a("--eval-capacity-factor", type=float, default=None, help="default --capacity-factor")
    a("--moe-min-capacity", type=int, default=4)
    a("--moe-loss-coeff", type=float, default=0.01)
    a("--threshold", type=float, default=0.9, help="of the xmoe configuration")
    a("--sweep-thresholds", type=float, nargs="+", default=list(DEFAULT_SWEEP),
      help="of the d2s sweep (1.0, its training threshold, is always added)")
    a("--eval-interval", type=int, default=None, help="default budget / 10 iterations")
    a("--eval-iters", type=int, default=10)
    a("--test-iters", type=int, default=None, help="default --eval-iters")
    a("--log-interval", type=int, default=None, help="default budget / 100 iterations")
    a("--save-interval", type=int, default=None, help="default budget / 5 iterations")
    a("--keep-all-checkpoints", action="store_true",
      help="keep every checkpoint (default: the newest of each run only)")
    a("--num-workers", type=int, default=2)
    a("--seed", type=int, default=1234)
    a("--launcher", default=None, help='e.g. "torchrun --nproc_per_node 8" (default: python)')
    a("--world-size", type=int, default=None, help="processes (default: from --launcher)")
    a("--dry-run", action="store_true", help="check everything, print the commands, run none")
    a("--quiet", action="store_true", help="do not echo the runs' output (it is in the logs)")
    a("--stop-after", type=int, default=None, help=argparse.SUPPRESS)   # tests: a killed study
    return p.parse_args(ours), extra


def build_settings(args: argparse.Namespace, extra: List[str]) -> StudySettings:
    """The shared settings, validated (ValueError naming the flag)."""
    thresholds = [("--threshold", args.threshold)] + [("--sweep-thresholds", t)
                                                      for t in args.sweep_thresholds]
    for flag, t in thresholds:
        if not 0.0 < t <= 1.0:                      # NaN fails this too
            raise ValueError(f"{flag}: {t} is outside (0, 1]")
    if (args.train_tokens is None) == (args.train_iters is None):
        raise ValueError("give the budget as --train-tokens or --train-iters (one of them)")
    for flag in ("--train-tokens", "--train-iters", "--num-layers", "--hidden-size",
                 "--num-attention-heads", "--seq-length", "--expert-interval",
                 "--micro-batch-size", "--global-batch-size", "--eval-iters", "--eval-interval",
                 "--test-iters", "--log-interval", "--save-interval"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.hidden_size % 2:
        raise ValueError(f"--hidden-size {args.hidden_size} must be even (experts of hidden / 2)")
    if not 0.0 <= args.lr_warmup_fraction < 1.0:
        raise ValueError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    check_extra_args(extra)
    iters = args.train_iters or iterations_for_tokens(args.train_tokens, args.global_batch_size,
                                                      args.seq_length)
    return StudySettings(
        data_path=tuple(_absolute_data_path(args.data_path)),
        vocab_file=_existing_file("--vocab-file", args.vocab_file),
        merge_file=_existing_file("--merge-file", args.merge_file), split=args.split,
        seed=args.seed, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
        expert_interval=args.expert_interval, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, train_iters=iters, lr=args.lr,
        min_lr=args.lr / 100 if args.min_lr is None else args.min_lr,
        warmup_iters=round(args.lr_warmup_fraction * iters),
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.eval_capacity_factor or args.capacity_factor,
        min_capacity=args.moe_min_capacity, moe_loss_coeff=args.moe_loss_coeff,
        threshold=args.threshold,
        sweep_thresholds=tuple(sorted(set(args.sweep_thresholds) | {D2S_THRESHOLD})),
        eval_interval=args.eval_interval or max(1, iters // 10), eval_iters=args.eval_iters,
        test_iters=args.test_iters or args.eval_iters,
        log_interval=args.log_interval or max(1, iters // 100),
        save_interval=args.save_interval or max(1, iters // 5),
        num_workers=args.num_workers, extra_args=tuple(extra))


def _existing_file(flag: str, path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: {path} not found")
    return os.path.abspath(path)


def _absolute_data_path(values: List[str]) -> List[str]:
    """--data-path with absolute prefixes (the runs start in the repository), each checked."""
    from megatron.data.dataset_split import parse_data_path
    from megatron.data.indexed_dataset import missing_dataset_message

    prefixes, _ = parse_data_path(values)
    for prefix in prefixes:
        problem = missing_dataset_message(prefix)
        if problem:
            raise ValueError(f"--data-path: {problem}")
    return [os.path.abspath(v) if v in prefixes else v for v in values]


def world_size(args: argparse.Namespace) -> Tuple[List[str], int]:
    """(launcher prefix, processes per run)."""
    launcher = shlex.split(args.launcher) if args.launcher else []
    if args.world_size is not None:
        return launcher, args.world_size
    if not launcher:
        return launcher, 1
    for k, word in enumerate(launcher):
        name, _, value = word.partition("=")
        if name in ("--num_gpus", "--num-gpus", "--nproc_per_node", "--nproc-per-node"):
            value = value or (launcher[k + 1] if k + 1 < len(launcher) else "")
            if value.isdigit():
                return launcher, int(value)
    raise ValueError(f"--launcher {args.launcher!r} does not say how many processes "
                     "(--num_gpus N / --nproc_per_node N): give --world-size")


def check_commands(s: StudySettings, configs: List[StudyConfig], out_dir: str, world: int
                   ) -> None:
    """pretrain_gpt.py's own validation of every configuration's command, here, before any run
    (tools/check_pretrain_args.py: no torch); and the sweep tool, when MoE models need it."""
    from check_pretrain_args import check

    for config in configs:
        flags = training_flags(s, config, *run_paths(out_dir, config)[1:3])
        try:
            check(world, flags)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{' '.join(str(e).split())} (pretrain_gpt.py's check of "
                             f"{config.name})") from None
    if any(c.is_moe for c in configs) and not os.path.isfile(SWEEP_TOOL):
        raise ValueError(f"{SWEEP_TOOL} not found: the study evaluates MoE checkpoints with it")


def check_study_file(out_dir: str, s: StudySettings) -> None:
    """OUT/study.json: written by the first run; a later run with other settings is refused."""
    path = os.path.join(out_dir, "study.json")
    ours = json.loads(json.dumps({k: getattr(s, k) for k in COMPARED}))
    saved = read_json(path)
    if saved is None:
        write_json_atomic(path, {"settings": ours, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        return
    theirs = saved.get("settings", {})
    for key in COMPARED:
        if key in theirs and theirs[key] != ours[key]:
            flag = SETTING_FLAGS.get(key, "--" + key.replace("_", "-"))
            raise ValueError(f"--out-dir {out_dir} holds a study with {flag} {_shown(theirs[key])}"
                             f" (this run: {_shown(ours[key])}): use another --out-dir, or move "
                             f"{out_dir} away to start over")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# ----------------------------------------------------------------------------------------------
# the study


def write_outputs(out_dir: str, s: StudySettings, records: List[dict], pending: List[str]
                  ) -> None:
    """results.md, results.json and the PNGs from the finished configurations' records."""
    plots = study_plots.write_plots(out_dir, records) if records else []
    if plots is None:
        print(f"{PROG}: matplotlib is not installed: no PNGs (pip install matplotlib); "
              "tables written: results.md, results.json", flush=True)
        plots = []
    write_json_atomic(os.path.join(out_dir, "results.json"), results_json(s, records, pending))
    write_text_atomic(os.path.join(out_dir, "results.md"),
                      results_markdown(s, records, pending, plots))


class Stopped(BaseException):
    """SIGTERM or Ctrl-C: unwinds through the running child (study_runner.run_logged stops it)
    and the atomic writes (their temporaries removed)."""

    def __init__(self, why: str, code: int) -> None:
        super().__init__(why)
        self.why, self.code = why, code


def _on_sigterm(*_) -> None:
    raise Stopped("SIGTERM", 143)


def _on_sigint(*_) -> None:
    raise Stopped("interrupted", 130)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(error_line(PROG, e), file=sys.stderr, flush=True)
        return 2
    previous = {sig: signal.signal(sig, handler)
                for sig, handler in ((signal.SIGTERM, _on_sigterm), (signal.SIGINT, _on_sigint))}
    try:
        return _main(args, extra)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def earlier_records(out_dir: str, configs: List[StudyConfig]) -> List[dict]:
    """Finished configurations of this study not selected by this run's --configs (study.json
    matched, so they are comparable): the tables keep them."""
    runs = os.path.join(out_dir, "runs")
    names = {c.name for c in configs}
    found = [read_json(os.path.join(runs, name, "result.json"))
             for name in (sorted(os.listdir(runs)) if os.path.isdir(runs) else [])
             if name not in names]
    return [r for r in found if r is not None]


def in_default_order(records: List[dict]) -> List[dict]:
    """The tables and plots list configurations in DEFAULT_KINDS order, whichever run (or
    --configs order) finished them."""
    order = {kind: k for k, kind in enumerate(DEFAULT_KINDS)}
    return sorted(records, key=lambda r: order.get(r["kind"], len(order)))


def _main(args: argparse.Namespace, extra: List[str]) -> int:
    out_dir = os.path.abspath(args.out_dir)
    try:
        settings = build_settings(args, extra)
        configs = select_configs(args.configs, settings.hidden_size, settings.threshold)
        launcher, world = world_size(args)
        check_commands(settings, configs, out_dir, world)
        if args.dry_run:
            study = Study(out_dir, settings, launcher, {}, False, False)
            for config in configs:
                print(shlex.join(study.command(training_flags(settings, config,
                                                              *run_paths(out_dir, config)[1:]))))
            print(f"{len(configs)} configuration(s) checked for {world} process(es); nothing run",
                  file=sys.stderr)
            return 0
        os.makedirs(out_dir, exist_ok=True)
        with StudyLock(out_dir):
            check_study_file(out_dir, settings)
            return _run_all(args, settings, configs, launcher, out_dir)
    except ValueError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    except StudyError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except Stopped as e:
        print(f"{PROG}: stopped ({e.why}): rerun the same command to resume", file=sys.stderr,
              flush=True)
        return e.code


def _run_all(args, settings: StudySettings, configs: List[StudyConfig], launcher: List[str],
             out_dir: str) -> int:
    env, threads = child_env()
    print(f"== router study: {len(configs)} configuration(s) "
          f"({', '.join(c.name for c in configs)}), {settings.train_tokens:,} tokens each "
          f"({settings.train_iters} iterations); {threads}; output {out_dir}", flush=True)
    study = Study(out_dir, settings, launcher, env, not args.quiet, args.keep_all_checkpoints)
    records: List[dict] = []
    for k, config in enumerate(configs):
        records.append(run_config(study, config))
        pending = [c.name for c in configs[k + 1:]]
        write_outputs(out_dir, settings,
                      in_default_order(records + earlier_records(out_dir, configs)), pending)
        if args.stop_after is not None and len(records) >= args.stop_after and pending:
            print(f"== stopped after {len(records)} configuration(s) (--stop-after); rerun to "
                  "go on", flush=True)
            return 0
    print(f"== router study finished: {os.path.join(out_dir, 'results.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
