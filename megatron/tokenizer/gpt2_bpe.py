"""`GPT2BPETokenizer`: GPT-2 byte-level BPE with Megatron's tokenizer interface.

Ids equal OpenAI's original encoder on any input (checked against a pure-Python reference
in tests/tokenizer); encoding runs in a compiled engine, decoding is a byte-table join.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

from megatron.tokenizer.bpe_engine import build_engine
from megatron.tokenizer.byte_level import symbols_to_bytes
from megatron.tokenizer.errors import TokenizerError
from megatron.tokenizer.files import EOD_TOKEN, load_merges, load_vocab
from megatron.tokenizer.padding import vocab_size_with_padding


class GPT2BPETokenizer:
    """GPT-2 BPE tokenizer built offline from `vocab.json` and `merges.txt`.

    `vocab_size` counts the json entries (50257 for GPT-2); `padded_vocab_size` is the
    embedding size after Megatron's padding to `make_vocab_size_divisible_by * tp`.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        merge_file: str | os.PathLike,
        make_vocab_size_divisible_by: int = 128,
        tensor_model_parallel_size: int = 1,
    ):
        self.vocab: dict[str, int] = load_vocab(vocab_file)
        self.inv_vocab: dict[int, str] = {i: s for s, i in self.vocab.items()}
        merges = load_merges(merge_file, self.vocab)
        self._engine = build_engine(self.vocab, merges)
        self._eod = self.vocab[EOD_TOKEN]
        self._padded_vocab_size = vocab_size_with_padding(
            len(self.vocab), make_vocab_size_divisible_by, tensor_model_parallel_size
        )

    @functools.cached_property
    def _id_to_bytes(self) -> dict[int, bytes]:
        """id -> UTF-8 bytes of the token (built on first decode: encoding-only runs skip it)."""
        return {i: symbols_to_bytes(s) for i, s in self.inv_vocab.items()}

    @property
    def name(self) -> str:
        return "GPT2BPETokenizer"

    @property
    def engine(self) -> str:
        """Which BPE engine encodes: "hf-tokenizers" (compiled) or "python" (fallback)."""
        return self._engine.name

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def padded_vocab_size(self) -> int:
        return self._padded_vocab_size

    @property
    def eod(self) -> int:
        """Id of `<|endoftext|>`, appended between documents (never produced by `tokenize`)."""
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        """GPT-2 ids of `text`; special-token strings in it are ordinary text."""
        return self._engine.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """`[self.tokenize(t) for t in texts]`; the texts share one word cache."""
        return self._engine.encode_batch(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        """GPT-2 decoding: concatenate token bytes, decode UTF-8 with U+FFFD replacement.

        Ids that split a multi-byte character decode to replacement characters exactly as
        GPT-2's `decode` does, because the same bytes reach the same `bytes.decode`.
        """
        table = self._id_to_bytes
        try:
            data = b"".join([table[i] for i in ids])
        except KeyError as e:
            raise TokenizerError(
                f"cannot detokenize id {e.args[0]!r}: not in the vocabulary of {len(table)} ids"
            ) from e
        except TypeError as e:
            raise TokenizerError(f"cannot detokenize: ids must be ints ({e})") from e
        return data.decode("utf-8", errors="replace")
