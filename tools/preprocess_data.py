"""Tokenize loose JSON (one object per line) into Megatron mmap indexed datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-gpt2 \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --workers 8

Writes `<output-prefix>_<key>_document.bin/.idx` for every --json-keys key (`_sentence` with
--split-sentences). The .bin is byte-identical to Megatron-DeepSpeed's tool for the same input,
vocabulary and --append-eod; the work is done by `megatron.data.preprocess`. Torch-free.
Each output prefix is locked for the whole run: a second run writing the same --output-prefix
stops at once with the first one's PID, and hidden temporaries that a killed run left for the
prefix are removed by the next run (which says so).
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_REPO_ROOT, "megatron", "__init__.py")):
    sys.path.insert(0, _REPO_ROOT)   # this checkout's megatron, even if another is installed

from megatron.data.preprocess.config import PreprocessConfig, PreprocessError  # noqa: E402

PROG = "preprocess_data.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="loose-JSON file, a directory of them (non-hidden, by name) or a glob")
    g.add_argument("--json-keys", "--json-key", nargs="+", default=["text"], dest="json_keys",
                   help="keys to extract from each JSON object (default: text)")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (needs nltk punkt data offline)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="with --split-sentences, keep newlines between sentences")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count malformed lines instead of stopping at the first")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    g.add_argument("--vocab-file", required=True)
    g.add_argument("--merge-file", required=True)
    g.add_argument("--append-eod", action="store_true",
                   help="append an end-of-document token to every document")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g.add_argument("--dataset-impl", default="mmap", help="only mmap is supported")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    g.add_argument("--log-interval", type=int, default=100,
                   help="print progress every N lines, at most once per 2 s (default 100)")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """The only place that reads the argparse namespace."""
    return PreprocessConfig(
        input=args.input, output_prefix=args.output_prefix, vocab_file=args.vocab_file,
        merge_file=args.merge_file, json_keys=tuple(args.json_keys),
        tokenizer_type=args.tokenizer_type, append_eod=args.append_eod, workers=args.workers,
        log_interval=args.log_interval, dataset_impl=args.dataset_impl,
        keep_newlines=args.keep_newlines, split_sentences=args.split_sentences,
        skip_bad_lines=args.skip_bad_lines,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from megatron.data.preprocess.pipeline import run
    try:
        run(cfg)
    except (PreprocessError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
