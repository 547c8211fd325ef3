"""Megatron's three GPT index arrays, as pure numpy functions of `sizes` and `documents`.

Megatron's GPTDataset reads every sample as `seq_length + 1` consecutive tokens of one long token
stream: the documents of the split, repeated for `num_epochs` and shuffled (`doc_idx`), laid end
to end. Consecutive samples overlap by one token (the last input token of sample i is the first
of sample i+1), so sample i covers stream positions `[i * seq_length, (i + 1) * seq_length]`.

    doc_idx     [num_epochs * num_docs]  document ids in stream order
    sample_idx  [num_samples_total + 1, 2]  (position in doc_idx, token offset) where sample i
                starts; sample i ends (inclusive) where sample i + 1 starts
    shuffle_idx [num_samples_total]  sample order seen by training

Every function follows Megatron-LM's `megatron/data/gpt_dataset.py` (`_num_epochs`,
`_build_doc_idx`, `_build_shuffle_idx`, the separate-last-epoch rule in `_build_index_mappings`)
and `helpers.cpp::build_sample_idx`, with the same RNG call order, so the same seed gives the
same arrays; `build_sample_idx` replaces the C++ per-sample loop by cumsum + searchsorted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Megatron: "If we have less than 80% of the samples for the last epoch, separate out the epoch".
LAST_EPOCH_FRACTION = 0.80


@dataclass(frozen=True)
class IndexMappings:
    doc_idx: np.ndarray      # int64 [num_epochs * num_docs]
    sample_idx: np.ndarray   # int64 [num_samples_total + 1, 2]
    shuffle_idx: np.ndarray  # int64 [num_samples_total]
    num_epochs: int
    separate_last_epoch: bool


def num_tokens(documents: np.ndarray, sizes: np.ndarray) -> int:
    """tokens_per_epoch = sum(sizes[documents])."""
    return int(np.sum(sizes[documents], dtype=np.int64))


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest E >= 1 with (E * tokens_per_epoch - 1) // seq_length >= num_samples.

    The "- 1": every sample reads seq_length + 1 tokens but shares its last token with the next
    sample, so a stream of K tokens holds (K - 1) // seq_length samples. Megatron finds E by
    counting up one epoch at a time; the closed form is E = ceil((num_samples * seq_length + 1)
    / tokens_per_epoch), at least 1.
    """
    if tokens_per_epoch <= 0:
        raise ValueError("the documents of this split hold no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def samples_in_stream(num_stream_tokens: int, seq_length: int) -> int:
    """(num_stream_tokens - 1) // seq_length: samples a stream of that many tokens holds."""
    return max(0, (num_stream_tokens - 1) // seq_length)


def separate_last_epoch_rule(num_samples: int, num_epochs: int, tokens_per_epoch: int,
                             seq_length: int) -> bool:
    """Megatron's separate_last_epoch decision.

    With one epoch: False. Otherwise, with
        from_first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        last       = num_samples - from_first
        per_epoch  = (tokens_per_epoch - 1) // seq_length
    the last epoch is shuffled on its own when last < int(0.80 * per_epoch), so a small tail of
    extra data is not spread uniformly over the whole run. (Megatron also asserts
    last < per_epoch + 1, which tiny epochs can violate; that assertion is left out here.)
    """
    if num_epochs == 1:
        return False
    from_first = samples_in_stream((num_epochs - 1) * tokens_per_epoch, seq_length)
    last = num_samples - from_first
    per_epoch = samples_in_stream(tokens_per_epoch, seq_length)
    return last < int(LAST_EPOCH_FRACTION * per_epoch)


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_last_epoch: bool) -> np.ndarray:
    """`documents` tiled num_epochs times, shuffled with `rng` as one array.

    Megatron shuffles all epochs together (an epoch boundary is not a shuffle boundary), except
    with separate_last_epoch: the first num_epochs - 1 epochs are shuffled together, then the
    last epoch on its own (two `rng.shuffle` calls, in that order).
    """
    if separate_last_epoch and num_epochs > 1:
        first = build_doc_idx(documents, num_epochs - 1, rng, False)
        last = build_doc_idx(documents, 1, rng, False)
        return np.concatenate((first, last))
    doc_idx = np.tile(np.asarray(documents, dtype=np.int64), num_epochs)
    # RandomState.shuffle of a 1-D array permutes by position only: the dtype (Megatron: int32)
    # does not change the permutation.
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                     num_epochs: int, tokens_per_epoch: int) -> np.ndarray:
    """[num_samples_total + 1, 2] (position in doc_idx, offset) of each sample's first token.

    num_samples_total = (num_epochs * tokens_per_epoch - 1) // seq_length. Row 0 is (0, 0).
    Row i >= 1 locates stream position p = i * seq_length (the token sample i - 1 ends on and
    sample i starts on): the document j with start_j <= p < end_j, where end = cumsum of
    sizes[doc_idx] and start = end - size, found by searchsorted(end, p, side="right"); empty
    documents have start == end and are never chosen, exactly as the C++ loop skips them.
    """
    total = samples_in_stream(num_epochs * tokens_per_epoch, seq_length)
    doc_sizes = np.asarray(sizes)[doc_idx].astype(np.int64)
    doc_end = np.cumsum(doc_sizes)
    assert doc_end.size and doc_end[-1] == num_epochs * tokens_per_epoch
    positions = np.arange(1, total + 1, dtype=np.int64) * seq_length
    which = np.searchsorted(doc_end, positions, side="right")
    sample_idx = np.zeros((total + 1, 2), dtype=np.int64)
    sample_idx[1:, 0] = which
    sample_idx[1:, 1] = positions - (doc_end[which] - doc_sizes[which])
    return sample_idx


def build_shuffle_idx(num_samples: int, total_size: int,
                      rng: np.random.RandomState) -> np.ndarray:
    """arange(num_samples) shuffled, then arange(num_samples, total_size) shuffled (if non-empty).

    Megatron: the second part holds the samples of a separated last epoch, which therefore come
    after all others; without separation num_samples == total_size and there is one shuffle.
    """
    first = np.arange(num_samples, dtype=np.int64)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=np.int64)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int,
                         seq_length: int, seed: int) -> IndexMappings:
    """doc_idx, sample_idx and shuffle_idx for `num_samples` samples of seq_length + 1 tokens.

    RNG: one np.random.RandomState(seed), consumed by the doc_idx shuffle(s) and then the
    shuffle_idx shuffle(s), as Megatron does. The dataset holds num_samples_total >= num_samples
    samples (whole epochs); the first num_samples in shuffle order are the ones training uses.
    """
    if seq_length < 1:
        raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
    if num_samples < 0:
        raise ValueError(f"number of samples must be >= 0, got {num_samples}")
    documents = np.asarray(documents)
    if documents.size == 0:
        raise ValueError("no documents to build samples from")
    tokens_per_epoch = num_tokens(documents, sizes)
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = separate_last_epoch_rule(num_samples, num_epochs, tokens_per_epoch, seq_length)
    rng = np.random.RandomState(seed=seed)

    doc_idx = build_doc_idx(documents, num_epochs, rng, separate)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    if separate:
        first_part = samples_in_stream((num_epochs - 1) * tokens_per_epoch, seq_length)
    else:
        first_part = total
    shuffle_idx = build_shuffle_idx(first_part, total, rng)
    logger.info("index mappings: %d documents, %d tokens/epoch, %d epochs (separate last: %s), "
                "%d samples", documents.size, tokens_per_epoch, num_epochs, separate, total)
    return IndexMappings(doc_idx, sample_idx, shuffle_idx, num_epochs, separate)
