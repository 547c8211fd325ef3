"""GPTDataset and its index arrays against slow references written from Megatron's algorithm."""

import os

import numpy as np
import pytest

from megatron.data import gpt_dataset
from megatron.data.dataset_split import parse_data_path, parse_split
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.gpt_index import build_index_mappings, build_sample_idx
from megatron.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder


# ---------------------------------------------------------------- slow Megatron references

def ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """Megatron's build_sample_idx: walk the documents one sample at a time."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    doc_pos, offset = 0, 0
    for s in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[doc_pos]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc_pos += 1
                offset = 0
        out[s] = doc_pos, offset
    return out


def ref_index_mappings(documents, sizes, num_samples, seq_length, seed):
    """Megatron's _build_index_mappings step by step (epoch loop, int32 doc_idx, uint32 shuffle)."""
    tokens_per_epoch = int(np.sum(sizes[documents]))
    num_epochs, total = 0, 0
    while True:
        num_epochs += 1
        total += tokens_per_epoch
        if (total - 1) // seq_length >= num_samples:
            break
    rng = np.random.RandomState(seed=seed)
    separate = False
    if num_epochs > 1:
        from_first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = (num_samples - from_first) < int(0.80 * per_epoch)

    def doc_idx_of(epochs):
        d = np.mgrid[0:epochs, 0:len(documents)][1]
        d[:] = documents
        d = d.reshape(-1).astype(np.int32)
        rng.shuffle(d)
        return d

    if separate:
        doc_idx = np.concatenate((doc_idx_of(num_epochs - 1), doc_idx_of(1)))
    else:
        doc_idx = doc_idx_of(num_epochs)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    n_total = sample_idx.shape[0] - 1
    n_first = from_first if separate else n_total
    first = np.arange(n_first, dtype=np.uint32)
    rng.shuffle(first)
    shuffle_idx = first
    if n_first != n_total:
        last = np.arange(n_first, n_total, dtype=np.uint32)
        rng.shuffle(last)
        shuffle_idx = np.concatenate((first, last))
    return doc_idx, sample_idx, shuffle_idx, num_epochs, separate


def ref_split(splits_string, size):
    """Megatron's get_train_valid_test_split_."""
    sep = "," if "," in splits_string else "/" if "/" in splits_string else None
    splits = [float(s) for s in (splits_string.split(sep) if sep else [splits_string])]
    splits = (splits + [0.0] * 3)[:3]
    splits = [s / sum(splits) for s in splits]
    index = [0]
    for s in splits:
        index.append(index[-1] + int(round(s * float(size))))
    diff = index[-1] - size
    return [index[0]] + [i - diff for i in index[1:]]


# ---------------------------------------------------------------- helpers

def random_sizes(rng, n, max_len):
    sizes = rng.randint(0, max_len + 1, size=n).astype(np.int32)
    sizes[rng.rand(n) < 0.2] = rng.choice([0, 1])  # plenty of empty and one-token sequences
    sizes[rng.randint(n)] = max(1, max_len)         # at least one token overall
    return sizes


def write_dataset(prefix, docs, dtype=np.uint16):
    b = MMapIndexedDatasetBuilder(prefix, dtype=dtype)
    for d in docs:
        b.add_item(np.asarray(d, dtype=np.int64))
        b.end_document()
    b.finalize()
    return MMapIndexedDataset(prefix)


def random_docs(rng, n, max_len, vocab=1000):
    return [rng.randint(0, vocab, size=int(s)) for s in random_sizes(rng, n, max_len)]


def stream_reference(ds, docs):
    """The doc_idx tokens as one stream; sample i = stream[s*L : s*L+L+1], s = shuffle_idx[i]."""
    stream = np.concatenate([np.asarray(docs[d], dtype=np.int64) for d in ds.doc_idx])
    L = ds.seq_length
    return [stream[s * L: s * L + L + 1] for s in ds.shuffle_idx]


# ---------------------------------------------------------------- index arrays

def test_sample_idx_matches_megatron_loop():
    rng = np.random.RandomState(0)
    for case in range(150):
        n = rng.randint(1, 30)
        sizes = random_sizes(rng, n, rng.choice([1, 3, 10, 40]))
        documents = np.sort(rng.choice(n, size=rng.randint(1, n + 1), replace=False))
        tokens = int(sizes[documents].sum())
        if tokens == 0:
            continue
        num_epochs = rng.randint(1, 4)
        doc_idx = np.tile(documents, num_epochs)
        rng.shuffle(doc_idx)
        seq_length = int(rng.choice([1, 2, 5, 17, 64]))  # includes longer than every document
        got = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens)
        want = ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens)
        np.testing.assert_array_equal(got, want, err_msg=f"case {case}")


@pytest.mark.parametrize("num_samples,expect_epochs,expect_separate",
                         [(5, 1, False), (25, 2, True), (38, 2, False), (50, 3, True)])
