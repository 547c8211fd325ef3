"""DeepSpeed's JSON config: read it, cross-check it with the Megatron flags, or build it.

Part of the command-line layer (`megatron/arguments.py` calls `check_deepspeed_args` from
`validate_args`); the training code only receives the dict from `deepspeed_config_dict`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.arguments import RunConfig



def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed JSON at `path`; ValueError naming the file if missing or not a JSON object."""
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed_config: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed_config: {path} must hold a JSON object, "
                         f"got {type(config).__name__}")
    return config


def check_deepspeed_args(args: argparse.Namespace, world_size: int) -> int:
    """Cross-check --deepspeed_config with the flags; the ZeRO stage to use."""
    stage = 0 if args.zero_stage is None else args.zero_stage
    if args.deepspeed_config is None:
        _check_zero_stage(stage, "--zero-stage")
        return stage
    if not args.deepspeed:
        raise ValueError("--deepspeed_config needs --deepspeed")
    path = args.deepspeed_config
    config = read_deepspeed_config(path)
    where = f"--deepspeed_config {path}"
    accumulation = args.global_batch_size // (args.micro_batch_size * world_size)
    for key, flag, value in (
            ("train_batch_size", "--global-batch-size", args.global_batch_size),
            ("train_micro_batch_size_per_gpu", "--micro-batch-size", args.micro_batch_size),
            ("gradient_accumulation_steps",
             "--global-batch-size / (--micro-batch-size x data-parallel size)", accumulation),
            ("gradient_clipping", "--clip-grad", args.clip_grad)):
        if key in config and config[key] != value:
            raise ValueError(f"{where}: {key} {config[key]} does not match {flag} {value}")
    for section, flag, on in (("fp16", "--fp16", args.fp16), ("bf16", "--bf16", args.bf16)):
        enabled = _section(config, section, where).get("enabled", False) is True
        if section == "bf16":
            enabled = enabled or _section(config, "bfloat16", where).get("enabled") is True
        if enabled != on:
            raise ValueError(f"{where}: {section}.enabled is {str(enabled).lower()} but {flag} "
                             f"is {'given' if on else 'not given'}")
    json_stage = _section(config, "zero_optimization", where).get("stage", 0)
    _check_zero_stage(json_stage, f"{where}: zero_optimization.stage")
    if args.zero_stage is not None and args.zero_stage != json_stage:
        raise ValueError(f"{where}: zero_optimization.stage {json_stage} does not match "
                         f"--zero-stage {args.zero_stage}")
    if _section(config, "curriculum_learning", where).get("enabled") is True:
        raise ValueError(f"{where}: curriculum_learning is not supported")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"{where}: an {key!r} section is not supported; the optimizer and "
                             "LR schedule come from the --lr*/--adam-*/--weight-decay flags")
    return json_stage


def _section(config: dict, key: str, where: str) -> dict:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key} must be a JSON object, got {value!r}")
    return value


def _check_zero_stage(stage: object, what: str) -> None:
    if stage == 3:
        raise ValueError(f"{what} 3 (ZeRO-3) is not supported (0, 1 or 2)")
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        raise ValueError(f"{what} must be 0, 1 or 2, got {stage!r}")


def deepspeed_config_dict(run: RunConfig) -> dict:
    """The DeepSpeed config for `run`: --deepspeed_config's JSON (already cross-checked by
    validate_args) with the batch and clipping keys it leaves out filled in, or, without one, a
    config built from the flags so that the engine and our own loop agree."""
    t = run.training
    built = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": run.optimizer.clip_grad,
        "steps_per_print": 2 ** 31 - 1,      # we print our own log lines every --log-interval
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": t.zero_stage},
        "fp16": {"enabled": t.fp16},
        "bf16": {"enabled": t.bf16},
    }
    if t.fp16:
        built["fp16"].update({
            "loss_scale": 0 if t.loss_scale is None else t.loss_scale,   # 0: dynamic
            "initial_scale_power": int(math.log2(t.initial_loss_scale)),
            "loss_scale_window": t.loss_scale_window,
            "hysteresis": t.hysteresis,
            "min_loss_scale": t.min_loss_scale,
        })
    if t.deepspeed_config is None:
        return built
    config = read_deepspeed_config(t.deepspeed_config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping"):
        config.setdefault(key, built[key])
    return config
