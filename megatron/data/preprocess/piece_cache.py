"""Memoized GPT-2 tokenization for bulk preprocessing: ids cached per word-like segment.

GPT-2's byte-level BPE first cuts text into pre-tokens with one regex and never merges across
them, so a text's ids are the concatenation of its pre-tokens' ids. Natural text repeats a small
set of words, so nearly every lookup is a dict hit and only new strings reach the regex and the
compiled tokenizer. Two levels:

* segments: the text cut at every single space that has a non-space character on both sides,
  the space going with the right part (" word,"). Each cut is a pre-token boundary, and each
  part pre-tokenizes alone exactly as in context (proof in `split_segments`). Cutting needs only
  `str.split`, several times faster than running the pre-tokenizer regex over the whole text.
* pieces: a new segment is pre-tokenized with the `regex` package and the pattern of the
  original GPT-2 encoder (and Megatron's tokenizer); new pieces go to `tokenize_batch`.

The ids are therefore those the original tool writes (tests compare with the pure-Python
reference on adversarial text).
"""

from __future__ import annotations

from itertools import chain
from typing import Dict, Iterable, List, Sequence, Tuple

import regex

GPT2_PRETOKENIZER = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
MAX_CACHED = 2_000_000    # entries per level; bounds memory on corpora with huge vocabularies


def split_segments(text: str) -> List[str]:
    """`text` cut before every " " that has a non-whitespace character on both sides.

    Why each cut is exact: the pre-token holding the character left of such a space cannot hold
    the space (a pre-token with a space starts with it or is all whitespace); the pre-token at the
    space is " " plus a run of letters, digits or other symbols (one of those alternatives always
    matches before the whitespace ones); the pattern has no look-behind, and the runs and the
    `\\s+(?!\\S)` look-ahead that end a part stop at that space both in context and at the end
    of the part. So the segments' pre-tokens, concatenated, are the text's. `str.isspace` is a
    superset of the pattern's `\\s`, so a doubtful cut is skipped, which is always safe.
    (A Python loop over `str.split`: measured faster than a look-around `re.split`.)
    """
    parts = text.split(" ")
    segments: List[str] = []
    current = parts[0]
    for part in parts[1:]:
        if part and current and not part[0].isspace() and not current[-1].isspace():
            segments.append(current)
            current = " " + part
        else:
            current += " " + part    # in-place append in CPython: linear even for long runs
    segments.append(current)
    return segments


def _is_inner(segment: str) -> bool:
    """Starts with " " + non-space and ends with non-space: cutting next to it is exact."""
    return (len(segment) > 1 and segment[0] == " " and not segment[1].isspace()
            and not segment[-1].isspace())


class PieceCachedTokenizer:
    """`tokenize_batch` of a GPT-2 byte-level BPE tokenizer with segment and piece id caches."""

    def __init__(self, tokenizer, max_cached: int = MAX_CACHED):
        self._tokenizer = tokenizer
        self._max_cached = max_cached
        self._segments: Dict[str, Tuple[int, ...]] = {}
        self._pieces: Dict[str, Tuple[int, ...]] = {}

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._ids(split_segments(text)) for text in texts]

    def _ids(self, segments: List[str]) -> List[int]:
        cache = self._segments
        try:    # the common case once warm: every segment is known
            return list(chain.from_iterable(map(cache.__getitem__, segments)))
        except KeyError:
            pass
        if len(cache) > self._max_cached:
            cache.clear()
        self._add_segments(set(segments).difference(cache))
        return list(chain.from_iterable(map(cache.__getitem__, segments)))

    def _add_segments(self, segments: Iterable[str]) -> None:
        known = self._pieces
        if len(known) > self._max_cached:
            known.clear()
        pieces_of = self._pretokenize(list(segments))
        new = list({p for _, pieces in pieces_of for p in pieces if p not in known})
        if new:
            # A piece alone pre-tokenizes to itself, so its ids alone are its ids in context.
            for piece, ids in zip(new, self._tokenizer.tokenize_batch(new)):
                known[piece] = tuple(ids)
        lookup = known.__getitem__
        for segment, pieces in pieces_of:
            self._segments[segment] = tuple(chain.from_iterable(map(lookup, pieces)))

    @staticmethod
    def _pretokenize(segments: List[str]) -> List[Tuple[str, List[str]]]:
        """Each segment with its pre-tokens; "inner" segments share one regex pass.

        Inner segments joined back to back meet only at exact cuts (see `split_segments`), so
        the pre-tokens of the joined string are theirs in order; they are handed back by length.
        """
        inner = [s for s in segments if _is_inner(s)]
        out = [(s, GPT2_PRETOKENIZER.findall(s)) for s in segments if not _is_inner(s)]
        pieces = iter(GPT2_PRETOKENIZER.findall("".join(inner)))
        for segment in inner:
            mine: List[str] = []
            length = 0
            while length < len(segment):
                piece = next(pieces)
                mine.append(piece)
                length += len(piece)
            assert length == len(segment), "pre-token crossed an exact cut"
            out.append((segment, mine))
        return out
