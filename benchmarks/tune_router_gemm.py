"""Sweep tiles and launch settings of the router GEMM kernels
(megatron/model/moe/kernels/router_gemm.py).

Kernel time only (launches captured in a CUDA graph, as tune_row_kernels.py), at the moe_layer
benchmark's shapes (T = 16,384, D = 768, E = 64, bf16 activations, fp32 gate). Prints the
current setting and the four best of the sweep; router_gemm.py holds the choice.

    python benchmarks/tune_router_gemm.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_row_kernels import kernel_us, report  # noqa: E402
from megatron.model.moe.kernels import router_gemm as R  # noqa: E402

T, D, E = 16384, 768, 64


def time_or_skip(fn) -> float:
    """kernel_us(fn), or inf for a setting that does not fit (shared memory, registers)."""
    try:
        return kernel_us(fn)
    except OutOfResources:
        return float("inf")


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    gate = torch.randn(E, D, device=dev) * 0.02
    grad_TE = torch.randn(T, E, device=dev)
    logits = torch.empty(T, E, device=dev)
    grad_x = torch.empty(T, D, device=dev, dtype=torch.bfloat16)

    results = []
    for bt, bd, warps, stages in itertools.product([32, 64, 128, 256], [64, 128, 256], [4, 8],
                                                   [2, 3, 4]):
        results.append((time_or_skip(lambda: R.logits_kernel[(triton.cdiv(T, bt),)](
            x, gate, logits, T, E, D=D, SPLIT=True, BT=bt, BE=64, BD=bd, num_warps=warps,
            num_stages=stages)), bt, bd, warps, stages))
    current = kernel_us(lambda: R.logits_kernel[(triton.cdiv(T, R.LOGITS_TILES["BT"]),)](
        x, gate, logits, T, E, D=D, SPLIT=True, BE=64, **R.LOGITS_TILES))
    report("logits", current, results, ("BT", "BD", "warps", "stages"))

    results = []
    for bt, bd, warps, stages in itertools.product([32, 64, 128, 256], [64, 128, 256], [4, 8],
                                                   [1, 2, 3]):
        results.append((time_or_skip(lambda: R.grad_x_kernel[(triton.cdiv(T, bt),
                                                            triton.cdiv(D, bd))](
            grad_TE, gate, grad_x, T, E, D=D, SPLIT=True, BT=bt, BE=64, BD=bd, num_warps=warps,
            num_stages=stages)), bt, bd, warps, stages))
    current = kernel_us(lambda: R.grad_x_kernel[(triton.cdiv(T, R.GRAD_X_TILES["BT"]),
                                                  triton.cdiv(D, R.GRAD_X_TILES["BD"]))](
        grad_TE, gate, grad_x, T, E, D=D, SPLIT=True, BE=64, **R.GRAD_X_TILES))
    report("grad_x", current, results, ("BT", "BD", "warps", "stages"))

    results = []
    for bt, bd, chunks, warps, stages in itertools.product([32, 64, 128], [64, 128, 256],
                                                           [16, 32, 64, 128], [4, 8], [2, 3, 4]):
        rows_per_chunk = triton.cdiv(T, chunks * bt) * bt
        n_chunks = triton.cdiv(T, rows_per_chunk)
        partial = torch.empty(n_chunks, E, D, device=dev)

        def grad_gate(bt=bt, bd=bd, warps=warps, stages=stages, rows_per_chunk=rows_per_chunk,
                      partial=partial):
            R.grad_gate_kernel[(triton.cdiv(D, bd), partial.shape[0])](
                grad_TE, x, partial, T, E, rows_per_chunk, D=D, SPLIT=True, BT=bt, BE=64, BD=bd,
                num_warps=warps, num_stages=stages)
            return partial.sum(0)
        results.append((time_or_skip(grad_gate), bt, bd, chunks, warps, stages))
    tiles, rows_per_chunk, n_chunks = R.gate_grad_chunks(T, D, E)
    partial = torch.empty(n_chunks, E, D, device=dev)

    def current_grad_gate():
        R.grad_gate_kernel[(triton.cdiv(D, tiles["BD"]), n_chunks)](
            grad_TE, x, partial, T, E, rows_per_chunk, D=D, SPLIT=True, BE=64, **tiles)
        return partial.sum(0)
    current = kernel_us(current_grad_gate)
    report("grad_gate (with the chunk sum)", current, results,
           ("BT", "BD", "chunks", "warps", "stages"))


if __name__ == "__main__":
    main()
