"""Worker side: parse, validate and tokenize one chunk of lines into compact numpy arrays.

A worker process builds one `ChunkEncoder` in its initializer (tokenizer loaded once) and
turns each `Chunk` into a `ChunkResult`: per key, the flat token ids of the chunk's written
sequences plus their lengths, and per line what was skipped and why. Returning two arrays per
key instead of one list per document keeps pickling between processes cheap.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.data.preprocess.config import PreprocessConfig, PreprocessError
from megatron.data.preprocess.inputs import Chunk

# Reasons a line or document is skipped, as they appear in the summary.
BLANK = "blank line"
BOM = "byte-order mark"
BAD_UTF8 = "invalid UTF-8"
BAD_JSON = "malformed JSON"
NOT_OBJECT = "not a JSON object"
MISSING_KEY = "missing key"
NOT_STRING = "text not a string"
SURROGATE = "lone surrogate"
EMPTY_TEXT = "empty text"       # per key: "" (not an error)
NO_TOKENS = "no tokens"         # per key: non-empty text that tokenizes to nothing

_UTF8_BOM = b"\xef\xbb\xbf"
_SURROGATES = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class BadLine:
    line: int            # 1-based line number in its file
    reason: str          # one of the reason constants above
    message: str         # one line, starts with the reason


@dataclass
class KeyOutput:
    """One key's written sequences of a chunk, in input order."""

    tokens: np.ndarray           # [sum(seq_lengths)] ids in the dataset dtype
    seq_lengths: np.ndarray      # [S] int64, one per sequence (sentence or document)
    doc_seq_counts: np.ndarray   # [D] int64, sequences in each written document
    skipped: Dict[str, int] = field(default_factory=dict)   # EMPTY_TEXT / NO_TOKENS counts


@dataclass
class ChunkResult:
    file_index: int
    n_lines: int
    n_bytes: int
    n_docs: int                  # non-blank lines that passed validation
    n_blank: int
    bad_lines: List[BadLine]
    keys: Dict[str, KeyOutput]


@dataclass(frozen=True)
class EncoderSettings:
    """What a worker needs to rebuild the encoder (picklable, small)."""

    json_keys: Tuple[str, ...]
    tokenizer_type: str
    vocab_file: str
    merge_file: str
    make_vocab_size_divisible_by: int
    append_eod: bool
    split_sentences: bool
    keep_newlines: bool

    @classmethod
    def from_config(cls, cfg: PreprocessConfig) -> "EncoderSettings":
        return cls(tuple(cfg.json_keys), cfg.tokenizer_type, cfg.vocab_file, cfg.merge_file,
                   cfg.make_vocab_size_divisible_by, cfg.append_eod, cfg.split_sentences,
                   cfg.keep_newlines)


