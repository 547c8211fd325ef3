"""Megatron's BlendableDataset: several datasets mixed in fixed proportions.

Sample j of the blend is sample dataset_sample_index[j] of dataset dataset_index[j]. The indices
follow Megatron's `helpers.cpp::build_blending_indices` (a greedy error-minimising rule) with the
same floating-point expressions and tie-breaking, so the same weights give the same order.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index [size], dataset_sample_index [size] int64) for normalised `weights`.

    Greedy rule: at step s, with counts c_d of samples taken so far from dataset d, take the
    dataset with the largest error w_d * max(s, 1) - c_d (the first on ties), i.e. the one
    furthest behind its share. Each step depends on the previous one's counts, so this is a plain
    loop over samples (about 0.65 us each: ~7 s for 10M; the C++ helper of Megatron is faster);
    dataset_sample_index, a running count per dataset, is then computed vectorised.
    """
    w = [float(x) for x in weights]
    num_datasets = len(w)
    counts = [0] * num_datasets
    rest = range(1, num_datasets)
    choice = np.empty(size, dtype=np.uint8 if num_datasets < 256 else np.int32)
    picks = [0] * size
    w0 = w[0]
    for s in range(size):
        t = float(s) if s > 1 else 1.0
        best, best_error = 0, w0 * t - counts[0]
        for d in rest:
            error = w[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        picks[s] = best
        counts[best] += 1
    choice[:] = picks
    sample_index = np.empty(size, dtype=np.int64)
    for d in range(num_datasets):
        mask = choice == d
        sample_index[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return choice, sample_index


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"blending needs one weight per dataset, got {weights!r}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blending weights must be finite, >= 0 and not all zero, got {weights!r}")
    return w / w.sum()


class BlendableDataset:
    """`num_samples` samples drawn from `datasets` in proportion to `weights` (normalised).

    Each component must hold at least as many samples as the blend takes from it; Megatron sizes
    them ceil(weight * num_samples * 1.005) (`dataset_split.blended_num_samples`).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], num_samples: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        if num_samples < 0:
            raise ValueError(f"number of samples must be >= 0, got {num_samples}")
        self.datasets = list(datasets)
        self.weights = normalized_weights(weights)
        self.size = int(num_samples)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size)
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, taken)):
            if n > len(ds):
                name = getattr(ds, "name", "")
                raise ValueError(f"blended dataset {d} {name!r} has {len(ds)} samples but the "
                                 f"blend of {self.size} takes {n} from it")
        shares = ", ".join(f"{w:.4f}->{n / max(self.size, 1):.4f}"
                           for w, n in zip(self.weights, taken))
        logger.info("blended %d datasets into %d samples (weight->achieved: %s)",
                    len(self.datasets), self.size, shares)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} blended samples")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]

