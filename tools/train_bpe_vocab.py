#!/usr/bin/env python3
"""Train a byte-level BPE vocabulary and write it in GPT-2's file format.

Output: `<out-dir>/vocab.json` and `<out-dir>/merges.txt`, loadable with
`--tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ...`. The merges are learned by
HF `tokenizers` (a compiled, well-kept trainer) over the GPT-2 pre-tokenisation; the
`<|endoftext|>` token is appended last, as in GPT-2's own vocabulary. Used by the offline demo,
and by anyone who wants a domain vocabulary without downloading GPT-2's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Iterable, Iterator, Tuple

try:
    import megatron  # noqa: F401  (installed with pip, or run from a directory on sys.path)
except ImportError:  # `python tools/train_bpe_vocab.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EOD_TOKEN = "<|endoftext|>"


def train_bpe_vocab(texts: Iterable[str], vocab_size: int, out_dir: str,
                    min_frequency: int = 2) -> Tuple[str, str]:
    """Learn merges until `vocab_size` entries (256 byte symbols + merges + EOD); returns paths."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be >= 257 (256 bytes + EOD), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # room for <|endoftext|>
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        vocab_tmp, merges_tmp = tokenizer.model.save(tmp)
        with open(vocab_tmp, encoding="utf-8") as f:
            vocab = json.load(f)
        if EOD_TOKEN not in vocab:
            vocab[EOD_TOKEN] = len(vocab)
        vocab_path = os.path.join(out_dir, "vocab.json")
        merges_path = os.path.join(out_dir, "merges.txt")
        _write_atomic(vocab_path, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        with open(merges_tmp, "rb") as f:
            _write_atomic(merges_path, f.read())
    return vocab_path, merges_path


def _write_atomic(path: str, data: bytes) -> None:
    from megatron.fileio import atomic_write

    with atomic_write(path) as f:
        f.write(data)


def _iter_json_texts(paths: Iterable[str], key: str) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[key]
                except (ValueError, KeyError, TypeError) as exc:
                    raise SystemExit(f"train_bpe_vocab.py: error: {path}:{lineno}: "
                                     f"cannot read key {key!r}: {exc}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="loose-JSON files")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input: no such file: {path}")
    vocab, merges = train_bpe_vocab(_iter_json_texts(args.input, args.json_key), args.vocab_size,
                                    args.out_dir, args.min_frequency)
    print(f"wrote {vocab} and {merges}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
