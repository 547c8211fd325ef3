#!/usr/bin/env python3
"""Check a pretrain_gpt.py command line for a number of processes, here, without torch or a GPU.

    python tools/check_pretrain_args.py --world-size 8 -- --num-layers 12 ... (pretrain_gpt.py's
        arguments)

Runs what pretrain_gpt.py runs before it builds anything, with `--world-size` processes in place
of the launcher's: parse_args; validate_args (batch divisibility, the expert-parallel size
against the experts and the processes, the DeepSpeed JSON against the flags, the data,
vocabulary and merge files present); the tokenizer from those files; build_configs (the model's
shape). Prints what it checked and exits 0, or prints one line
`check_pretrain_args.py: error: ...` and exits 2. The examples_deepspeed/MoE launch scripts run
it before launching, and alone with DRY_RUN=1.

Not checked here: anything that needs the GPUs, torch or the other nodes (the distributed
backend is resolved on them), nor the data files' contents.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Optional

# pretrain_gpt.py, run as a script, imports the megatron next to it: check with the same one.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.arguments import (  # noqa: E402
    RunConfig, build_configs, build_data_config, parse_args, validate_args)
from megatron.tokenizer import build_tokenizer  # noqa: E402

PROG = "check_pretrain_args.py"


def check(world_size: int, argv: list[str]) -> list[str]:
    """What was checked, one line each; ValueError naming the flag if the command is bad."""
    args = _parse(argv)
    # Resolving the default backend (nccl with CUDA) imports torch; the nodes resolve it.
    args.distributed_backend = "gloo"
    validated = validate_args(args, world_size)
    data = build_data_config(validated.flags)
    tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file,
                                make_vocab_size_divisible_by=data.make_vocab_size_divisible_by)
    run = build_configs(validated, tokenizer.padded_vocab_size)
    return _report(run, tokenizer.vocab_size)


def _parse(argv: list[str]) -> argparse.Namespace:
    """parse_args, with argparse's error (an unknown flag, a bad number) as a ValueError: its
    last line, without the usage text of every flag before it."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_args(argv)
    except SystemExit:
        last = (stderr.getvalue().strip().splitlines() or ["bad arguments"])[-1]
        raise ValueError(last.split(": error: ", 1)[-1]) from None


def _report(run: RunConfig, vocab_size: int) -> list[str]:
    m, t, d = run.model, run.training, run.data
    lines = [f"checked for {t.data_parallel_size} processes: --global-batch-size "
             f"{t.global_batch_size} = --micro-batch-size {t.micro_batch_size} x "
             f"{t.data_parallel_size} processes x {t.gradient_accumulation_steps} "
             "accumulation step(s)"]
    moe_layers = [layer for layer in range(1, m.num_layers + 1) if m.experts_for_layer(layer) > 1]
    if moe_layers:
        ep = m.moe.expert_parallel_size
        experts = sorted({m.experts_for_layer(layer) for layer in moe_layers})
        lines.append(f"  --moe-expert-parallel-size {ep} divides --num-experts "
                     f"{' '.join(map(str, experts))} and the {t.data_parallel_size} processes")
    if t.deepspeed_config is not None:
        lines.append(f"  --deepspeed_config {t.deepspeed_config} agrees with the flags (batch, "
                     f"clipping, precision, ZeRO stage {t.zero_stage})")
    lines.append(f"  files present: --data-path {' '.join(d.prefixes)} (.bin and .idx); "
                 f"--vocab-file {d.vocab_file} ({vocab_size} tokens); --merge-file "
                 f"{d.merge_file}")
    lines.append(f"  model: {m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{m.num_attention_heads} heads, FFN {m.ffn_hidden_size}, sequence "
                 f"{t.seq_length}" + (f"; MoE layers {','.join(map(str, moe_layers))}, experts "
                                      f"of FFN {m.moe.ffn_hidden_size}" if moe_layers else ""))
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, required=True,
                        help="Processes the launcher will start (GPUs per node x nodes).")
    parser.add_argument("--quiet", action="store_true", help="Print nothing when all is well.")
    parser.add_argument("pretrain_args", nargs=argparse.REMAINDER,
                        help="-- then pretrain_gpt.py's arguments.")
    ours = parser.parse_args(argv)
    gpt_argv = ours.pretrain_args[1:] if ours.pretrain_args[:1] == ["--"] else ours.pretrain_args
    try:
        lines = check(ours.world_size, gpt_argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    if not ours.quiet:
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
