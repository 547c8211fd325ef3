"""Time GPT index building (doc_idx, sample_idx, shuffle_idx) and blending at pretraining scale.

    python benchmarks/gpt_dataset_index.py [--tokens 1e9] [--blend-samples 1e7]

Synthetic sizes only (no .bin): ~2M documents of ~500 tokens. The baseline is Megatron's
per-sample sample_idx loop in Python, timed on a prefix of the samples in this process and
extrapolated linearly (Megatron runs it in C++, which is roughly 50-100x faster than Python).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.data.blendable_dataset import build_blending_indices
from megatron.data.gpt_index import build_index_mappings, build_sample_idx


def python_sample_idx_loop(sizes, doc_idx, seq_length, num_samples):
    """Megatron's build_sample_idx loop for the first num_samples samples."""
    doc_pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[doc_pos]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                doc_pos, offset = doc_pos + 1, 0
    return doc_pos, offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--mean-doc-len", type=int, default=500)
    parser.add_argument("--blend-samples", type=float, default=1e7)
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    num_docs = int(args.tokens // args.mean_doc_len)
    sizes = rng.randint(1, 2 * args.mean_doc_len, size=num_docs).astype(np.int32)
    documents = np.arange(num_docs, dtype=np.int64)
    total = int(sizes.sum(dtype=np.int64))
    print(f"{num_docs:,} documents, {total:,} tokens")

    for seq_length, num_samples in ((1024, 500_000), (2048, 1_000_000), (2048, 250_000)):
        start = time.perf_counter()
        m = build_index_mappings(documents, sizes, num_samples, seq_length, seed=1234)
        seconds = time.perf_counter() - start
        built = len(m.sample_idx) - 1
        start = time.perf_counter()
        build_sample_idx(sizes, m.doc_idx, seq_length, m.num_epochs, total)
        vectorised = time.perf_counter() - start
        probe = 20_000
        start = time.perf_counter()
        python_sample_idx_loop(sizes, m.doc_idx, seq_length, probe)
        loop_seconds = (time.perf_counter() - start) * built / probe
        print(f"seq {seq_length}, {num_samples:,} samples: {m.num_epochs} epoch(s), "
              f"separate_last={m.separate_last_epoch}, {built:,} samples; all three indices "
              f"{seconds:.2f} s; sample_idx alone {vectorised:.3f} s vs python loop "
              f"{loop_seconds:.1f} s (extrapolated), {loop_seconds / vectorised:.0f}x")

    n = int(args.blend_samples)
    for weights in ([0.7, 0.3], [0.5, 0.3, 0.2], list(rng.dirichlet(np.ones(8)))):
        start = time.perf_counter()
        build_blending_indices(np.asarray(weights) / np.sum(weights), n)
        print(f"blending {n:,} samples over {len(weights)} datasets: "
              f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