def test_index_mappings_match_megatron(num_samples, expect_epochs, expect_separate):
    rng = np.random.RandomState(1)
    sizes = random_sizes(rng, 40, 12)
    documents = np.arange(3, 37)
    seq_length = 8
    per_epoch = (int(sizes[documents].sum()) - 1) // seq_length
    assert per_epoch == 20  # the cases above are chosen for this epoch size
    got = build_index_mappings(documents, sizes, num_samples, seq_length, seed=1234)
    doc_idx, sample_idx, shuffle_idx, epochs, separate = ref_index_mappings(
        documents, sizes, num_samples, seq_length, 1234)
    assert (got.num_epochs, got.separate_last_epoch) == (epochs, separate)
    assert (epochs, separate) == (expect_epochs, expect_separate)
    np.testing.assert_array_equal(got.doc_idx, doc_idx)
    np.testing.assert_array_equal(got.sample_idx, sample_idx)
    np.testing.assert_array_equal(got.shuffle_idx, shuffle_idx)


def test_index_mappings_random_against_megatron():
    rng = np.random.RandomState(2)
    for _ in range(40):
        n = rng.randint(1, 25)
        sizes = random_sizes(rng, n, rng.choice([2, 9, 30]))
        documents = np.arange(n)
        if sizes.sum() == 0:
            continue
        seq_length = int(rng.choice([1, 4, 16, 50]))
        num_samples = int(rng.randint(0, 60))
        seed = int(rng.randint(1, 10_000))
        got = build_index_mappings(documents, sizes, num_samples, seq_length, seed)
        want = ref_index_mappings(documents, sizes, num_samples, seq_length, seed)
        for a, b in zip((got.doc_idx, got.sample_idx, got.shuffle_idx), want[:3]):
            np.testing.assert_array_equal(a, b)
        assert got.sample_idx.shape[0] - 1 >= num_samples


def test_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        build_index_mappings(np.arange(3), np.zeros(3, np.int32), 5, 4, 1)


# ---------------------------------------------------------------- GPTDataset

@pytest.mark.parametrize("seq_length,num_samples", [(7, 40), (64, 30), (3, 5), (16, 0)])
def test_samples_match_token_stream(tmp_path, seq_length, num_samples):
    rng = np.random.RandomState(seq_length)
    docs = random_docs(rng, 30, 20)
    indexed = write_dataset(str(tmp_path / "corpus"), docs)
    documents = np.arange(4, 27)
    ds = GPTDataset("train", str(tmp_path / "corpus"), documents, indexed, num_samples,
                    seq_length, seed=7)
    assert len(ds) >= num_samples
    epochs = len(ds.doc_idx) // len(documents)
    assert np.array_equal(np.sort(ds.doc_idx), np.sort(np.tile(documents, epochs)))
    want = stream_reference(ds, docs)
    for i in range(len(ds)):
        sample = ds[i]["text"]
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)
        np.testing.assert_array_equal(sample, want[i])


def test_seed_determinism(tmp_path):
    rng = np.random.RandomState(3)
    docs = random_docs(rng, 25, 30)
    indexed = write_dataset(str(tmp_path / "c"), docs)

    def samples(seed, cache):
        ds = GPTDataset("train", str(tmp_path / "c"), np.arange(25), indexed, 20, 8, seed,
                        cache_dir=str(tmp_path / cache))
        return np.stack([ds[i]["text"] for i in range(20)])

    np.testing.assert_array_equal(samples(5, "a"), samples(5, "b"))
    assert not np.array_equal(samples(5, "a"), samples(6, "a"))


def test_cache_is_reused_and_keyed_by_inputs(tmp_path, monkeypatch):
    rng = np.random.RandomState(4)
    prefix = str(tmp_path / "c")
    indexed = write_dataset(prefix, random_docs(rng, 20, 15))
    ds = GPTDataset("train", prefix, np.arange(20), indexed, 10, 4, 9)
    for kind, path in ds.index_paths.items():
        assert os.path.isfile(path) and os.path.dirname(path) == str(tmp_path)
        assert os.path.basename(path).startswith("c_train_indexmap_10ns_4sl_9s_")
        assert path.endswith(f"_{kind}_idx.npy")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    mtimes = {p: os.stat(p).st_mtime_ns for p in ds.index_paths.values()}

    def no_build(*args, **kwargs):
        raise AssertionError("index rebuilt although the cache exists")

    monkeypatch.setattr(gpt_dataset, "build_index_mappings", no_build)
    again = GPTDataset("train", prefix, np.arange(20), indexed, 10, 4, 9, build=False)
    assert {p: os.stat(p).st_mtime_ns for p in again.index_paths.values()} == mtimes
    np.testing.assert_array_equal(again[3]["text"], ds[3]["text"])
    # Other documents (e.g. another --split) never match this cache.
    with pytest.raises(AssertionError, match="rebuilt"):
        GPTDataset("train", prefix, np.arange(18), indexed, 10, 4, 9)
    with pytest.raises(FileNotFoundError, match="build=True"):
        GPTDataset("train", prefix, np.arange(18), indexed, 10, 4, 9, build=False)


