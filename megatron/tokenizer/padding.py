"""Embedding-table padding of the vocabulary size (Megatron's `_vocab_size_with_padding`)."""

from megatron.tokenizer.errors import TokenizerError


def vocab_size_with_padding(
    orig_vocab_size: int,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> int:
    """Smallest size >= `orig_vocab_size` divisible by `make_vocab_size_divisible_by * tp`.

    Padding keeps each tensor-parallel shard of the embedding a multiple of a GPU-friendly
    width (50257 -> 50304 at 128); the extra rows are never produced by the tokenizer.
    """
    if not isinstance(orig_vocab_size, int) or isinstance(orig_vocab_size, bool) \
            or orig_vocab_size < 1:
        raise TokenizerError(f"vocabulary size must be a positive int, got {orig_vocab_size!r}")
    for flag, value in (
        ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
        ("--tensor-model-parallel-size", tensor_model_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TokenizerError(f"{flag} must be a positive int, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple
