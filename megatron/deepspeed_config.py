"""DeepSpeed's JSON config: read it, cross-check it with the Megatron flags, adapt a user's JSON
to the engine (legacy sections DeepSpeed refuses), or build it.

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

# Top-level sections DeepSpeed refuses since it removed their features (0.19.8's
# deepspeed/runtime/config.py, _REMOVED_TOP_LEVEL_CONFIG_KEYS; deepspeedai/DeepSpeed#8489),
# each with what this trainer does instead. Megatron-DeepSpeed's templates wrote some of them
# switched off (examples_deepspeed/MoE: "curriculum_learning": {"enabled": false, ...}): such a
# section is dropped before DeepSpeed sees it; one that asks for its feature is refused.
LEGACY_SECTIONS = {
    "curriculum_learning": "every sample has --seq-length tokens from the first step",
    "progressive_layer_drop": "every layer runs at every step",
    "elasticity": "the batch is fixed by --global-batch-size and --micro-batch-size",
    "amp": "mixed precision comes from --fp16 or --bf16",
    "nebula": "checkpoints are written to --save",
    "compression_training": "the model trains unquantized and unpruned",
    "quantize_training": "the model trains unquantized",
    "eigenvalue": "the model trains unquantized",
    "sparse_attention": "attention is dense",
    "sparse_gradients": "gradients are reduced dense",
    "graph_harvesting": "graph capture comes from --compile or --moe-routing-cuda-graphs",
}
_ON_WHEN_PRESENT = ("sparse_attention",)      # had no "enabled" switch
# DeepSpeed's throughput timer (on by default) synchronises the device at the start of every
# forward and at every step: the GPU's queue drains twice per step and the host, not the GPU,
# sets the pace of what follows (measured in benchmarks/HISTORY.md). Our training log prints
# tokens/s without it; a JSON that has a "timers" section, or asks for wall_clock_breakdown
# (DeepSpeed's timers, synchronising anyway), keeps DeepSpeed's choice.
def quiet_timers() -> dict:
    return {"throughput": {"enabled": False}}


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
    _check_legacy_sections(config, where)
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


def _check_legacy_sections(config: dict, where: str) -> None:
    """ValueError for a LEGACY_SECTIONS entry that asks for its feature."""
    for key, instead in LEGACY_SECTIONS.items():
        if key in config and _switched_on(key, config[key]):
            raise ValueError(f'{where}: "{key}" is switched on: not supported (DeepSpeed removed '
                             f'it, deepspeedai/DeepSpeed#8489); instead {instead}. Switch it '
                             'off or remove it')


def _switched_on(key: str, value: object) -> bool:
    """Whether a legacy section asks for its feature: `true`, an object whose "enabled" (at any
    depth: compression_training has one per technique) is set, or a non-empty sparse_attention.
    Off: false, null, {}, or objects whose every "enabled" is false or absent (DeepSpeed's
    defaults for these were off)."""
    if value in (None, False, {}):
        return False
    if not isinstance(value, dict):
        return True
    if key in _ON_WHEN_PRESENT:
        return True
    return _enabled_anywhere(value)


def _enabled_anywhere(section: dict) -> bool:
    if section.get("enabled", False) not in (False, None):
        return True
    return any(_enabled_anywhere(v) for v in section.values() if isinstance(v, dict))


def _check_zero_stage(stage: object, what: str) -> None:
    if stage == 3:
        raise ValueError(f"{what} 3 (ZeRO-3) is not supported (0, 1 or 2)")
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        raise ValueError(f"{what} must be 0, 1 or 2, got {stage!r}")


def deepspeed_config_dict(run: RunConfig) -> dict:
    """The DeepSpeed config for `run`: --deepspeed_config's JSON (already cross-checked by
    validate_args) with the batch and clipping keys it leaves out filled in and adapted to the
    engine (`_adapt_for_engine`), or, without one, a config built from the flags so that the
    engine and our own loop agree."""
    t = run.training
    built = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": run.optimizer.clip_grad,
        "steps_per_print": 2 ** 31 - 1,      # we print our own log lines every --log-interval
        "wall_clock_breakdown": False,
        "timers": quiet_timers(),
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
    _adapt_for_engine(config, t.deepspeed_config)
    return config


def _adapt_for_engine(config: dict, path: str) -> None:
    """Make a user's (validated) JSON one DeepSpeed 0.19.8 runs with this trainer, in place, and
    say what changed in one line on rank 0:
    switched-off LEGACY_SECTIONS are left out (DeepSpeed refuses the key whatever its value);
    without a "timers" section (and without wall_clock_breakdown) the throughput timer is off
    (quiet_timers).
    """
    notes = []
    if "timers" not in config and not config.get("wall_clock_breakdown", False):
        config["timers"] = quiet_timers()
        notes.append("DeepSpeed's throughput timer is off (it synchronises the GPU twice per "
                     "step; the log prints tokens/s; a \"timers\" section keeps it)")
    dropped = [key for key in LEGACY_SECTIONS if key in config]
    if dropped:
        for key in dropped:
            del config[key]
        names = ", ".join(f'"{key}"' for key in dropped)
        notes.append(f"left out the switched-off legacy section(s) {names}, which DeepSpeed no "
                     "longer accepts (deepspeedai/DeepSpeed#8489)")
    if notes:
        from megatron.initialize import print_rank_0  # torch: only where the engine is built

        print_rank_0(f"--deepspeed_config {path}: {'; '.join(notes)}")
