"""Megatron's GPT pretraining dataset: fixed-length samples cut across document boundaries.

GPTDataset turns a split (a range of sequences of an MMapIndexedDataset) into samples of
seq_length + 1 token ids using the three index arrays of `gpt_index` (doc_idx, sample_idx,
shuffle_idx), which are built once, cached as .npy files and memory-mapped. torch-free: plain
classes with __len__/__getitem__ that a torch DataLoader consumes.

Cache files (Megatron's names plus a digest of the inputs):
    {base}_{name}_indexmap_{N}ns_{L}sl_{S}s_{digest}_{doc,sample,shuffle}_idx.npy
where base is the data prefix, or cache_dir/basename(prefix) when cache_dir is given, and digest
is 12 hex chars of sha256(format tag, documents, sizes[documents]). The arrays are a function of
exactly (documents, sizes[documents], num_samples, seq_length, seed), so a cache can never be
reused for a different split or a re-tokenised dataset (Megatron's names alone allow that when
--split changes); a digest in the name rather than a sidecar lets several such caches coexist.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.dataset_split import blended_num_samples, parse_data_path, parse_split
from megatron.data.gpt_index import build_index_mappings
from megatron.data.indexed_dataset import MMapIndexedDataset, missing_dataset_message
from megatron.fileio import atomic_write

logger = logging.getLogger(__name__)

INDEX_KINDS = ("doc", "sample", "shuffle")
_CACHE_FORMAT = b"xmoe-gpt-indexmap-v1"
SPLIT_NAMES = ("train", "valid", "test")


def index_digest(documents: np.ndarray, sizes: np.ndarray) -> str:
    """12 hex chars of sha256 over the inputs the index arrays depend on besides N, L and seed."""
    documents = np.ascontiguousarray(documents, dtype=np.int64)
    h = hashlib.sha256(_CACHE_FORMAT)
    h.update(documents.tobytes())
    h.update(np.ascontiguousarray(np.asarray(sizes)[documents], dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


def index_cache_paths(data_prefix: str, name: str, num_samples: int, seq_length: int, seed: int,
                      digest: str, cache_dir: str | None = None) -> dict[str, str]:
    """{"doc": path, "sample": path, "shuffle": path} of the cached index arrays."""
    base = data_prefix if cache_dir is None else os.path.join(cache_dir,
                                                               os.path.basename(data_prefix))
    stem = f"{base}_{name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_{digest}"
    return {kind: f"{stem}_{kind}_idx.npy" for kind in INDEX_KINDS}


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """np.save through `atomic_write`: no reader sees a torn file."""
    with atomic_write(path) as f:
        np.save(f, array, allow_pickle=False)


class GPTDataset:
    """Samples {"text": int64 [seq_length + 1]} of one split of an indexed dataset.

    documents: indices into indexed_dataset.sizes (Megatron's "documents" are the sequences of
    the indexed dataset). len(self) is every sample of the whole epochs built (>= num_samples);
    sample i is the shuffle_idx[i]-th run of seq_length + 1 tokens of the doc_idx stream.
    build=False only loads the cached arrays (ranks other than the builder, after a barrier) and
    raises FileNotFoundError when they are missing. With vocab_size, a token id outside
    [0, vocab_size) raises ValueError naming the data prefix, instead of a crash on the GPU.
    """

    def __init__(self, name: str, data_prefix: str, documents: np.ndarray, indexed_dataset,
                 num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None,
                 vocab_size: int | None = None, build: bool = True) -> None:
        self.name, self.data_prefix = name, data_prefix
        self.indexed_dataset = indexed_dataset
        self.seq_length, self.vocab_size = seq_length, vocab_size
        documents = np.asarray(documents, dtype=np.int64)
        sizes = indexed_dataset.sizes
        if documents.size == 0 or documents.min() < 0 or documents.max() >= len(sizes):
            raise ValueError(f"{data_prefix} ({name}): documents must be non-empty indices into "
                             f"its {len(sizes)} sequences")
        digest = index_digest(documents, sizes)
        self.index_paths = index_cache_paths(data_prefix, name, num_samples, seq_length, seed,
                                             digest, cache_dir)
        missing = [p for p in self.index_paths.values() if not os.path.isfile(p)]
        if missing and not build:
            raise FileNotFoundError(
                f"{data_prefix} ({name}): index cache {missing[0]} is missing; it is built by the "
                "rank that constructs the dataset with build=True (rank 0) before the others load")
        if missing:
            try:
                mappings = build_index_mappings(documents, sizes, num_samples, seq_length, seed)
            except ValueError as e:
                raise ValueError(f"{data_prefix} ({name}): {e}") from None
            for kind in INDEX_KINDS:
                save_npy_atomic(self.index_paths[kind], getattr(mappings, f"{kind}_idx"))
            logger.info("%s (%s): built index mappings in %s", data_prefix, name,
                        os.path.dirname(os.path.abspath(self.index_paths["doc"])))
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            np.load(self.index_paths[kind], mmap_mode="r", allow_pickle=False)
            for kind in INDEX_KINDS)
        assert len(self) >= num_samples, (len(self), num_samples)

    def __len__(self) -> int:
        # sample i spans sample_idx[i] .. sample_idx[i + 1], hence the - 1.
        return self.sample_idx.shape[0] - 1

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(self.shuffle_idx[idx])
        first, first_offset = (int(v) for v in self.sample_idx[i])
        last, last_offset = (int(v) for v in self.sample_idx[i + 1])
        get = self.indexed_dataset.get
        if first == last:
            sample = get(int(self.doc_idx[first]), offset=first_offset,
                         length=last_offset - first_offset + 1)
        else:
            pieces = [get(int(self.doc_idx[first]), offset=first_offset)]
            pieces += [get(int(self.doc_idx[j])) for j in range(first + 1, last)]
            pieces.append(get(int(self.doc_idx[last]), length=last_offset + 1))
            sample = np.concatenate(pieces)
        text = np.array(sample, dtype=np.int64)
        assert text.shape == (self.seq_length + 1,), text.shape
        if self.vocab_size is not None:
            self._check_vocab(text, idx)
        return {"text": text}

    def _check_vocab(self, text: np.ndarray, idx: int) -> None:
        lo, hi = int(text.min()), int(text.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = hi if hi >= self.vocab_size else lo
            raise ValueError(
                f"{self.data_prefix} ({self.name}, sample {idx}): token id {bad} is outside the "
                f"vocabulary [0, {self.vocab_size}); was the data tokenised with another "
                "tokenizer?")


def _open_indexed_dataset(prefix: str) -> MMapIndexedDataset:
    problem = missing_dataset_message(prefix)
    if problem:
        raise FileNotFoundError(f"--data-path: {problem}")
    return MMapIndexedDataset(prefix)


def build_split_datasets(prefix: str, splits_string: str, num_samples: tuple[int, int, int],
                         seq_length: int, seed: int, cache_dir: str | None = None,
                         vocab_size: int | None = None, build: bool = True) -> list:
    """[train, valid, test] GPTDatasets of one prefix; None for a split with no documents."""
    indexed = _open_indexed_dataset(prefix)
    bounds = parse_split(splits_string, len(indexed.sizes))
    datasets = []
    for k, name in enumerate(SPLIT_NAMES):
        lo, hi = bounds[k], bounds[k + 1]
        logger.info("%s %s: documents [%d, %d)", prefix, name, lo, hi)
        datasets.append(None if hi <= lo else GPTDataset(
            name, prefix, np.arange(lo, hi, dtype=np.int64), indexed, num_samples[k],
            seq_length, seed, cache_dir=cache_dir, vocab_size=vocab_size, build=build))
    return datasets


def build_train_valid_test_datasets(data_prefix: list[str], splits_string: str,
                                    train_valid_test_num_samples: tuple[int, int, int],
                                    seq_length: int, seed: int, cache_dir: str | None = None,
                                    vocab_size: int | None = None, build: bool = True):
    """(train, valid, test) datasets from `--data-path` values; None for an empty split.

    One prefix: its GPTDatasets. Weighted prefixes (Megatron): each prefix is split on its own
    and built with ceil(weight * n * 1.005) samples per split, then each split is blended with
    BlendableDataset to exactly n samples (only over the prefixes whose split is non-empty).
    """
    prefixes, weights = parse_data_path(data_prefix)
    num_samples = tuple(int(n) for n in train_valid_test_num_samples)
    if len(num_samples) != 3:
        raise ValueError(f"need train, valid and test sample counts, got {num_samples}")
    common = dict(seq_length=seq_length, seed=seed, cache_dir=cache_dir, vocab_size=vocab_size,
                  build=build)
    if len(prefixes) == 1:
        return tuple(build_split_datasets(prefixes[0], splits_string, num_samples, **common))
    per_prefix = [
        build_split_datasets(p, splits_string,
                             tuple(blended_num_samples([w], n)[0] for n in num_samples), **common)
        for p, w in zip(prefixes, weights)]
    blends = []
    for k in range(3):
        parts = [(ds[k], w) for ds, w in zip(per_prefix, weights) if ds[k] is not None]
        blends.append(BlendableDataset([d for d, _ in parts], [w for _, w in parts],
                                       num_samples[k]) if parts else None)
    return tuple(blends)
