"""One configuration of the router study: train or resume it, evaluate it, record it.

    record = run_config(study, config)

- A configuration with OUT/runs/NAME/result.json is finished: its record is read, nothing run.
- Otherwise pretrain_gpt.py trains it into OUT/runs/NAME/ (checkpoint/ as --save and --load, so
  a rerun resumes; tensorboard/; train.log, appended per attempt after a line naming the
  attempt). Training that already reached the budget (the final checkpoint, and the test
  evaluation in the log) is not started again.
- Then the final checkpoint is evaluated on the first eval_iters x global batch validation
  samples: MoE models by tools/threshold_sweep.py (at the trained routing, the d2s model also at
  every sweep threshold, dropless), the dense model by pretrain_gpt.py --eval-only (the same
  samples: both read the validation split from its start).
- result.json is written atomically last, so a study killed at any point redoes at most this
  configuration's evaluation or the iterations since its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from typing import List, Tuple

from study_configs import StudyConfig, StudySettings, eval_only_flags, training_flags
from study_logs import (ATTEMPT_MARK, LogFormatError, first_error_line, parse_eval_log,
                        parse_training_log)
from study_report import as_trained_row, check_sweep, config_record, evaluation_from_row
from study_runner import (REPO, TOOLS, KeepLastCheckpoint, read_json, read_pointer,
                          repair_pointer, run_logged, write_json_atomic)

PRETRAIN = os.path.join(REPO, "pretrain_gpt.py")
SWEEP_TOOL = os.path.join(TOOLS, "threshold_sweep.py")


class StudyError(Exception):
    """A run failed: one line for the user."""


def run_paths(out_dir: str, config: StudyConfig) -> Tuple[str, str, str]:
    """(run directory, checkpoint directory, TensorBoard directory) of a configuration."""
    run_dir = os.path.join(out_dir, "runs", config.name)
    return run_dir, os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "tensorboard")


@dataclasses.dataclass
class Study:
    """What every configuration's run needs: where, the settings, how to start processes."""

    out_dir: str
    settings: StudySettings
    launcher: List[str]
    env: dict
    echo: bool
    keep_all: bool

    def command(self, flags: List[str], script: str = PRETRAIN) -> List[str]:
        """pretrain_gpt.py (training, --eval-only) under the launcher if there is one; the
        sweep tool as one plain process (it evaluates on one device)."""
        if self.launcher and script == PRETRAIN:
            return [*self.launcher, script, *flags]
        return [sys.executable, script, *flags]


def run_config(study: Study, config: StudyConfig) -> dict:
    """Train (or resume) one configuration, evaluate it, write its result.json; its record."""
    run_dir, ckpt, tensorboard = run_paths(study.out_dir, config)
    result_path = os.path.join(run_dir, "result.json")
    done = read_json(result_path)
    if done is not None:
        print(f"== {config.name}: finished earlier ({result_path}): skipped", flush=True)
        return done
    log_path = os.path.join(run_dir, "train.log")
    timing = read_json(os.path.join(run_dir, "attempts.json")) or {"attempts": []}
    note = repair_pointer(ckpt)
    if note:
        print(f"== {note}", flush=True)
    try:        # a log or sweep.json the study cannot read: the run's problem, not the input's
        log = _finished_log(study, config, ckpt, log_path)
        if log is None:
            log = _train(study, config, run_dir, ckpt, tensorboard, log_path, timing)
        start = time.time()
        evaluation, sweep = _evaluate(study, config, run_dir, ckpt)
    except ValueError as e:
        raise StudyError(f"{config.name}: {e}") from None
    timing["evaluation_seconds"] = time.time() - start
    timing["wall_seconds"] = sum(a["seconds"] for a in timing["attempts"])
    timing["command"] = shlex.join(study.command(training_flags(study.settings, config, ckpt,
                                                                tensorboard)))
    record = config_record(config, study.settings, log, evaluation, sweep, timing)
    write_json_atomic(result_path, record)
    print(f"== {config.name}: finished: {result_path}", flush=True)
    return record


def _finished_log(study: Study, config: StudyConfig, ckpt: str, log_path: str):
    """The parsed log when training already ended (final checkpoint and test evaluation)."""
    if read_pointer(ckpt) != study.settings.train_iters or not os.path.isfile(log_path):
        return None
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = parse_training_log(f.read(), log_path, moe=config.is_moe)
    except LogFormatError:
        return None
    return log if log.test and log.test[0] == study.settings.train_iters else None


