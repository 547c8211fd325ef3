"""MegatronPretrainingSampler against a slow per-index reference; the data loader's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.data_samplers import MegatronPretrainingSampler, build_pretraining_data_loader


def reference(total, consumed, mbs, rank, dp, drop_last=True):
    """Megatron's loop: fill a global batch index by index, hand out the rank's slice."""
    out, batch = [], []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == mbs * dp:
            out.append(batch[rank * mbs:(rank + 1) * mbs])
            batch = []
    if batch and not drop_last:
        out.append(batch[rank * mbs:(rank + 1) * mbs])
    return out


@pytest.mark.parametrize("total, consumed, mbs, dp", [
    (1, 0, 1, 1), (10, 0, 3, 1), (37, 0, 2, 3), (37, 11, 2, 3), (64, 60, 4, 1),
    (100, 5, 1, 4), (101, 0, 5, 2), (12, 6, 6, 1),
])
@pytest.mark.parametrize("drop_last", [True, False])
def test_stream_equals_reference(total, consumed, mbs, dp, drop_last):
    for rank in range(dp):
        sampler = MegatronPretrainingSampler(total, consumed, mbs, rank, dp, drop_last)
        got = list(sampler)
        assert got == reference(total, consumed, mbs, rank, dp, drop_last)
        assert len(sampler) == len(got)


@pytest.mark.parametrize("cut", [0, 1, 7, 24])
def test_resume_continues_exactly(cut):
    """A run stopped after `cut` global batches resumes with consumed = cut * global batch."""
    mbs, dp, total = 2, 2, 101
    for rank in range(dp):
        full = list(MegatronPretrainingSampler(total, 0, mbs, rank, dp))
        resumed = list(MegatronPretrainingSampler(total, cut * mbs * dp, mbs, rank, dp))
        assert resumed == full[cut:]


def test_two_ranks_partition_each_global_batch():
    mbs, dp, total, consumed = 3, 2, 50, 6
    streams = [list(MegatronPretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    assert len(streams[0]) == len(streams[1]) == (total - consumed) // (mbs * dp)
    for i, (a, b) in enumerate(zip(*streams)):
        start = consumed + i * mbs * dp
        assert a + b == list(range(start, start + mbs * dp))    # disjoint, in order, complete


@pytest.mark.parametrize("args, match", [
    ((0, 0, 1, 0, 1), "total_samples"), ((10, 10, 1, 0, 1), "consumed"),
    ((10, 0, 0, 0, 1), "--micro-batch-size"), ((10, 0, 1, 2, 2), "rank"),
    ((10, 0, 1, 0, 0), "data parallel size"),
])
def test_errors(args, match):
    with pytest.raises(ValueError, match=match):
        MegatronPretrainingSampler(*args)


class ToyDataset(torch.utils.data.Dataset):
    """Sample i is {"text": [i, i+1, ..., i+S]} in int32, as a token dataset might store it."""

    def __init__(self, n: int, seq: int = 5):
        self.n, self.seq = n, seq

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"text": np.arange(i, i + self.seq + 1, dtype=np.int32)}


def test_data_loader_batches_and_resume():
    ds = ToyDataset(23)
    loader = build_pretraining_data_loader(ds, consumed_samples=4, micro_batch_size=3,
                                           data_parallel_rank=1, data_parallel_size=2,
                                           num_workers=0)
    batches = [b["text"] for b in loader]
    assert len(batches) == len(loader) == (23 - 4) // 6
    for k, text in enumerate(batches):
        assert text.dtype == torch.int64 and text.shape == (3, 6)
        first = 4 + 6 * k + 3                            # rank 1 takes the second micro-batch
        want = torch.arange(first, first + 3)[:, None] + torch.arange(6)[None, :]
        assert torch.equal(text, want)
    assert build_pretraining_data_loader(None, 0, 1, 0, 1, 0) is None
