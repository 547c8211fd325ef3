"""Megatron's pretraining batch sampler and data loader.

Samples are taken in dataset order (the dataset itself is shuffled by its shuffle index), one
global batch of micro_batch_size * data_parallel_size indices at a time; rank r takes the r-th
micro-batch slice of each. Iteration starts at `consumed_samples`, so a run resumed with the
consumed samples of its checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class MegatronPretrainingSampler:
    """Batch sampler: yields this rank's micro-batch of indices of each global batch.

    drop_last=True (training) drops a final incomplete global batch. With drop_last=False it is
    split like a full one, so a rank's last micro-batch may be short or empty (as in Megatron).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to consume: total_samples = {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed samples {consumed_samples} must be in [0, total samples "
                             f"{total_samples}) (checkpoint from a longer run?)")
        if micro_batch_size <= 0:
            raise ValueError(f"--micro-batch-size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data parallel size must be > 0, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data parallel rank {data_parallel_rank} must be in "
                             f"[0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        remaining = self.total_samples - self.consumed_samples
        full, tail = divmod(remaining, self.global_batch)
        return full + (1 if tail and not self.drop_last else 0)

    def __iter__(self) -> Iterator[List[int]]:
        offset = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + self.global_batch <= self.total_samples:
            first = start + offset
            yield list(range(first, first + self.micro_batch_size))
            start += self.global_batch
        if start < self.total_samples and not self.drop_last:
            first = min(start + offset, self.total_samples)
            yield list(range(first, min(first + self.micro_batch_size, self.total_samples)))


def collate_text(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """[{"text": int array [S+1]}] -> {"text": int64 [B, S+1]}."""
    text = np.stack([np.asarray(s["text"], dtype=np.int64) for s in samples])
    return {"text": torch.from_numpy(text)}


def build_pretraining_data_loader(dataset: Optional[Dataset], consumed_samples: int,
                                  micro_batch_size: int, data_parallel_rank: int,
                                  data_parallel_size: int,
                                  num_workers: int = 0) -> Optional[DataLoader]:
    """A DataLoader over `dataset` driven by MegatronPretrainingSampler; None for no dataset."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_text, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)
