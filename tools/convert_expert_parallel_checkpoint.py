"""Re-split a checkpoint's experts for another expert-parallel size (e.g. 8 GPUs -> 1 for eval).

    python tools/convert_expert_parallel_checkpoint.py --load CKPT_DIR --save NEW_DIR \
        --target-expert-parallel-size 1 [--iteration 1000]

Reads the checkpoint the pointer file of CKPT_DIR names (or --iteration), gathers every rank's
expert shard, and writes NEW_DIR/iter_XXXXXXX with the experts split for the target size, plus
NEW_DIR's pointer file, atomically. The result holds weights only: the optimizer state is
partitioned by world size and ZeRO stage and is not carried over, so `pretrain_gpt.py --load
NEW_DIR` evaluates (--eval-only) or continues with fresh optimizer state (a warning says so).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import megatron  # noqa: F401  (installed with pip, or run from a directory on sys.path)
except ImportError:  # `python tools/convert_expert_parallel_checkpoint.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.checkpointing import checkpoint_tag, read_tracker  # noqa: E402
from megatron.expert_checkpoint import convert_checkpoint, read_layout  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (with its pointer file)")
    p.add_argument("--save", required=True, help="directory for the converted checkpoint")
    p.add_argument("--target-expert-parallel-size", type=int, required=True)
    p.add_argument("--iteration", type=int, default=None,
                   help="convert this iteration instead of the one the pointer names")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.target_expert_parallel_size < 1:
            raise ValueError(f"--target-expert-parallel-size must be >= 1, got "
                             f"{args.target_expert_parallel_size}")
        if os.path.abspath(args.load) == os.path.abspath(args.save):
            raise ValueError("--save must differ from --load (the source is kept intact)")
        if args.iteration is not None:
            tag = checkpoint_tag(args.iteration)
        else:
            tag = read_tracker(args.load)
            if tag is None:
                raise FileNotFoundError(f"{args.load} has no latest_checkpointed_iteration.txt; "
                                        "give --iteration")
        source = int(read_layout(os.path.join(args.load, tag))["expert_parallel_size"])
        out = convert_checkpoint(args.load, tag, args.save, args.target_expert_parallel_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {os.path.join(args.load, tag)} (expert-parallel size {source}) -> {out} "
          f"(expert-parallel size {args.target_expert_parallel_size}, weights only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
