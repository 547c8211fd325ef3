"""MMapIndexedDataset format, reader validation, builder crash safety and the legacy EOD layout.

Expected files are assembled by hand with `struct` / numpy here, independently of the writer.
"""

import errno
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDatasetError,
    LegacyEodLayoutWarning,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    dataset_exists,
    dtype_code,
    missing_dataset_message,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAGIC = b"MMIDIDX\x00\x00"

# Two documents: the first of two sequences, the second of one; 99 plays the EOD.
DOCS = [[[1, 2, 3], [4, 5, 99]], [[6, 7, 99]]]


# ---------------------------------------------------------------- reference files, by hand

def reference_files(docs, dtype=np.uint16, eod_in_sizes=True):
    """(.idx bytes, .bin bytes) of `docs` (lists of sequences), assembled without the writer.

    eod_in_sizes=False reproduces the original XMoE preprocess: every non-empty document's last
    token (its EOD) is in .bin but not counted in sizes, and pointers follow those sizes.
    """
    dt = np.dtype(dtype)
    seqs = [list(s) for doc in docs for s in doc]
    sizes = [len(s) for s in seqs]
    if not eod_in_sizes:
        i = 0
        for doc in docs:
            i += len(doc)
            if doc:
                sizes[i - 1] -= 1
    pointers, address = [], 0
    for size in sizes:
        pointers.append(address)
        address += size * dt.itemsize
    doc_idx = [0]
    for doc in docs:
        doc_idx.append(doc_idx[-1] + len(doc))
    code = {np.dtype(t): c for c, t in DTYPE_CODES.items()}[dt]
    idx = MAGIC + struct.pack("<QBQQ", 1, code, len(sizes), len(doc_idx))
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    idx += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    flat = [t for s in seqs for t in s]
    return idx, np.array(flat, dtype=dt.newbyteorder("<")).tobytes()


def write_files(prefix, idx: bytes, bin_: bytes):
    Path(prefix + ".idx").write_bytes(idx)
    Path(prefix + ".bin").write_bytes(bin_)


def write_legacy_dataset(prefix, docs, dtype=np.uint16):
    """A dataset as the original XMoE preprocess wrote it (EOD left out of sizes)."""
    write_files(prefix, *reference_files(docs, dtype, eod_in_sizes=False))


def build(prefix, docs, dtype=np.uint16):
    with MMapIndexedDatasetBuilder(prefix, dtype=dtype) as builder:
        for doc in docs:
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()
        builder.finalize()
    return prefix


def file_bytes(prefix):
    return Path(prefix + ".idx").read_bytes(), Path(prefix + ".bin").read_bytes()


def assert_docs(ds, docs):
    assert ds.num_documents == len(docs)
    for d, doc in enumerate(docs):
        lo, hi = ds.doc_idx[d], ds.doc_idx[d + 1]
        assert [ds[i].tolist() for i in range(lo, hi)] == [list(s) for s in doc]


# ---------------------------------------------------------------- format and round trips

def test_header_bytes_exact(tmp_path):
    prefix = build(str(tmp_path / "tiny"), [[[7, 8]], [[9]]])
    expected_idx = (MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 2, 3)
                    + struct.pack("<2i", 2, 1) + struct.pack("<2q", 0, 4)
                    + struct.pack("<3q", 0, 1, 2))
    assert file_bytes(prefix) == (expected_idx, struct.pack("<3H", 7, 8, 9))
    assert file_bytes(prefix) == reference_files([[[7, 8]], [[9]]])


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    docs = [[[1, 2, 3], [4, 5, 126]], [[0]], [[127, 3, 3, 3, 9]]]
    prefix = build(str(tmp_path / "ds"), docs, dtype)
    assert file_bytes(prefix) == reference_files(docs, dtype)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == dtype and dtype_code(ds.dtype) == code and ds[0].dtype == dtype
    assert len(ds) == 4 and ds.num_tokens == 12 and not ds.legacy_eod_layout
    assert_docs(ds, docs)


def test_int32_ids_above_uint16(tmp_path):
    docs = [[[50256, 65535, 65536, 100_000, 2**31 - 1]]]
    prefix = build(str(tmp_path / "big"), docs, np.int32)
    assert file_bytes(prefix) == reference_files(docs, np.int32)
    assert MMapIndexedDataset(prefix)[0].tolist() == docs[0][0]


def test_best_fitting_dtype_and_codes():
    assert best_fitting_dtype(50257) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32
    assert [dtype_code(t) for t in DTYPE_CODES.values()] == sorted(DTYPE_CODES)
    with pytest.raises(ValueError, match="not storable"):
        dtype_code(np.uint32)


