#!/usr/bin/env python3
"""Export a trained checkpoint as a Hugging Face model directory (or import a GPT-2 one).

    python tools/convert_to_hf.py --load CKPT --out DIR [--force] \\
        [--vocab-file V --merge-file M] [--no-verify]
    python tools/convert_to_hf.py --from-hf HF_DIR --out CKPT [--force]

Export: DIR gets config.json, model.safetensors, generation_config.json and the GPT-2 tokenizer
files (of the --vocab-file/--merge-file the run recorded, or the ones given). A dense model
whose architecture GPT-2 expresses exactly becomes transformers' own GPT2LMHeadModel (no remote
code); an MoE model (threshold, top-k, switch or hash routing), or a dense one with Megatron's
--onnx-safe GeLU, becomes XMoEForCausalLM, whose code is copied into DIR:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)              # as trained
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, threshold=0.5)

MoE inference there is dropless by default (drop_tokens=True applies the checkpoint's
evaluation capacity). Before DIR appears, the export is checked against the checkpoint (the
tokenizer's ids and the model's logits on a probe; --no-verify skips the logits). Any expert-
parallel size loads (the shards are merged).

--from-hf: a Hugging Face GPT-2 directory becomes a weights-only checkpoint of ours (iteration 0),
readable by tools that load checkpoints and by pretrain_gpt.py --load (fresh optimizer).

Bad input (a missing or incomplete checkpoint, one not written by xmoe, a missing vocabulary
file, an existing non-empty --out without --force, a GPT-2 variant our GPT cannot express) ends
with one line `convert_to_hf.py: error: ...`, exit 2, and nothing written: the output is staged
in a hidden sibling directory renamed to --out only when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

# Run as a script: import the megatron next to it (as pretrain_gpt.py does).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.cli import OneLineParser, error_line  # noqa: E402

PROG = "convert_to_hf.py"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="Checkpoint directory (pretrain_gpt.py --save).")
    source.add_argument("--from-hf", help="Hugging Face GPT-2 directory to import.")
    p.add_argument("--out", required=True, help="Directory to write.")
    p.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    p.add_argument("--vocab-file", default=None,
                   help="Default: the one the checkpoint's run recorded.")
    p.add_argument("--merge-file", default=None,
                   help="Default: the one the checkpoint's run recorded.")
    p.add_argument("--no-verify", action="store_true",
                   help="Skip the logits check (it loads a second copy of the model).")
    args = p.parse_args(argv)
    if args.from_hf and (args.vocab_file or args.merge_file or args.no_verify):
        raise ValueError("--vocab-file, --merge-file and --no-verify go with --load, not "
                         "--from-hf")
    return args


def export(args: argparse.Namespace) -> None:
    from megatron.hf.convert import export_checkpoint

    r = export_checkpoint(args.load, args.out, force=args.force, vocab_file=args.vocab_file,
                          merge_file=args.merge_file, verify=not args.no_verify)
    how = ("stock transformers, no remote code" if r.remote_code_reason is None else
           f"remote code, load with trust_remote_code=True: {r.remote_code_reason}")
    print(f"{PROG}: exported {args.load} (iteration {r.iteration}) -> {r.out_dir} as "
          f"{r.model_class} ({how})")
    for note in r.notes:
        print(f"{PROG}: {note}")
    if r.max_logit_difference is not None:
        print(f"{PROG}: checked: transformers' logits equal xmoe's within "
              f"{r.max_logit_difference:.2g} (fp32)")


def import_hf(args: argparse.Namespace) -> None:
    from megatron.hf.from_hf import import_gpt2

    r = import_gpt2(args.from_hf, args.out, force=args.force)
    c = r.config
    print(f"{PROG}: imported {args.from_hf} -> {r.out_dir} (GPT-2, {c.num_layers} layers, "
          f"hidden {c.hidden_size}, {c.num_attention_heads} heads, vocabulary "
          f"{c.padded_vocab_size} rows; weights only, iteration 0)")
    if r.has_tokenizer:
        print(f"{PROG}: its tokenizer is {os.path.join(r.out_dir, 'vocab.json')} and "
              f"merges.txt; train with --make-vocab-size-divisible-by "
              f"{r.make_vocab_size_divisible_by} to get {c.padded_vocab_size} rows")
    else:
        print(f"{PROG}: {args.from_hf} has no vocab.json/merges.txt: give --vocab-file and "
              "--merge-file when using the checkpoint")


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        try:
            import safetensors  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError(f"{e.name} is not installed: pip install -e '.[hf]' (transformers, "
                             "safetensors)") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()       # our lines only (the check loads the model)
        hf_logging.set_verbosity_error()
        export(args) if args.load else import_hf(args)
    except (ValueError, FileNotFoundError) as e:
        print(error_line(PROG, e), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
