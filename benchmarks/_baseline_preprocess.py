"""Baseline for benchmarks/preprocess.py: the original Megatron-DeepSpeed tool's approach.

Text-mode reading, `Pool.imap(encode, lines, 25)`, `json.loads` per line, pure-Python GPT-2
BPE with a per-word cache (tests/tokenizer/gpt2_reference.py), one `add_item(torch.IntTensor)`
plus `end_document` per document. Like the original it imports torch (its `megatron` package and
indexed dataset did), which is part of its whole-process time. Only what the benchmark needs:
one key, GPT-2 BPE, mmap output (written with our builder, which is no slower than the original).
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402,F401  (the original tool imports torch)

from megatron.data.indexed_dataset import (  # noqa: E402
    MMapIndexedDatasetBuilder, best_fitting_dtype)
from tests.tokenizer.gpt2_reference import ReferenceGPT2Tokenizer  # noqa: E402


class Encoder:
    """Per worker: a tokenizer built in the pool initializer, then one call per line."""

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = ReferenceGPT2Tokenizer(self.args.vocab_file, self.args.merge_file)
        Encoder.eod = Encoder.tokenizer.encoder["<|endoftext|>"]

    def encode(self, line):
        text = json.loads(line)[self.args.json_key]
        ids = Encoder.tokenizer.encode(text)
        if ids and self.args.append_eod:
            ids.append(Encoder.eod)
        return ids, len(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--vocab-file", required=True)
    p.add_argument("--merge-file", required=True)
    p.add_argument("--json-key", default="text")
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=100)
    args = p.parse_args()

    encoder = Encoder(args)
    vocab_size = len(ReferenceGPT2Tokenizer(args.vocab_file, args.merge_file).encoder)
    builder = MMapIndexedDatasetBuilder(f"{args.output_prefix}_{args.json_key}_document",
                                        dtype=best_fitting_dtype(vocab_size))
    start = time.time()
    chars = 0
    with open(args.input, "r", encoding="utf-8") as fin, \
            multiprocessing.Pool(args.workers, initializer=encoder.initializer) as pool:
        for i, (ids, n) in enumerate(pool.imap(encoder.encode, fin, 25), start=1):
            chars += n
            if ids:
                builder.add_item(torch.IntTensor(ids))
                builder.end_document()
            if i % args.log_interval == 0:
                t = time.time() - start
                print(f"Processed {i} documents ({i / t:.1f} docs/s, {chars / t / 1e6:.2f} MB/s).",
                      file=sys.stderr, flush=True)
    builder.finalize()


if __name__ == "__main__":
    main()
