"""Reading and validating GPT-2-format `vocab.json` / `merges.txt` files.

Every problem a user can cause (wrong path, truncated download, hand-edited file) becomes a
`TokenizerError` naming the file and, for merges, the line, instead of a KeyError deep
inside encoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron.tokenizer.byte_level import BYTE_TO_SYMBOL, SYMBOL_TO_BYTE
from megatron.tokenizer.errors import TokenizerError

EOD_TOKEN = "<|endoftext|>"


def _read_text(path: str | os.PathLike, what: str, flag: str) -> str:
    """The UTF-8 text of `path`, or a TokenizerError naming it and the flag that set it."""
    if path is None:
        raise TokenizerError(f"no {what} given (set {flag})")
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"{what} not found: {p} (set {flag})")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read {what} {p}: {e}") from e


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """The token -> id map of a GPT-2 vocab json, checked to be usable for byte-level BPE.

    Requires: a JSON object of str -> int, ids exactly 0..N-1, all 256 byte symbols, the
    `<|endoftext|>` token, and every entry made of byte symbols (so every id decodes).
    """
    text = _read_text(path, "vocab file", "--vocab-file")
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"vocab file {path} is not valid JSON: {e}") from e
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"vocab file {path} must hold a non-empty JSON object token -> id")
    for token, idx in vocab.items():
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise TokenizerError(f"vocab file {path}: id of {token!r} is {idx!r}, not an int")
        if any(c not in SYMBOL_TO_BYTE for c in token):
            raise TokenizerError(
                f"vocab file {path}: entry {token!r} (id {idx}) is not a byte-level symbol string"
            )
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(f"vocab file {path}: ids must be 0..{len(vocab) - 1}, each used once")
    missing = [s for s in BYTE_TO_SYMBOL.values() if s not in vocab]
    if missing:
        raise TokenizerError(
            f"vocab file {path} lacks {len(missing)} of the 256 byte symbols (e.g. {missing[0]!r})"
        )
    if EOD_TOKEN not in vocab:
        raise TokenizerError(f"vocab file {path} has no {EOD_TOKEN!r} (end-of-document) token")
    return vocab


def load_merges(path: str | os.PathLike, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merge pairs of a GPT-2 merges file, in rank order (line order).

    Skips a first line starting with `#version` and blank lines (GPT-2 files end with one).
    Each other line must be two symbol strings whose parts and concatenation are in `vocab`.
    """
    lines = _read_text(path, "merges file", "--merge-file").split("\n")
    seen: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        if (lineno == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"merges file {path}, line {lineno}: expected two tokens, got {line.strip()!r}"
            )
        pair = (parts[0], parts[1])
        for token in (parts[0], parts[1], parts[0] + parts[1]):
            if token not in vocab:
                raise TokenizerError(
                    f"merges file {path}, line {lineno}: {token!r} is not in the vocab file"
                )
        if pair in seen:
            raise TokenizerError(
                f"merges file {path}, line {lineno}: duplicate of the merge on line {seen[pair]}"
            )
        seen[pair] = lineno
        merges.append(pair)
    return merges
