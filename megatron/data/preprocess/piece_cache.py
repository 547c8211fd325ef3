"""Memoized GPT-2 tokenization for bulk preprocessing: ids cached per word-like segment.

GPT-2's byte-level BPE first cuts text into pre-tokens with one regex and never merges across
them, so a text's ids are the concatenation of its pre-tokens' ids. Natural text repeats a small
set of words, so nearly every segment is a dict hit and only new strings reach the tokenizer.

* segments: the text cut before every " " whose next character is not whitespace, the space
  going with the right part (" word,"). Each cut is a pre-token boundary, and each part
  pre-tokenizes alone exactly as in context (proof in `split_segments`). Cutting is one stdlib
  `re.sub` (hiding the spaces that are not cuts) and one `str.split`, both in C.
* misses: new segments go to the tokenizer (the `regex` pre-tokenizer of the original GPT-2
  encoder, its word cache and compiled merges), all of a text joined in one call.

The ids are therefore those the original tool writes (tests compare with the pure-Python
reference on adversarial text).

`segment_cached_tokenizer` gives the same algorithm compiled (segment_cache.cpp, built by
`pip install -e .`: cutting, caches and the batch's flat id array in C++, misses still tokenized
in Python) when the extension is built and XMOE_NO_CPP is not 1, else `PieceCachedTokenizer`.
"""

from __future__ import annotations

import os
import re
from itertools import chain, filterfalse, islice
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_CACHED = 2_000_000    # entries per cache; bounds memory on corpora with huge vocabularies

# A space that is NOT a cut: followed by whitespace or by the end of the text. The stdlib `re`
# `\s` is exactly `str.isspace` (checked over all code points in the tests), a superset of the
# GPT-2 pattern's `\s`, so a doubtful position is never cut, which is always safe.
_SPACE_NOT_CUT = re.compile(r" (?=\s|\Z)")
_HIDDEN_SPACE = "\uffff"   # stands for such a space while splitting; texts holding it fall back
_RESTORE = str.maketrans(_HIDDEN_SPACE, " ")


def split_parts(text: str) -> Optional[List[str]]:
    """Segments of `text` as [first, rest...] where segment i >= 1 is " " + rest (hidden spaces
    as U+FFFF); None when the text itself contains U+FFFF (use `split_segments`)."""
    if _HIDDEN_SPACE in text:
        return None
    return _SPACE_NOT_CUT.sub(_HIDDEN_SPACE, text).split(" ")


def split_segments(text: str) -> List[str]:
    """`text` cut before every " " whose next character is not whitespace.

    Why each cut is exact: every alternative of the GPT-2 pattern that can hold a space either
    starts with it (" ?\\p{L}+", ...) or is all whitespace. Left of the cut, a non-whitespace
    pre-token stops at the space; a whitespace run stops before its last space, because
    `\\s+(?!\\S)` backtracks to leave that space to the next non-whitespace run, and alone at the
    end of a part the same run matches to the end. Right of the cut, " X..." starts a pre-token
    (a space-led alternative matches before the whitespace ones), and the pattern has no
    look-behind. So the segments' pre-tokens, concatenated, are the text's.
    """
    parts = split_parts(text)
    if parts is not None:
        return [parts[0].translate(_RESTORE)] + [" " + p.translate(_RESTORE) for p in parts[1:]]
    pieces = text.split(" ")
    segments = [pieces[0]]
    for piece in pieces[1:]:
        if piece and not piece[0].isspace():
            segments.append(" " + piece)
        else:
            segments[-1] += " " + piece
    return segments