def test_documents_sizes_pointers(tmp_path):
    ds = MMapIndexedDataset(build(str(tmp_path / "ds"), DOCS))
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64
    assert ds.sizes.tolist() == [3, 3, 3]
    assert ds.pointers.tolist() == [0, 6, 12]
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.document(0).tolist() == [1, 2, 3, 4, 5, 99]
    assert [s.tolist() for s in ds[1:]] == [[4, 5, 99], [6, 7, 99]]
    assert ds[-1].tolist() == [6, 7, 99]


def test_empty_documents_follow_megatron(tmp_path):
    """end_document() with no new sequence appends doc_idx's last value again (Megatron)."""
    prefix = str(tmp_path / "ds")
    with MMapIndexedDatasetBuilder(prefix) as builder:
        builder.end_document()
        builder.add_item([1, 2])
        builder.end_document()
        builder.end_document()
        builder.finalize()
    ds = MMapIndexedDataset(prefix)
    assert ds.doc_idx.tolist() == [0, 0, 1, 1]
    assert ds.num_documents == 3 and ds.document(0).size == 0 and ds.document(1).tolist() == [1, 2]
    assert file_bytes(prefix) == reference_files([[], [[1, 2]], []])


def test_empty_dataset_opens(tmp_path):
    prefix = build(str(tmp_path / "empty"), [])
    assert os.path.getsize(prefix + ".bin") == 0
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.doc_idx.tolist() == [0]
    assert ds[:] == []


def test_get_offset_length_zero_copy(tmp_path):
    docs = [[list(range(10, 20)), list(range(30, 35))]]
    ds = MMapIndexedDataset(build(str(tmp_path / "ds"), docs))
    for i, seq in enumerate(docs[0]):
        for offset in range(len(seq) + 1):
            assert ds.get(i, offset).tolist() == seq[offset:]
            for length in range(len(seq) - offset + 1):
                assert ds.get(i, offset, length).tolist() == seq[offset:offset + length]
    view = ds.get(1, 2, 2)
    assert not view.flags.owndata and not view.flags.writeable
    with pytest.raises(IndexError):
        ds.get(0, 8, 3)
    with pytest.raises(IndexError):
        ds.get(2)


def test_add_items_matches_add_item(tmp_path):
    docs = [[[1, 2, 3], [], [4]], [[5, 6]]]
    a = build(str(tmp_path / "a"), docs)
    b = str(tmp_path / "b")
    with MMapIndexedDatasetBuilder(b) as builder:
        builder.add_items(np.array([1, 2, 3, 4]), np.array([3, 0, 1]))
        builder.end_document()
        builder.add_items(np.array([5, 6]), [2])
        builder.end_document()
        builder.finalize()
    assert file_bytes(a) == file_bytes(b)


class FakeTensor:
    """Duck-typed stand-in for a CPU torch tensor (the module only uses np.asarray)."""

    def __init__(self, values):
        self._values = values

    def __array__(self, dtype=None, copy=None):
        return np.array(self._values, dtype=dtype or np.int64)


def test_add_item_accepts_array_likes_and_rejects_bad_ids(tmp_path):
    prefix = str(tmp_path / "ds")
    with MMapIndexedDatasetBuilder(prefix) as builder:
        builder.add_item(FakeTensor([3, 4]))
        builder.add_item(np.array([5], dtype=np.int64))
        with pytest.raises(ValueError, match="do not fit"):
            builder.add_item([70000])
        with pytest.raises(ValueError, match="1-D"):
            builder.add_item([[1, 2]])
        with pytest.raises(ValueError, match="lengths sum"):
            builder.add_items(np.array([1, 2]), [3])
        builder.end_document()
        builder.finalize()
    assert [s.tolist() for s in MMapIndexedDataset(prefix)[:]] == [[3, 4], [5]]


def test_pickle_reopens(tmp_path):
    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(build(str(tmp_path / "ds"), DOCS))))
    assert_docs(ds, DOCS)


def test_merge_file_equals_direct_build(tmp_path):
    a = build(str(tmp_path / "a"), DOCS[:1])
    b = build(str(tmp_path / "b"), [[], [[8, 9]]] + DOCS[1:])
    empty = build(str(tmp_path / "e"), [])
    merged = str(tmp_path / "m")
    with MMapIndexedDatasetBuilder(merged) as builder:
        builder.add_item([42])
        builder.end_document()
        builder.merge_file_(empty)
        builder.merge_file_(a)
        builder.merge_file_(empty)
        builder.merge_file_(b)
        builder.finalize()
    direct = build(str(tmp_path / "d"), [[[42]]] + DOCS[:1] + [[], [[8, 9]]] + DOCS[1:])
    assert file_bytes(merged) == file_bytes(direct)


