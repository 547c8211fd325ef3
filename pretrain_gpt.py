#!/usr/bin/env python3
"""Pretrain a GPT with XMoE mixture-of-experts layers (Megatron-DeepSpeed's command line).

    python pretrain_gpt.py --num-layers 12 --hidden-size 768 ... --data-path PREFIX
    deepspeed pretrain_gpt.py ...   |   torchrun --nproc-per-node 8 pretrain_gpt.py ...

parse -> validate -> tokenizer (padded vocabulary) -> typed configs -> megatron.training.pretrain.
A ValueError from the flags, the configs, the data (a token id outside the vocabulary
included) or a checkpoint, or a checkpoint save that failed (a full disk), ends the run with one
line `pretrain_gpt.py: error: ...` and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Optional

from megatron.arguments import build_configs, build_data_config, parse_args, validate_args
from megatron.checkpoint_check import CheckpointWriteError
from megatron.initialize import distributed_env
from megatron.tokenizer import build_tokenizer

PROG = "pretrain_gpt.py"


def error_message(e: BaseException) -> str:
    """One line for the user. An exception raised in a DataLoader worker arrives re-raised as
    the same type whose message holds the worker's whole traceback; its last line is the
    original `ValueError: message`."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)              # argparse itself exits 2 on unknown flags / bad numbers
    env, training = None, False
    try:
        env = distributed_env(args.local_rank)
        validated = validate_args(args, env.world_size)
        data = build_data_config(validated.flags)
        tokenizer = build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file,
                                    make_vocab_size_divisible_by=data.make_vocab_size_divisible_by)
        run = build_configs(validated, tokenizer.padded_vocab_size)
        from megatron.training import pretrain  # torch and deepspeed: only for a valid command

        training = True
        pretrain(run, vocab_size=tokenizer.vocab_size)
    except (ValueError, FileNotFoundError, CheckpointWriteError) as e:
        # Setup errors are the same on every rank: rank 0 reports them. An error while
        # training (e.g. a bad token id in one rank's batch) is reported by the rank hitting it.
        rank = 0 if env is None else env.rank
        if rank == 0 or training:
            where = f" (rank {rank})" if training and env.world_size > 1 else ""
            print(f"{PROG}: error{where}: {error_message(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
