"""BPE engines that turn text into GPT-2 ids: a compiled one and an exact Python fallback.

GPT-2's `bpe()` repeatedly takes the lowest-ranked adjacent pair and merges *every*
occurrence of it before looking again. HF `tokenizers` instead pops (rank, position) entries
from a heap, pushing the pairs each merge creates. The two agree exactly when the merge list
is *rank-monotone*: every token used by merge r is only ever produced by merges ranked below r
(or is a byte). Then each merge only creates pairs of higher rank, both algorithms apply ranks
in increasing order, and within one rank both go left to right. When a token is reachable by
two merges and used in between (possible in hand-made or unusually trained files), HF can let
a newly created lower-ranked pair jump ahead of pending occurrences of the current pair, so
such merge lists use `python_bpe`, a direct transcription of GPT-2's loop. GPT-2's own files
are rank-monotone (each token has exactly one merge, made before any use).
"""

from __future__ import annotations

from collections.abc import Callable

from megatron.tokenizer.byte_level import split_pieces, to_symbols


def merges_are_rank_monotone(merges: list[tuple[str, str]]) -> bool:
    """Whether every merge's operands are produced only by lower-ranked merges (or are bytes)."""
    last_made: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        last_made[left + right] = rank
    return all(
        last_made.get(left, -1) < rank and last_made.get(right, -1) < rank
        for rank, (left, right) in enumerate(merges)
    )


class WordCacheEncoder:
    """GPT-2 encoding: regex split, then each word's ids from a cache or from `merge_word`.

    Text is split by `split_words` (the `regex` module, as GPT-2 does) rather than by HF's
    Rust regex: HF's Oniguruma tables lag the `regex` module's Unicode version (letters new in
    Unicode 17 split differently), and its byte-level pre-tokenizer measured 2x slower on one
    thread than this split plus one dict lookup per word. Only unseen words are merged.
    """

    _CACHE_LIMIT = 500_000  # words; the cache is dropped when full to bound memory

    def __init__(self, name: str, merge_word: Callable[[str], list[int]]):
        self.name = name
        self._merge_word = merge_word
        self._cache: dict[str, list[int]] = {}

    def _miss(self, piece: str) -> list[int]:
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        ids = self._merge_word(to_symbols(piece))
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """GPT-2 ids of one text."""
        ids: list[int] = []
        cache = self._cache
        for piece in split_pieces(text):  # cached by raw piece: no byte mapping on a hit
            word_ids = cache.get(piece)
            ids.extend(word_ids if word_ids is not None else self._miss(piece))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """GPT-2 ids of many texts; they share the word cache."""
        return [self.encode(text) for text in texts]


def compiled_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> WordCacheEncoder:
    """Words merged by HF `tokenizers`' compiled BPE; exact only for rank-monotone merges."""
    from tokenizers import models  # compiled; imported on first build, not on import

    # No dropout, no unk token, no special tokens; a literal "<|endoftext|>" in text reaches
    # the model already split into ordinary pieces by the regex, exactly as in GPT-2.
    model = models.BPE(vocab=dict(vocab), merges=list(merges))
    return WordCacheEncoder(
        "hf-tokenizers", lambda word: [token.id for token in model.tokenize(word)]
    )


def python_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> WordCacheEncoder:
    """Words merged by a transcription of GPT-2's `bpe()` loop; exact for any merge list."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}

    def merge_word(word: str) -> list[int]:
        # Merge the lowest-ranked adjacent pair, all its occurrences left to right, until none.
        symbols = list(word)
        while len(symbols) > 1:
            ranked = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
            if not ranked:
                break
            _, (left, right) = min(ranked)
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [vocab[s] for s in symbols]

    return WordCacheEncoder("python", merge_word)


def build_engine(vocab: dict[str, int], merges: list[tuple[str, str]]) -> WordCacheEncoder:
    """The compiled engine when it is exact for `merges`, else the Python one."""
    if merges_are_rank_monotone(merges):
        return compiled_bpe(vocab, merges)
    return python_bpe(vocab, merges)
