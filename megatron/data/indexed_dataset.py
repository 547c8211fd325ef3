"""Megatron's memory-mapped indexed dataset: a `.bin` of token ids and its `.idx`.

On-disk format, little-endian, no padding (identical to Megatron-LM / Megatron-DeepSpeed):

    .bin  every sequence's token ids back to back, no header
    .idx  magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N | u64 M
          | int32 sizes[N] | int64 pointers[N] (byte offset in .bin) | int64 doc_idx[M]

`doc_idx[d]:doc_idx[d+1]` are the sequences of document d; `doc_idx[0] == 0`, `doc_idx[-1] == N`.
Sizes count every token, the EOD included. The original XMoE fork left the EOD out of `sizes`
while still writing it to `.bin`; the reader recognises that layout and corrects it in memory.

numpy only (no torch), so the data tools run on machines without torch.
"""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np

from megatron.data.index_format import (
    DTYPE_CODES,
    HEADER_SIZE,
    INDEX_MAGIC,
    INDEX_VERSION,
    IndexedDatasetError,
    LegacyEodLayoutWarning,
    dtype_code,
    exclusive_pointers,
    layout_problems,
    legacy_corrected_sizes,
    read_index,
    write_index,
)
from megatron.data.prefix_lock import PrefixLock, file_identity, temporary_stem

__all__ = [
    "DTYPE_CODES", "dtype_code", "best_fitting_dtype", "data_file_path", "index_file_path",
    "dataset_exists", "missing_dataset_message", "IndexedDatasetError", "LegacyEodLayoutWarning",
    "MMapIndexedDataset", "MMapIndexedDatasetBuilder", "write_index", "HEADER_SIZE",
    "INDEX_MAGIC", "INDEX_VERSION",
]


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 when every id fits with Megatron's margin (< 65,500), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_exists(prefix: str) -> bool:
    """Both halves of the dataset are present (says nothing about their validity)."""
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _existing_prefixes(pattern: str) -> list[str]:
    """Prefixes of complete datasets whose `.idx` matches the glob `pattern`, sorted."""
    return sorted(p[:-4] for p in glob.glob(pattern) if dataset_exists(p[:-4]))


def missing_dataset_message(prefix: str) -> str | None:
    """None when `prefix` names a complete dataset; else one line naming the missing file and,
    where one exists, the dataset prefix that was probably meant (the path given with its
    .bin/.idx, or the --output-prefix of preprocess_data.py without its `_<key>_document`)."""
    for path in (data_file_path(prefix), index_file_path(prefix)):
        if not os.path.isfile(path):
            missing = path
            break
    else:
        return None
    if os.path.isfile(data_file_path(prefix)) or os.path.isfile(index_file_path(prefix)):
        return f"{missing} not found"  # half a dataset: the other half is the problem
    stem = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    if stem != prefix and dataset_exists(stem):
        return (f"{missing} not found; did you mean {stem} (a dataset prefix is the path "
                f"without .bin/.idx)?")
    escaped = glob.escape(stem)
    found = (_existing_prefixes(escaped + "_*_document.idx")
             + _existing_prefixes(escaped + "_*_sentence.idx"))
    if found:
        return (f"{missing} not found; did you mean {' or '.join(found[:3])} "
                f"(preprocess_data.py adds _<key>_document to its --output-prefix)?")
    return f"{missing} not found"