class ChunkEncoder:
    """Tokenizer (and optional sentence splitter) plus the per-chunk encoding logic."""

    def __init__(self, settings: EncoderSettings):
        from megatron.data.indexed_dataset import best_fitting_dtype
        from megatron.tokenizer import build_tokenizer

        self.settings = settings
        try:
            self.tokenizer = build_tokenizer(
                tokenizer_type=settings.tokenizer_type, vocab_file=settings.vocab_file,
                merge_file=settings.merge_file,
                make_vocab_size_divisible_by=settings.make_vocab_size_divisible_by)
        except (ValueError, NotImplementedError, OSError, KeyError) as e:
            raise PreprocessError(
                f"cannot build tokenizer {settings.tokenizer_type!r}: {e}") from None
        self.dtype = np.dtype(best_fitting_dtype(self.tokenizer.vocab_size))
        from megatron.data.preprocess import piece_cache
        if settings.tokenizer_type == "GPT2BPETokenizer":
            self.encode_batch = piece_cache.segment_cached_tokenizer(self.tokenizer).encode_batch
        else:
            self.encode_batch = lambda texts: piece_cache.flatten(
                self.tokenizer.tokenize_batch(texts))
        self.splitter = None
        if settings.split_sentences:
            from megatron.data.preprocess.sentences import load_sentence_splitter
            self.splitter = load_sentence_splitter(settings.keep_newlines)

    def encode(self, chunk: Chunk) -> ChunkResult:
        keys = self.settings.json_keys
        lines = chunk.data.split(b"\n")
        texts: List[Tuple[str, ...]] = []
        bad: List[BadLine] = []
        n_blank = 0
        for offset, raw in enumerate(lines):
            try:
                parsed = parse_line(raw, keys)
            except LineError as e:
                bad.append(BadLine(chunk.first_line + offset, e.reason, str(e)))
                continue
            if parsed is None:
                n_blank += 1
            else:
                texts.append(parsed)
        outputs = {k: self._encode_texts([t[i] for t in texts]) for i, k in enumerate(keys)}
        return ChunkResult(chunk.file_index, len(lines), chunk.n_bytes, len(texts),
                           n_blank, bad, outputs)

    def _encode_texts(self, texts: Sequence[str]) -> KeyOutput:
        """Tokenize one key's documents: each non-empty one becomes 1+ sequences (+ EOD)."""
        if self.splitter is not None:
            sentences = [self.splitter(t) for t in texts]
            flat = list(chain.from_iterable(sentences))
            per_doc = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        else:
            flat, per_doc = list(texts), np.ones(len(texts), dtype=np.int64)
        if flat:
            ids, lengths = self.encode_batch(flat)
        else:
            ids, lengths = np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64)
        # Sequences without ids are dropped; a document left with none writes nothing, not
        # even an end of document (as Megatron does).
        nonempty = lengths > 0
        doc_of_seq = np.repeat(np.arange(len(texts)), per_doc)
        seq_counts = np.bincount(doc_of_seq[nonempty], minlength=len(texts))
        written = seq_counts > 0
        n_empty = sum(1 for text, w in zip(texts, written.tolist()) if not w and text == "")
        skipped = {EMPTY_TEXT: n_empty, NO_TOKENS: int((~written).sum()) - n_empty}
        seq_counts = seq_counts[written].astype(np.int64)
        lengths = lengths[nonempty]
        tokens = ids.astype(self.dtype, copy=False)   # ids < vocab_size fit the dtype
        if self.settings.append_eod and len(lengths):
            last_seq = np.cumsum(seq_counts) - 1      # each written document's last sequence
            tokens = np.insert(tokens, np.cumsum(lengths)[last_seq], self.tokenizer.eod)
            lengths[last_seq] += 1
        return KeyOutput(tokens, lengths, seq_counts, skipped)


def parse_line(raw: bytes, keys: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """The texts of `keys` in one input line, None for a blank line; LineError if it is bad."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw.strip():
        return None
    if raw.startswith(_UTF8_BOM):
        raise LineError(BOM, "U+FEFF starts the line; save the file as UTF-8 without BOM")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(BAD_UTF8, f"{e.reason} at byte {e.start + 1} of the line") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LineError(BAD_JSON, f"{e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise LineError(BAD_JSON, type(e).__name__) from None
    if not isinstance(obj, dict):
        raise LineError(NOT_OBJECT, f"the line holds {_json_type(obj)}")
    texts = []
    for key in keys:
        if key not in obj:
            raise LineError(MISSING_KEY, repr(key))
        text = obj[key]
        if not isinstance(text, str):
            raise LineError(NOT_STRING, f"key {key!r} holds {_json_type(text)}")
        if not text.isascii() and _SURROGATES.search(text):
            raise LineError(SURROGATE, f"key {key!r} has a \\ud800-\\udfff escape without "
                                       "its pair (not valid Unicode text)")
        texts.append(text)
    return tuple(texts)


class LineError(Exception):
    """One input line cannot be used; str() is '<reason>: <detail>'."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


# --- process-pool plumbing: one encoder per worker process --------------------------------

_WORKER_ENCODER: Optional[ChunkEncoder] = None


def share_with_forked_workers(encoder: ChunkEncoder) -> None:
    """Hand the parent's encoder to workers started by fork, so they skip loading (~1 s each)."""
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def init_worker(settings: EncoderSettings) -> None:
    """Pool initializer: one rayon thread per worker (the pool is the parallelism), then load.

    A forked worker already holds the parent's encoder (which has not encoded anything, so no
    thread pool was started before the fork); a spawned one builds its own.
    """
    global _WORKER_ENCODER
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _WORKER_ENCODER is None or _WORKER_ENCODER.settings != settings:
        _WORKER_ENCODER = ChunkEncoder(settings)


def encode_in_worker(chunk: Chunk) -> ChunkResult:
    assert _WORKER_ENCODER is not None, "init_worker did not run in this process"
    return _WORKER_ENCODER.encode(chunk)
