"""Typed settings of the preprocessing tool, validated where they are defined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

SUPPORTED_DATASET_IMPLS = ("mmap",)
DEFAULT_CHUNK_BYTES = 1 << 19   # ~0.5 MB of input per worker task: a few hundred documents


class PreprocessError(Exception):
    """A problem the user can fix (bad input line, missing file, bad flag); one-line message."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What to read, how to tokenize it and where to write it (one field per CLI flag)."""

    input: str                                      # --input: file, directory or glob
    output_prefix: str                              # --output-prefix
    vocab_file: str                                 # --vocab-file
    merge_file: str                                 # --merge-file
    json_keys: Tuple[str, ...] = ("text",)          # --json-keys
    tokenizer_type: str = "GPT2BPETokenizer"        # --tokenizer-type
    append_eod: bool = False                        # --append-eod
    workers: int = 1                                # --workers
    log_interval: int = 100                         # --log-interval (documents)
    dataset_impl: str = "mmap"                      # --dataset-impl
    keep_newlines: bool = False                     # --keep-newlines (with --split-sentences)
    split_sentences: bool = False                   # --split-sentences
    skip_bad_lines: bool = False                    # --skip-bad-lines
    make_vocab_size_divisible_by: int = 128         # --make-vocab-size-divisible-by
    chunk_bytes: int = DEFAULT_CHUNK_BYTES          # input bytes per worker task (no flag)

    def __post_init__(self) -> None:
        if not self.json_keys:
            raise ValueError("--json-keys needs at least one key")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys has duplicates: {list(self.json_keys)}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}")
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError("--make-vocab-size-divisible-by must be >= 1, "
                             f"got {self.make_vocab_size_divisible_by}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.dataset_impl not in SUPPORTED_DATASET_IMPLS:
            raise ValueError(f"--dataset-impl {self.dataset_impl!r} is not supported; "
                             f"only {', '.join(SUPPORTED_DATASET_IMPLS)} is")
        if not self.output_prefix:
            raise ValueError("--output-prefix must not be empty")

    @property
    def level(self) -> str:
        """Megatron's name for the unit of one sequence: a sentence or a whole document."""
        return "sentence" if self.split_sentences else "document"

    def output_prefix_for(self, key: str) -> str:
        """`<prefix>_<key>_<level>`, the name Megatron gives each key's .bin/.idx pair."""
        return f"{self.output_prefix}_{key}_{self.level}"
