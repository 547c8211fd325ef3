"""A slow, obviously correct pure-Python GPT-2 byte-level BPE, used as the ground truth.

It follows OpenAI's original `encoder.py` step by step (byte->unicode table, the GPT-2
pre-tokenisation regex, the "merge every occurrence of the lowest-ranked pair" loop), so the
compiled engine in `megatron.tokenizer` can be checked against it id for id. It also has a tiny
BPE trainer that writes GPT-2-format vocab/merges files for tests that need small vocabularies.

The preprocessing benchmark imports `ReferenceGPT2Tokenizer` as its pure-Python baseline, so
`encode` keeps GPT-2's per-word cache.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import regex

GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to 256, 257, ...
    in byte order, so no BPE symbol is whitespace or a control character.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    """All adjacent symbol pairs of a word."""
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def read_merges(merges_file: str | os.PathLike) -> list[tuple[str, str]]:
    """Merge pairs in rank order: skips a `#version` header and blank lines."""
    lines = Path(merges_file).read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]


class ReferenceGPT2Tokenizer:
    """GPT-2's byte-level BPE, written for clarity; ids equal the original implementation."""

    def __init__(self, vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(read_merges(merges_file))}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair (every occurrence, left to right) until none."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = get_pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            pairs = get_pairs(word)
        self.cache[token] = list(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: regex pre-tokenisation, bytes -> symbols, BPE, vocab lookup."""
        ids: list[int] = []
        for piece in GPT2_PATTERN.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(symbols))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Join token strings, map symbols back to bytes, decode UTF-8 with replacement."""
        text = "".join(self.decoder[i] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """`word` with every occurrence of `pair` merged, left to right."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(texts: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` byte-level merges: repeatedly merge the most frequent pair.

    Ties break on the pair itself (lexicographically smallest) so training is deterministic.
    """
    byte_encoder = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for piece in GPT2_PATTERN.findall(text):
            words[tuple(byte_encoder[b] for b in piece.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        counts: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for i in range(len(word) - 1):
                counts[(word[i], word[i + 1])] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new_words: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            new_words[_merge_word(word, best)] += n
        words = new_words
    return merges


def write_gpt2_files(
    merges: list[tuple[str, str]], out_dir: str | os.PathLike
) -> tuple[str, str]:
    """Write `vocab.json` (256 byte symbols, merge results in order, `<|endoftext|>`) and
    `merges.txt` (`#version: 0.2` header) in GPT-2's format; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for symbol in bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))  # a token made by two merges keeps one id
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(vocab_path), str(merges_path)


def train_tiny_bpe(
    texts: list[str], num_merges: int, out_dir: str | os.PathLike
) -> tuple[str, str]:
    """Learn a small byte-level BPE on `texts` and write GPT-2-format files into `out_dir`."""
    return write_gpt2_files(learn_merges(texts, num_merges), out_dir)
