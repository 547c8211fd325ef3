"""GPT-2 byte-level BPE tokenizer (Megatron's `GPT2BPETokenizer`), torch-free.

`build_tokenizer` is the entry point the CLI and the preprocessing tool use; the package
imports only the standard library and `regex` (the compiled engine loads on first build), so
data tools stay lean.
"""

from __future__ import annotations

import os

from megatron.tokenizer.errors import TokenizerError
from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.tokenizer.padding import vocab_size_with_padding

__all__ = ["GPT2BPETokenizer", "TokenizerError", "build_tokenizer", "vocab_size_with_padding"]

_TOKENIZERS = {"GPT2BPETokenizer": GPT2BPETokenizer}


def build_tokenizer(
    tokenizer_type: str,
    vocab_file: str | os.PathLike | None,
    merge_file: str | os.PathLike | None,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> GPT2BPETokenizer:
    """The tokenizer named by `--tokenizer-type`, built from local vocab/merges files."""
    if tokenizer_type not in _TOKENIZERS:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; supported: {sorted(_TOKENIZERS)}"
        )
    return _TOKENIZERS[tokenizer_type](
        vocab_file,
        merge_file,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