class PieceCachedTokenizer:
    """`tokenize_batch` of a GPT-2 byte-level BPE tokenizer with segment -> ids caches.

    Misses are tokenized together, once per text: segments joined back to back meet only at
    exact cuts (each later one starts with " " + non-space), so the ids of the joined string are
    the segments' ids in order; they are cut apart where the tokens' cumulative byte length
    reaches each segment's (a GPT-2 symbol is one byte).
    """

    def __init__(self, tokenizer, max_cached: int = MAX_CACHED):
        self._tokenizer = tokenizer
        self._max_cached = max_cached
        self._first: Dict[str, Tuple[int, ...]] = {}    # a text's first segment, raw
        self._spaced: Dict[str, Tuple[int, ...]] = {}   # segment " " + key (hidden spaces)
        self._token_nbytes = token_nbytes(tokenizer)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._ids(text) for text in texts]

    def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids int32 [sum(lengths)], lengths int64 [len(texts)]): the texts' ids back to back."""
        return flatten(self.tokenize_batch(texts))

    def _ids(self, text: str) -> List[int]:
        parts = split_parts(text)
        if parts is None:   # rare: the text holds the stand-in character itself
            return list(self._tokenizer.tokenize(text))
        spaced = self._spaced
        first = self._first.get(parts[0])
        try:    # the common case once warm: every segment is known
            if first is not None:
                return list(chain(first, chain.from_iterable(
                    map(spaced.__getitem__, islice(parts, 1, None)))))
        except KeyError:
            pass
        self._add(parts)
        return list(chain(self._first[parts[0]], chain.from_iterable(
            map(spaced.__getitem__, islice(parts, 1, None)))))

    def _add(self, parts: List[str]) -> None:
        """Tokenize the unknown segments of one text in one joined call and cache them.

        The text's first segment (if unknown) goes first; every later one starts with " " +
        non-space, so each junction in the joined string is an exact cut.
        """
        for cache in (self._first, self._spaced):
            if len(cache) > self._max_cached:
                cache.clear()
        keys: List[Tuple[Dict[str, Tuple[int, ...]], str]] = []
        segments: List[str] = []
        if parts[0] not in self._first:
            if parts[0]:
                keys.append((self._first, parts[0]))
                segments.append(parts[0].translate(_RESTORE))
            else:
                self._first[""] = ()
        for key in filterfalse(self._spaced.__contains__, set(islice(parts, 1, None))):
            keys.append((self._spaced, key))
            segments.append(" " + key.translate(_RESTORE))
        if not segments:
            return
        ids = self._tokenizer.tokenize("".join(segments))
        token_ends = np.cumsum(self._token_nbytes[np.asarray(ids, dtype=np.int64)])
        segment_ends = np.cumsum([len(s.encode("utf-8")) for s in segments])
        cuts = np.searchsorted(token_ends, segment_ends, side="right")
        assert cuts[-1] == len(ids) and np.array_equal(token_ends[cuts - 1], segment_ends), \
            "a token crossed an exact cut"
        start = 0
        for (cache, key), cut in zip(keys, cuts.tolist()):
            cache[key] = tuple(ids[start:cut])
            start = cut


def token_nbytes(tokenizer) -> np.ndarray:
    """Bytes each id stands for: its number of GPT-2 symbols (one symbol is one byte)."""
    inv = tokenizer.inv_vocab
    return np.array([len(inv[i]) for i in range(len(inv))], dtype=np.int64)


def flatten(ids: Sequence[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32, lengths int64) of per-text id lists."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def compiled_segment_cache():
    """The C++ `_segment_cache` module; None when it is not built or XMOE_NO_CPP=1."""
    if os.environ.get("XMOE_NO_CPP") == "1":
        return None
    try:
        from megatron.data.preprocess import _segment_cache
    except ImportError:
        return None
    return _segment_cache


class CompiledSegmentTokenizer:
    """`PieceCachedTokenizer` with cutting, caches and output arrays in C++.

    Per batch, the new segments go back to Python in few `tokenize` calls: each new first
    segment alone (what precedes it would change its pre-tokens) and all new later segments
    joined (each starts with " " + non-space, so every junction is an exact cut).
    """

    def __init__(self, tokenizer, module, max_cached: int = MAX_CACHED):
        self._tokenize = tokenizer.tokenize
        self._cache = module.SegmentCache(token_nbytes(tokenizer), max_cached)

    def encode_batch(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(ids int32 [sum(lengths)], lengths int64 [len(texts)]): the texts' ids back to back."""
        return self._cache.encode_batch(list(texts), self._tokenize)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        ids, lengths = self.encode_batch(texts)
        return [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] if len(texts) else []


def segment_cached_tokenizer(tokenizer, max_cached: int = MAX_CACHED):
    """The compiled segment cache when built (see `compiled_segment_cache`), else the Python one."""
    module = compiled_segment_cache()
    if module is None:
        return PieceCachedTokenizer(tokenizer, max_cached)
    return CompiledSegmentTokenizer(tokenizer, module, max_cached)