def _fsync_dir(path: str) -> None:
    """Make renames in `path` durable; silently skipped where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MMapIndexedDataset:
    """Read-only view of a dataset; `get` returns zero-copy views into the memory-mapped `.bin`."""

    def __init__(self, path_prefix: str) -> None:
        self._open(path_prefix, warn=True)

    def _open(self, path_prefix: str, warn: bool) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        if not os.path.isfile(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found")
        index = read_index(idx_path)  # validates header, lengths and doc_idx
        self.dtype = index.dtype
        self.doc_idx = index.doc_idx
        self._idx_map = index.buffer
        bin_size = os.path.getsize(bin_path)
        layout, problems = layout_problems(index, bin_size, bin_path)
        if problems:
            raise IndexedDatasetError(problems[0])
        self.legacy_eod_layout = layout == "legacy"
        if self.legacy_eod_layout:
            self.sizes = legacy_corrected_sizes(index.sizes, index.doc_idx)
            self.pointers = exclusive_pointers(self.sizes, self.dtype.itemsize)
            if warn:
                warnings.warn(
                    f"{idx_path}: legacy index of the original XMoE preprocess (EOD left out of "
                    f"sizes); sizes corrected in memory. Rewrite it once with "
                    f"`python tools/inspect_dataset.py {path_prefix} --repair`.",
                    LegacyEodLayoutWarning, stacklevel=3)
        else:
            self.sizes, self.pointers = index.sizes, index.pointers
        little = self.dtype.newbyteorder("<")
        if bin_size == 0:  # mmap refuses empty files
            self._tokens = np.empty(0, dtype=little)
        else:
            self._tokens = np.memmap(bin_path, dtype=little, mode="r").view(np.ndarray)
        self._starts = None  # token offsets, derived lazily from pointers

    def __getstate__(self):
        return self.path_prefix

    def __setstate__(self, state):
        self._open(state, warn=False)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence `i` (to its end when length is None)."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"offset={offset}, length={length} outside sequence {i} of {size} tokens")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(int(i))

    def document(self, d: int) -> np.ndarray:
        """All tokens of document `d` as one view (its sequences are contiguous in `.bin`)."""
        lo, hi = int(self.doc_idx[d]), int(self.doc_idx[d + 1])
        if lo == hi:
            return self._tokens[:0]
        start = int(self.pointers[lo]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[lo:hi].sum(dtype=np.int64))]

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return dataset_exists(path_prefix)


class _IntList:
    """Append-only int64 list that accepts scalars cheaply and arrays in one piece."""

    def __init__(self, initial=()):
        self._chunks: list[np.ndarray] = []
        self._tail: list[int] = list(initial)
        self._len = len(self._tail)

    def append(self, value: int) -> None:
        self._tail.append(value)
        self._len += 1

    def extend(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if self._tail:
            self._chunks.append(np.asarray(self._tail, dtype=np.int64))
            self._tail = []
        self._chunks.append(np.asarray(values, dtype=np.int64))
        self._len += len(values)

    def last(self) -> int:
        if self._tail:
            return self._tail[-1]
        return int(self._chunks[-1][-1])

    def __len__(self) -> int:
        return self._len

    def to_array(self) -> np.ndarray:
        return np.concatenate(self._chunks + [np.asarray(self._tail, dtype=np.int64)])


class MMapIndexedDatasetBuilder:
    """Writes a dataset under temporary names and publishes it only in `finalize()`.

    Publication order (a crash at any point never leaves a complete-looking mixed pair):
    unlink the old final `.idx`, rename the new `.bin` into place, rename the new `.idx` last.
    As a context manager, leaving the block without `finalize()` (or by an exception) aborts.

    From construction to `finalize()`/`abort()` it holds the prefix's lock (`prefix_lock`): a
    second builder of the same prefix is refused, naming the holder's PID, and temporaries
    that killed runs left for this prefix are removed (with a note on stderr).
    """

    def __init__(self, out_prefix: str, dtype=np.uint16) -> None:
        self._dtype = np.dtype(dtype)
        dtype_code(self._dtype)  # reject unsupported dtypes before creating files
        self._prefix = out_prefix
        directory, base = os.path.split(os.path.abspath(out_prefix))
        self._dir = directory
        self._final_bin = os.path.join(directory, base + ".bin")
        self._final_idx = os.path.join(directory, base + ".idx")
        self._lock = PrefixLock(out_prefix)  # one writer per prefix, held until published
        locked = self._lock.acquire()
        try:
            if locked:
                self._lock.remove_stale_temporaries()
            # What the final names hold now: finalize() refuses to replace anything else.
            self._found = file_identity(self._final_bin), file_identity(self._final_idx)
            # Hidden, unique temporary names; os.open (unlike mkstemp) keeps the umask's mode.
            stem = temporary_stem(out_prefix)
            self._tmp_bin, self._tmp_idx = stem + ".bin.tmp", stem + ".idx.tmp"
            fd = os.open(self._tmp_bin, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except BaseException:
            self._lock.release()
            raise
        self._data_file = os.fdopen(fd, "wb")
        self._sizes = _IntList()
        self._doc_idx = _IntList([0])
        self._state = "open"

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"builder for {self._prefix} is already {self._state}")

    def _as_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.size and self._dtype.kind in "iu":
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            info = np.iinfo(self._dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token ids in [{lo}, {hi}] do not fit {self._dtype.name}")
        return np.ascontiguousarray(arr, dtype=self._dtype.newbyteorder("<"))

    def add_item(self, tokens) -> None:
        """Append one sequence (list, numpy array or CPU torch tensor of ids)."""
        self._check_open()
        arr = self._as_tokens(tokens)
        self._data_file.write(memoryview(arr).cast("B"))
        self._sizes.append(arr.size)

    def add_items(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several sequences stored back to back in `flat_tokens` (one write)."""
        self._check_open()
        arr = self._as_tokens(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lengths.size and lengths.min() < 0:
            raise ValueError("lengths must be non-negative")
        if int(lengths.sum()) != arr.size:
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a sequence longer than 2**31 - 1 tokens cannot be indexed")
        self._data_file.write(memoryview(arr).cast("B"))
        self._sizes.extend(lengths)

    def end_document(self) -> None:
        """Close the current document. With no sequence since the last call it records an
        empty document (doc_idx repeats its last entry), exactly as Megatron does."""
        self._check_open()
        self._doc_idx.append(len(self._sizes))

    def _require_closed_document(self, action: str) -> None:
        pending = len(self._sizes) - self._doc_idx.last()
        if pending:
            raise ValueError(f"{self._prefix}: {pending} sequence(s) after the last "
                             f"end_document(); call end_document() before {action}")

    def merge_file_(self, other_prefix: str) -> None:
        """Append every sequence and document of the dataset at `other_prefix`."""
        self._check_open()
        self._require_closed_document("merge_file_()")
        other = MMapIndexedDataset(other_prefix)
        if other.dtype != self._dtype:
            raise IndexedDatasetError(
                f"{index_file_path(other_prefix)}: dtype {other.dtype.name} does not match "
                f"{self._dtype.name} of {index_file_path(self._prefix)} being written")
        offset = len(self._sizes)
        self._sizes.extend(other.sizes)
        self._doc_idx.extend(other.doc_idx[1:] + offset)
        # A legacy .bin already holds the EODs its corrected sizes count: copy it verbatim.
        with open(data_file_path(other_prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._data_file.write(chunk)

    def finalize(self) -> None:
        """Write the index, make both files durable, then publish them (.idx last)."""
        self._check_open()
        self._require_closed_document("finalize()")
        try:
            self._data_file.flush()
            os.fsync(self._data_file.fileno())
            self._data_file.close()
            with open(self._tmp_idx, "wb") as f:
                write_index(f, self._dtype, self._sizes.to_array(), self._doc_idx.to_array())
                f.flush()
                os.fsync(f.fileno())
            self._check_not_replaced()
            if os.path.lexists(self._final_idx):
                os.unlink(self._final_idx)  # an old .idx must never pair with the new .bin
            os.replace(self._tmp_bin, self._final_bin)
            os.replace(self._tmp_idx, self._final_idx)
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        _fsync_dir(self._dir)
        self._lock.release()

    def _check_not_replaced(self) -> None:
        """Refuse to overwrite final files that another program (one that does not take the
        lock, e.g. the original Megatron tools) wrote since this builder started."""
        for path, before in zip((self._final_bin, self._final_idx), self._found):
            if file_identity(path) != before:
                raise IndexedDatasetError(
                    f"{self._prefix}: {path} was written by another program while this run was "
                    f"writing; it is left as it is and this run's output is discarded")

    def abort(self) -> None:
        """Discard everything written and release the prefix; safe to call more than once.

        The temporaries are unlinked even when closing the data file fails (a flush that hits
        ENOSPC): keeping them would leave the disk full.
        """
        if self._state == "finalized":
            return
        self._state = "aborted"
        try:
            try:
                if not self._data_file.closed:
                    self._data_file.close()
            except OSError:
                pass  # the unflushed bytes were to be discarded anyway
            finally:
                for path in (self._tmp_bin, self._tmp_idx):
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
        finally:
            self._lock.release()

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            self.abort()  # never publish implicitly
        return False