def _train(study: Study, config: StudyConfig, run_dir: str, ckpt: str, tensorboard: str,
           log_path: str, timing: dict):
    s = study.settings
    cmd = study.command(training_flags(s, config, ckpt, tensorboard))
    attempt = _attempts_logged(log_path) + 1
    resumed = read_pointer(ckpt)
    what = f"resuming from iteration {resumed}" if resumed else "from scratch"
    print(f"== {config.name}: training {s.train_iters} iterations ({what}), log {log_path}",
          flush=True)
    rc, text, seconds = run_logged(
        cmd, log_path, study.env, f"{ATTEMPT_MARK} {attempt} ({what}): "
        f"{shlex.join(cmd)}", echo=study.echo,
        on_line=KeepLastCheckpoint(ckpt, enabled=not study.keep_all))
    timing["attempts"].append({"seconds": seconds, "returncode": rc, "resumed_from": resumed})
    write_json_atomic(os.path.join(run_dir, "attempts.json"), timing)
    if rc != 0:
        raise StudyError(f"{config.name}: pretrain_gpt.py exited with code {rc}: "
                         f"{first_error_line(text, 'pretrain_gpt.py') or 'see the log'} "
                         f"(log: {log_path})")
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return parse_training_log(f.read(), log_path, moe=config.is_moe)


def _attempts_logged(log_path: str) -> int:
    """Training attempts in the log so far (killed ones included: each starts with our line)."""
    if not os.path.isfile(log_path):
        return 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return sum(line.startswith(ATTEMPT_MARK) for line in f)


def _evaluate(study: Study, config: StudyConfig, run_dir: str, ckpt: str):
    """(evaluation on the first --eval-iters validation batches, sweep.json or None)."""
    s = study.settings
    if not config.is_moe:
        flags = eval_only_flags(s, config, ckpt)
        text = _run_tool(study, config, flags, PRETRAIN, os.path.join(run_dir, "eval.log"))
        loss, ppl = parse_eval_log(text, os.path.join(run_dir, "eval.log"))
        return {"source": "pretrain_gpt.py --eval-only", "val_loss": loss, "val_ppl": ppl,
                "experts_per_token": None, "dropped_fraction": None,
                "expert_flops_vs_dense": 1.0}, None
    # The sweep's --eval-iters counts micro-batches of one process: the same first
    # eval_iters x global batch samples as the validation of pretrain_gpt.py --eval-only.
    out = os.path.join(run_dir, "sweep")
    flags = ["--load", ckpt, "--data-path", *s.data_path, "--vocab-file", s.vocab_file,
             "--merge-file", s.merge_file, "--split", s.split, "--seed", str(s.seed),
             "--eval-iters", str(s.eval_iters * s.global_batch_size // s.micro_batch_size),
             "--micro-batch-size", str(s.micro_batch_size), "--out", out]
    if config.kind == "d2s":
        flags += ["--thresholds", *map(str, s.sweep_thresholds), "--dropless"]
    elif config.is_threshold:
        flags += ["--thresholds", str(config.threshold)]
    if os.path.exists(os.path.join(out, "sweep.json")):
        os.unlink(os.path.join(out, "sweep.json"))         # never read a previous sweep's
    _run_tool(study, config, flags, SWEEP_TOOL, os.path.join(run_dir, "sweep.log"))
    path = os.path.join(out, "sweep.json")
    sweep = read_json(path)
    if sweep is None:
        raise StudyError(f"{config.name}: tools/threshold_sweep.py wrote no {path}")
    check_sweep(sweep, path)
    row = as_trained_row(sweep, config)
    return evaluation_from_row(row, "tools/threshold_sweep.py"), \
        sweep if config.kind == "d2s" else None


def _run_tool(study: Study, config: StudyConfig, flags: List[str], script: str,
              log_path: str) -> str:
    cmd = study.command(flags, script)
    name = os.path.basename(script)
    print(f"== {config.name}: {name}, log {log_path}", flush=True)
    rc, text, _ = run_logged(cmd, log_path, study.env, f"== router_study: {shlex.join(cmd)}",
                             echo=study.echo)
    if rc != 0:
        raise StudyError(f"{config.name}: {name} exited with code {rc}: "
                         f"{first_error_line(text, name) or 'see the log'} (log: {log_path})")
    return text