def test_cache_dir(tmp_path):
    rng = np.random.RandomState(5)
    prefix = str(tmp_path / "data" / "c")
    os.makedirs(tmp_path / "data")
    indexed = write_dataset(prefix, random_docs(rng, 10, 15))
    ds = GPTDataset("valid", prefix, np.arange(10), indexed, 4, 4, 1,
                    cache_dir=str(tmp_path / "cache"))
    assert all(os.path.dirname(p) == str(tmp_path / "cache") for p in ds.index_paths.values())
    assert sorted(os.listdir(tmp_path / "data")) == ["c.bin", "c.idx"]


def test_vocab_size_error_names_prefix_and_id(tmp_path):
    prefix = str(tmp_path / "c")
    docs = [np.arange(10), np.array([1, 2, 500, 3]), np.arange(10)]
    indexed = write_dataset(prefix, docs)
    ok = GPTDataset("train", prefix, np.arange(3), indexed, 3, 4, 1, vocab_size=501)
    _ = [ok[i] for i in range(len(ok))]
    bad = GPTDataset("valid", prefix, np.array([1]), indexed, 1, 3, 1, vocab_size=100)
    with pytest.raises(ValueError, match=rf"{prefix}.*token id 500"):
        _ = [bad[i] for i in range(len(bad))]


# ---------------------------------------------------------------- splits and parsing

def test_parse_split_examples():
    assert parse_split("97,2,1", 1000) == [0, 970, 990, 1000]
    assert parse_split("0.97,0.02,0.01", 1000) == [0, 970, 990, 1000]
    assert parse_split("98,2", 1000) == [0, 980, 1000, 1000]
    assert parse_split("1/1/1", 10) == ref_split("1/1/1", 10)
    assert parse_split("100", 7) == [0, 7, 7, 7]


def test_parse_split_matches_megatron():
    rng = np.random.RandomState(6)
    for _ in range(500):
        parts = [f"{x:.3g}" for x in rng.choice([0, 1, 2, 3.5, 97, 0.01, 0.3], rng.randint(1, 4))]
        if sum(float(p) for p in parts) == 0:
            continue
        text, size = ",".join(parts), int(rng.randint(0, 5000))
        want = ref_split(text, size)
        if min(want) >= 0:  # Megatron can go negative; we clamp (tested below)
            assert parse_split(text, size) == want, (text, size)


def test_parse_split_clamps_negative_boundary():
    assert ref_split("0.1,0.45,0.45", 1) == [0, 1, 1, 1]
    text, size = "0.02,0.49,0.49", 15
    got = parse_split(text, size)
    assert got[-1] == 15 and all(a <= b for a, b in zip(got, got[1:])) and got[0] == 0


@pytest.mark.parametrize("bad", ["-1,2,1", "a,b,c", "0,0,0", "1,2,3,4", "", "nan,1"])
def test_parse_split_errors(bad):
    with pytest.raises(ValueError, match="--split"):
        parse_split(bad, 100)


def test_parse_data_path():
    assert parse_data_path(["a/b"]) == (["a/b"], [1.0])
    prefixes, weights = parse_data_path(["0.7", "a", "0.3", "b"])
    assert prefixes == ["a", "b"] and np.allclose(weights, [0.7, 0.3])
    assert np.allclose(parse_data_path(["7", "a", "3", "b"])[1], [0.7, 0.3])


@pytest.mark.parametrize("bad", [[], ["0.5", "a", "b"], ["0", "a"], ["-1", "a", "1", "b"],
                                 ["x", "a", "1", "b"], ["inf", "a"]])
def test_parse_data_path_errors(bad):
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(bad)


def test_build_train_valid_test_splits(tmp_path):
    rng = np.random.RandomState(8)
    prefix = str(tmp_path / "c")
    docs = random_docs(rng, 50, 30)
    write_dataset(prefix, docs)
    train, valid, test = build_train_valid_test_datasets([prefix], "80,15,5", (30, 6, 2), 8, 3)
    for ds, (lo, hi) in zip((train, valid, test), [(0, 40), (40, 48), (48, 50)]):
        assert set(np.unique(ds.doc_idx)) <= set(range(lo, hi))
        want = stream_reference(ds, docs)
        np.testing.assert_array_equal(ds[0]["text"], want[0])
    assert len(train) >= 30 and len(valid) >= 6 and len(test) >= 2
    train, valid, test = build_train_valid_test_datasets([prefix], "100,0,0", (30, 6, 2), 8, 3)
    assert train is not None and valid is None and test is None


def test_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-path.*nowhere"):
        build_train_valid_test_datasets([str(tmp_path / "nowhere")], "1", (1, 0, 0), 4, 1)


def test_torch_dataloader_and_pickling(tmp_path):
    import pickle
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(9)
    prefix = str(tmp_path / "c")
    indexed = write_dataset(prefix, random_docs(rng, 20, 30))
    ds = GPTDataset("train", prefix, np.arange(20), indexed, 12, 8, 2, vocab_size=1000)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["text"].shape == (4, 9) and batch["text"].dtype == torch.int64
    np.testing.assert_array_equal(batch["text"][1].numpy(), ds[1]["text"])
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive under spawn
    np.testing.assert_array_equal(clone[5]["text"], ds[5]["text"])
    code = "import sys, megatron.data.gpt_dataset; assert 'torch' not in sys.modules"
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
