"""Sweep launch settings of the MoE row kernels (megatron/model/moe/kernels/rows.py) on a GPU.

Row kernels: rows per step x warps x programs per SM; GeLU: rows x column chunk x warps x
programs per SM; combine backward (per-expert slices, with dL/db2): rows x warps x programs per
SM; bag sums: warps; segment sums: tile and warps. Kernel time only (20 launches captured in a
CUDA graph, best of 5 replays: the device VM's ~60 us of host time per Triton launch would
otherwise hide the kernels), at the moe_layer benchmark's shapes (T = 16,384, D = 768, F = 384,
E = 64, 3 T kept rows). Prints the launchers' current setting and the four best of the sweep;
kernels/rows.py holds the choice.

    python benchmarks/tune_row_kernels.py
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.config import DEFAULT_ACTIVATION  # noqa: E402
from megatron.model.moe.kernels import rows as K  # noqa: E402
from megatron.model.moe.kernels.gelu import act_code  # noqa: E402

T, D, F, E = 16384, 768, 384, 64


def kernel_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Microseconds per call of `fn`, launched `reps` times inside one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best * 1e3


def report(name: str, current: float, results: list, labels: tuple) -> None:
    results.sort(key=lambda r: r[0])
    best = "; ".join(f"{r[0]:.1f} us " + " ".join(f"{k}={v}" for k, v in zip(labels, r[1:]))
                     for r in results[:4])
    print(f"{name}: current {current:.1f} us; best {best}", flush=True)


def main() -> None:
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    P = 3 * T
    offs = torch.cumsum(torch.full((E,), P // E), 0).to(torch.int32).to(dev)
    x = torch.randn(T, D, device=dev, dtype=bf)
    token_P = torch.randint(0, T, (P,), device=dev)
    rows_J = torch.argsort(token_P, stable=True)
    counts = torch.bincount(token_P, minlength=T)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int64)
    h, gh = (torch.randn(P, F, device=dev, dtype=bf) for _ in range(2))
    b1 = torch.randn(E, F, device=dev, dtype=bf)
    y = torch.randn(P, D, device=dev, dtype=bf)
    w = torch.rand(P, device=dev)
    b2 = torch.randn(E, D, device=dev, dtype=bf)
    grad_TD = torch.randn(T, D, device=dev, dtype=bf)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    row_cases = {
        "gather": lambda: K.gather_rows(x, token_P, offs, bf),
    }
    saved = (K.rows_per_step, K.warps_for, K.row_grid)
    try:
        for name, fn in row_cases.items():
            K.rows_per_step, K.warps_for, K.row_grid = saved
            current, results = kernel_us(fn), []
            for rows, warps, per_sm in itertools.product([2, 4, 8, 16], [4, 8, 16],
                                                         [4, 8, 16, 32]):
                K.rows_per_step = lambda block, r=rows: r
                K.warps_for = lambda block, wp=warps: wp
                K.row_grid = lambda device, n, ps=per_sm: (max(1, min(n, sms * ps)),)
                results.append((kernel_us(fn), rows, warps, per_sm))
            report(name, current, results, ("rows", "warps", "per_sm"))
    finally:
        K.rows_per_step, K.warps_for, K.row_grid = saved

    def expert_grid(per_sm: int) -> tuple:
        return (E, -(-sms * per_sm // E))

    act = act_code(DEFAULT_ACTIVATION)         # the layer's default GeLU form
    for backward in (False, True):
        out, results = torch.empty_like(h), []
        for rows, cols, warps, per_sm in itertools.product([4, 8, 16, 32], [64, 128], [4, 8],
                                                           [4, 8, 16]):
            results.append((kernel_us(lambda: K.gelu_kernel[(sms * per_sm,)](
                gh, h, b1, offs, out, E, F=F, HAS_BIAS=True, BACKWARD=backward, ACT=act,
                ROWS=rows, COLS=cols, BLOCK_E=64, num_warps=warps)), rows, cols, warps,
                per_sm))
        current = kernel_us(lambda: K.gelu_backward_rows(gh, h, b1, offs) if backward
                            else K.gelu_rows(h, b1, offs))
        report("gelu_backward" if backward else "gelu", current, results,
               ("rows", "cols", "warps", "per_sm"))

    results = []
    grad_y, grad_w = torch.empty_like(y), torch.empty_like(w)
    partial = torch.empty(E, sms * 32, D, dtype=torch.float32, device=dev)
    for rows, warps, per_sm in itertools.product([1, 2, 4, 8], [4, 8], [8, 16, 32]):
        results.append((kernel_us(lambda: K.combine_backward_kernel[expert_grid(per_sm)](
            grad_TD, y, w, b2, token_P, offs, grad_y, grad_w, partial, D=D, HAS_BIAS=True,
            BIAS_GRAD=True, ROWS=rows, BLOCK=1024, num_warps=warps)), rows, warps, per_sm))
    report("combine_backward (+ dL/db2)", kernel_us(lambda: K.combine_backward(
        grad_TD, y, w, b2, token_P, offs, bias_grad=True)), results, ("rows", "warps", "per_sm"))

    for weighted in (True, False):
        args = (y, rows_J, starts, offs, T, w if weighted else None, b2 if weighted else None, bf)
        results = []
        for warps in (1, 2, 4, 8):
            out = torch.empty(T, D, dtype=bf, device=dev)
            results.append((kernel_us(lambda: K.bag_sum_kernel[(T,)](
                y, rows_J, starts, w, b2, offs, out, T, E, D=D, HAS_WEIGHT=weighted,
                HAS_BIAS=weighted, BLOCK=1024, BLOCK_E=64, num_warps=warps)), warps))
        report(f"bag_sum weighted={weighted}", kernel_us(lambda: K.bag_sum(*args)), results,
               ("warps",))

    for src in (gh, y):
        width = src.shape[1]
        out = torch.empty(E, width, dtype=torch.float32, device=dev)
        results = []
        for block, rows, warps in itertools.product([64, 128, 256], [16, 32, 64], [4, 8]):
            results.append((kernel_us(lambda: K.segment_sum_kernel[(E, -(-width // block))](
                src, offs, out, F=width, ROWS=rows, BLOCK=block, num_warps=warps)),
                block, rows, warps))
        report(f"segment_sum width={width}", kernel_us(lambda: K.segment_sum(src, offs)),
               results, ("block", "rows", "warps"))


if __name__ == "__main__":
    main()