def test_merge_file_dtype_mismatch_names_both(tmp_path):
    a = build(str(tmp_path / "a"), DOCS, np.int32)
    with MMapIndexedDatasetBuilder(str(tmp_path / "out")) as builder:
        with pytest.raises(IndexedDatasetError, match=r"a\.idx.*int32.*uint16.*out\.idx"):
            builder.merge_file_(a)
    assert not dataset_exists(str(tmp_path / "out"))


# ---------------------------------------------------------------- reader errors

def _corrupt(idx: bytes, bin_: bytes, case: str):
    n, m = struct.unpack_from("<QQ", idx, 18)
    doc_at = 34 + 12 * n
    if case == "bad magic":
        return b"NOTANIDX\x00" + idx[9:], bin_
    if case == "bad version":
        return idx[:9] + struct.pack("<Q", 2) + idx[17:], bin_
    if case == "unknown dtype":
        return idx[:17] + b"\x09" + idx[18:], bin_
    if case == "truncated header":
        return idx[:20], bin_
    if case == "empty index":
        return b"", bin_
    if case == "truncated arrays":
        return idx[:-8], bin_
    if case == "trailing garbage":
        return idx + b"\x00", bin_
    if case == "doc_idx start":
        return idx[:doc_at] + struct.pack("<q", 1) + idx[doc_at + 8:], bin_
    if case == "doc_idx end":
        return idx[:-8] + struct.pack("<q", n + 1), bin_
    if case == "doc_idx decreasing":
        return idx[:doc_at + 8] + struct.pack("<q", 5) + idx[doc_at + 16:], bin_
    if case == "bin too long":
        return idx, bin_ + b"\x00\x00"  # one token: not the legacy layout (that needs two)
    if case == "bin too short":
        return idx, bin_[:-2]
    if case == "pointers":
        return idx[:34 + 4 * n] + struct.pack("<q", 2) + idx[34 + 4 * n + 8:], bin_
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("bad magic", "bad magic"), ("bad version", "version 2"), ("unknown dtype", "dtype code 9"),
    ("truncated header", "truncated header"), ("empty index", "truncated header"),
    ("truncated arrays", "truncated"), ("trailing garbage", "trailing garbage"),
    ("doc_idx start", "starts at 1"), ("doc_idx end", "ends at 4"),
    ("doc_idx decreasing", "decreases"), ("bin too long", "disagrees"),
    ("bin too short", "disagrees"), ("pointers", "pointers disagree"),
])
def test_reader_errors_name_the_file(tmp_path, case, message):
    prefix = str(tmp_path / "ds")
    write_files(prefix, *_corrupt(*reference_files(DOCS), case))
    culprit = prefix + (".bin" if case.startswith("bin") else ".idx")
    with pytest.raises(IndexedDatasetError, match=message) as info:
        MMapIndexedDataset(prefix)
    assert culprit in str(info.value)


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_reader_missing_file(tmp_path, missing):
    prefix = build(str(tmp_path / "ds"), DOCS)
    os.unlink(prefix + missing)
    assert not dataset_exists(prefix)
    with pytest.raises(IndexedDatasetError, match="not found") as info:
        MMapIndexedDataset(prefix)
    assert prefix + missing in str(info.value)


def test_missing_dataset_message_suggests_the_prefix_that_exists(tmp_path):
    prefix = build(str(tmp_path / "corpus_text_document"), DOCS)
    base = str(tmp_path / "corpus")
    assert missing_dataset_message(prefix) is None
    for given in (prefix + ".bin", prefix + ".idx", base, base + ".bin"):
        message = missing_dataset_message(given)
        assert message.startswith(f"{given}.bin not found; did you mean {prefix} "), message
    build(str(tmp_path / "corpus_title_document"), DOCS)
    assert f"did you mean {prefix} or {base}_title_document " in missing_dataset_message(base)
    assert missing_dataset_message(str(tmp_path / "nope")) == f"{tmp_path}/nope.bin not found"
    os.unlink(prefix + ".idx")  # half a dataset: name the missing half, suggest nothing else
    assert missing_dataset_message(prefix) == f"{prefix}.idx not found"
    assert missing_dataset_message(base).startswith(f"{base}.bin not found; did you mean "
                                                    f"{base}_title_document ")


# ---------------------------------------------------------------- crash safety

