"""BlendableDataset against a slow per-sample reference of Megatron's build_blending_indices."""

import math

import numpy as np
import pytest

from megatron.data.blendable_dataset import BlendableDataset, build_blending_indices
from megatron.data.dataset_split import blended_num_samples
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder


def ref_blending(weights, size):
    """helpers.cpp: each sample from the dataset with the largest w * max(s, 1) - taken (first)."""
    weights = np.asarray(weights, dtype=np.float64)
    taken = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int64)
    sample_index = np.zeros(size, dtype=np.int64)
    for s in range(size):
        errors = weights * max(float(s), 1.0) - taken.astype(np.float64)
        d = int(np.argmax(errors))
        dataset_index[s], sample_index[s] = d, taken[d]
        taken[d] += 1
    return dataset_index, sample_index


WEIGHTS = [[1.0], [0.7, 0.3], [0.5, 0.5], [1 / 3] * 3, [0.5, 0.3, 0.2], [0.05, 0.15, 0.3, 0.5],
           list(np.random.RandomState(0).dirichlet(np.ones(7)))]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_blending_matches_reference(weights):
    w = np.asarray(weights) / np.sum(weights)
    got_d, got_s = build_blending_indices(w, 3000)
    want_d, want_s = ref_blending(w, 3000)
    np.testing.assert_array_equal(got_d, want_d)
    np.testing.assert_array_equal(got_s, want_s)


@pytest.mark.parametrize("weights", WEIGHTS[:6])
def test_blending_shares_within_one_sample(weights):
    w = np.asarray(weights) / np.sum(weights)
    dataset_index, _ = build_blending_indices(w, 5000)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[dataset_index], axis=0)  # [n, D]
    n = np.arange(1, 5001)[:, None]
    assert np.all(np.abs(counts - w[None, :] * n) <= 1.0)


class Fake:
    def __init__(self, tag, n):
        self.tag, self.n, self.name = tag, n, f"fake{tag}"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.tag, i)


def test_blendable_dataset_items():
    parts = [Fake(0, 80), Fake(1, 30)]
    blend = BlendableDataset(parts, [7, 3], 100)
    items = [blend[i] for i in range(len(blend))]
    for tag, n in ((0, 70), (1, 30)):
        assert sorted(i for t, i in items if t == tag) == list(range(n))
    with pytest.raises(IndexError):
        blend[100]


def test_component_too_small_is_an_error():
    with pytest.raises(ValueError, match="fake1"):
        BlendableDataset([Fake(0, 100), Fake(1, 10)], [0.5, 0.5], 100)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0], [1.0]])
def test_bad_weights(weights):
    with pytest.raises(ValueError):
        BlendableDataset([Fake(0, 10), Fake(1, 10)], weights, 5)


def test_component_sizes_follow_megatron_margin():
    assert blended_num_samples([0.7, 0.3], 1000) == [
        int(math.ceil(1000 * 0.7 * 1.005)), int(math.ceil(1000 * 0.3 * 1.005))]


def _write(prefix, rng, n_docs, lo, hi):
    b = MMapIndexedDatasetBuilder(prefix, dtype=np.uint16)
    for _ in range(n_docs):
        b.add_item(rng.randint(lo, hi, size=rng.randint(1, 30)))
        b.end_document()
    b.finalize()


def test_build_blended_train_valid_test(tmp_path):
    rng = np.random.RandomState(0)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write(a, rng, 60, 0, 100)      # dataset a: ids < 100
    _write(b, rng, 40, 100, 200)    # dataset b: ids >= 100
    num = (200, 20, 0)
    train, valid, test = build_train_valid_test_datasets(
        ["0.75", a, "0.25", b], "90,10,0", num, 8, 5, vocab_size=200)
    assert test is None
    for blend, n in ((train, 200), (valid, 20)):
        assert isinstance(blend, BlendableDataset) and len(blend) == n
        parts = blend.datasets
        assert all(isinstance(p, GPTDataset) for p in parts)
        assert [p.data_prefix for p in parts] == [a, b]
        taken = np.bincount(blend.dataset_index, minlength=2)
        assert abs(taken[0] - 0.75 * n) <= 1 and abs(taken[1] - 0.25 * n) <= 1
        for j in range(n):
            text = blend[j]["text"]
            from_a = int(blend.dataset_index[j]) == 0
            assert (text < 100).all() if from_a else (text >= 100).all()
            want = parts[int(blend.dataset_index[j])][int(blend.dataset_sample_index[j])]
            np.testing.assert_array_equal(text, want["text"])
    # Per-prefix GPTDatasets were sized with Megatron's 1.005 margin (their cache names say so).
    assert "_train_indexmap_151ns_" in train.datasets[0].index_paths["doc"]
    assert "_train_indexmap_51ns_" in train.datasets[1].index_paths["doc"]