def test_exception_inside_with_publishes_nothing(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="boom"):
        with MMapIndexedDatasetBuilder(prefix) as builder:
            builder.add_item([1, 2, 3])
            builder.end_document()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # temporary files removed too
    builder.abort()  # a second abort is harmless
    with pytest.raises(RuntimeError, match="aborted"):
        builder.finalize()


def test_leaving_with_without_finalize_aborts(tmp_path):
    with MMapIndexedDatasetBuilder(str(tmp_path / "ds")) as builder:
        builder.add_item([1])
        builder.end_document()
    assert os.listdir(tmp_path) == []


def test_finalize_requires_closed_document(tmp_path):
    with MMapIndexedDatasetBuilder(str(tmp_path / "ds")) as builder:
        builder.add_item([1])
        with pytest.raises(ValueError, match="end_document"):
            builder.finalize()
    assert os.listdir(tmp_path) == []


def test_failed_rewrite_keeps_old_dataset(tmp_path):
    prefix = build(str(tmp_path / "ds"), DOCS)
    with pytest.raises(RuntimeError):
        with MMapIndexedDatasetBuilder(prefix) as builder:
            builder.add_item([50, 51])
            raise RuntimeError("crash mid-way")
    assert_docs(MMapIndexedDataset(prefix), DOCS)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_crash_while_publishing_leaves_no_mixed_pair(tmp_path, monkeypatch):
    """Dying between the .bin and .idx renames leaves the dataset clearly incomplete."""
    prefix = build(str(tmp_path / "ds"), DOCS)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if dst.endswith(".idx"):
            raise OSError("simulated crash before the .idx rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(OSError, match="simulated"):
        build(prefix, [[[1, 2, 3, 4, 5, 6, 7]]])
    assert calls == [os.path.abspath(prefix + ".bin"), os.path.abspath(prefix + ".idx")]
    assert not dataset_exists(prefix)
    with pytest.raises(IndexedDatasetError, match="index file not found"):
        MMapIndexedDataset(prefix)


def test_sigkill_during_write_leaves_no_final_index(tmp_path):
    prefix = str(tmp_path / "ds")
    code = (
        "import sys, time\n"
        "from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder\n"
        f"b = MMapIndexedDatasetBuilder({prefix!r})\n"
        "for i in range(100):\n"
        "    b.add_item(list(range(50)))\n"
        "    b.end_document()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
        "b.finalize()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(prefix + ".idx") and not os.path.exists(prefix + ".bin")
    left = sorted(os.listdir(tmp_path))
    assert [n for n in left if n.endswith(".tmp")] and all(n.startswith(".ds.") for n in left)


# ---------------------------------------------------------------- one writer per prefix

def start_writer(prefix: str, docs) -> subprocess.Popen:
    """A live process holding a builder for `prefix`: it writes `docs`, says "ready", and
    finalizes when a line arrives on its stdin."""
    code = (
        "import sys\n"
        "from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder\n"
        f"b = MMapIndexedDatasetBuilder({prefix!r})\n"
        f"for doc in {docs!r}:\n"
        "    for seq in doc:\n"
        "        b.add_item(seq)\n"
        "    b.end_document()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "b.finalize()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish_writer(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()


def test_second_writer_of_a_prefix_is_refused(tmp_path):
    prefix = build(str(tmp_path / "ds"), DOCS)
    first = start_writer(prefix, [[[11, 12, 99]]])
    try:
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(IndexedDatasetError) as info:
            MMapIndexedDatasetBuilder(prefix)
        message = str(info.value)
        assert prefix in message and f"PID {first.pid}" in message, message
        assert "\n" not in message
        assert sorted(os.listdir(tmp_path)) == before  # the refused writer touched nothing
    finally:
        finish_writer(first)
    assert_docs(MMapIndexedDataset(prefix), [[[11, 12, 99]]])
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # lock file removed too


def test_stale_temporaries_removed_by_the_next_writer(tmp_path, capsys):
    """Temporaries of a killed writer (any PID: the lock proves it is gone) are removed by the
    next writer of the same prefix, and it says so; other prefixes' files are left alone."""
    prefix = str(tmp_path / "ds")
    stale = [f".ds.{os.getpid()}.0123abcd.bin.tmp", ".ds.999999.deadbeef.idx.tmp"]
    others = [".ds.v2.17.deadbeef.bin.tmp", ".other.17.deadbeef.bin.tmp", ".ds.17.xyz.bin.tmp",
              "ds.17.deadbeef.bin.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    (tmp_path / ".ds.lock").write_text("999999 deadhost\n")  # left by a killed run
    capsys.readouterr()
    build(prefix, DOCS)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and prefix in err, err
    assert all(name in err for name in stale) and "2 stale" in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(others + ["ds.bin", "ds.idx"])
    build(prefix, DOCS)
    assert capsys.readouterr().err == ""  # nothing stale the second time


def test_killed_writer_leftovers_cleaned_by_next_writer(tmp_path, capsys):
    prefix = str(tmp_path / "ds")
    writer = start_writer(prefix, [[[1, 2, 3]]] * 100)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    writer.stdin.close()
    writer.stdout.close()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    build(prefix, DOCS)
    assert "stale" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]


def test_output_written_by_another_program_meanwhile_is_not_replaced(tmp_path):
    prefix = str(tmp_path / "ds")
    builder = MMapIndexedDatasetBuilder(prefix)
    builder.add_item([1, 2, 3])
    builder.end_document()
    other = build(str(tmp_path / "other"), DOCS)
    for ext in (".bin", ".idx"):  # "someone else" writes the final names without our tool
        os.link(other + ext, prefix + ext)
    with pytest.raises(IndexedDatasetError, match="while this run was writing") as info:
        builder.finalize()
    assert prefix in str(info.value)
    assert_docs(MMapIndexedDataset(prefix), DOCS)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "other.bin", "other.idx"]


def test_filesystem_without_locks_writes_unlocked_and_keeps_temporaries(tmp_path, capsys,
                                                                        monkeypatch):
    """Where flock fails (some network filesystems) the builder still works, says that it
    cannot lock, and removes no temporaries: without the lock it cannot know they are stale."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    other = tmp_path / ".ds.17.deadbeef.bin.tmp"
    other.write_bytes(b"\0")
    build(str(tmp_path / "ds"), DOCS)
    err = capsys.readouterr().err
    assert "cannot lock" in err and len(err.splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == [other.name, "ds.bin", "ds.idx"]


class FailingFile:
    """A data file on a full disk: every flush (and so close) raises ENOSPC."""

    def __init__(self, real):
        self._real = real

    def write(self, data):
        return len(data)

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fileno(self):
        return self._real.fileno()

    @property
    def closed(self):
        return self._real.closed

    def close(self):
        self._real.close()
        self.flush()


@pytest.mark.parametrize("how", ["finalize", "with", "abort"])
def test_abort_unlinks_temporaries_when_close_fails(tmp_path, how):
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "ds"))
    builder._data_file = FailingFile(builder._data_file)
    builder.add_item([1, 2, 3])
    builder.end_document()
    if how == "finalize":
        with pytest.raises(OSError) as info:
            builder.finalize()
        assert info.value.errno == errno.ENOSPC  # the first error, not one from the cleanup
    elif how == "with":
        with pytest.raises(RuntimeError, match="boom"):
            with builder:
                raise RuntimeError("boom")
    else:
        builder.abort()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- legacy EOD-less layout

LEGACY_DOCS = [[[1, 2, 3], [4, 5, 99]], [], [[6, 7, 99]], [[99]]]


def test_legacy_layout_is_detected_and_corrected(tmp_path):
    prefix = str(tmp_path / "legacy")
    write_legacy_dataset(prefix, LEGACY_DOCS)
    with pytest.warns(LegacyEodLayoutWarning, match="--repair") as record:
        ds = MMapIndexedDataset(prefix)
    assert len(record) == 1
    assert ds.legacy_eod_layout
    correct = MMapIndexedDataset(build(str(tmp_path / "correct"), LEGACY_DOCS))
    assert ds.sizes.tolist() == correct.sizes.tolist() == [3, 3, 3, 1]
    assert ds.pointers.tolist() == correct.pointers.tolist()
    assert_docs(ds, LEGACY_DOCS)
    assert ds.num_tokens == 10


def test_legacy_merge_writes_correct_layout(tmp_path):
    prefix = str(tmp_path / "legacy")
    write_legacy_dataset(prefix, LEGACY_DOCS)
    with pytest.warns(LegacyEodLayoutWarning):
        with MMapIndexedDatasetBuilder(str(tmp_path / "out")) as builder:
            builder.merge_file_(prefix)
            builder.finalize()
    assert file_bytes(str(tmp_path / "out")) == reference_files(LEGACY_DOCS)


def test_correct_layout_preferred_when_ambiguous(tmp_path):
    """With no non-empty document both readings coincide; the correct one wins, no warning."""
    prefix = str(tmp_path / "ds")
    write_legacy_dataset(prefix, [[], []])
    ds = MMapIndexedDataset(prefix)
    assert not ds.legacy_eod_layout and len(ds) == 0
