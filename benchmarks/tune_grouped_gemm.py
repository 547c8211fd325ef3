"""Sweep block settings of the fused grouped GEMMs (megatron/model/moe/grouped_gemm.py) on a GPU
and compare them with torch._grouped_mm plus the row kernels they replace.

Kernel time only (launches captured in a CUDA graph, best of 5 replays), at the moe_layer
benchmark's shapes (T = 16,384, D = 768, F = 384, E = 64, ~3 T kept rows, uneven expert
loads). Each of the six GEMMs of a layer's forward + backward is timed with every setting of
the sweep (BM/BI, BN/BJ, BK/BP, warps, stages); the unfused reference is torch._grouped_mm on
materialised rows plus the row kernel the fused epilogue or prologue replaces. Every result
is also checked against torch ops (bf16 tolerance). grouped_gemm.py holds the choice.

    python benchmarks/tune_grouped_gemm.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_row_kernels import kernel_us  # noqa: E402
from megatron.config import DEFAULT_ACTIVATION  # noqa: E402
from megatron.model.activations import activation_fn  # noqa: E402
from megatron.model.moe import grouped_gemm as G  # noqa: E402
from megatron.model.moe import kernels as K  # noqa: E402

T, D, FH, E = 16384, 768, 384, 64
ROW_SWEEP = [base + (per_sm, flatten)
             for base in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                          (128, 128, 32, 8, 4), (128, 256, 32, 8, 4)]
             for per_sm in (1, 2) for flatten in (False, True)]
WGRAD_SWEEP = [(128, 128, 64, 4, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
               (128, 256, 64, 8, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
               (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
               (128, 128, 128, 8, 3)]


def maybe_us(fn) -> float:
    """kernel_us, or NaN when the reference op is unavailable here."""
    try:
        return kernel_us(fn)
    except Exception as e:
        print(f"  reference failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        return float("nan")


def sweep(name: str, fn, sweep_list, reference_us: float, check) -> None:
    """Time fn(blocks) for each setting; print the reference and the four best."""
    results = []
    for blocks in sweep_list:
        try:
            out = fn(blocks)
            check(out)
            results.append((kernel_us(lambda: fn(blocks)), blocks))
        except Exception as e:  # a setting that does not fit (shared memory) is skipped
            print(f"  {name} {blocks}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    results.sort(key=lambda r: r[0])
    best = "; ".join(f"{us:.1f} us {b}" for us, b in results[:4])
    print(f"{name}: unfused reference {reference_us:.1f} us; fused best {best}", flush=True)


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    err = float((a.float() - b.float()).abs().max())
    scale = float(b.float().abs().max()) + 1e-6
    assert err <= 2e-2 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("rows", "wgrad"),
                        default=["rows", "wgrad"], help="which GEMMs to sweep")
    parts = parser.parse_args().parts
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    P = 3 * T
    counts = torch.bincount(torch.multinomial(torch.rand(E) + 0.5, P, replacement=True),
                            minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    rows_of = torch.repeat_interleave(torch.arange(E), counts).to(dev)   # expert of each row
    x = torch.randn(T, D, device=dev, dtype=bf)
    g = torch.randn(T, D, device=dev, dtype=bf)
    token_P = torch.randint(0, T, (P,), device=dev)
    w_P = torch.rand(P, device=dev)
    w1 = torch.randn(E, D, FH, device=dev, dtype=bf) / D ** 0.5
    w2 = torch.randn(E, FH, D, device=dev, dtype=bf) / FH ** 0.5
    b1 = torch.randn(E, FH, device=dev, dtype=bf)
    b2 = torch.randn(E, D, device=dev, dtype=bf)
    x_P = x[token_P]
    g_P = g[token_P]
    z_ref = torch._grouped_mm(x_P, w1, offs=offs).float() + b1[rows_of].float()
    z = z_ref.to(bf)
    zf = z.float().requires_grad_(True)          # the layer's default GeLU and its derivative
    gelu = activation_fn(DEFAULT_ACTIVATION)(zf)
    gelu_grad, = torch.autograd.grad(gelu.sum(), zf)
    a = gelu.detach().to(bf)
    u_ref = torch._grouped_mm(g_P, w2.transpose(1, 2), offs=offs).float()
    dz = (w_P[:, None] * u_ref * gelu_grad).to(bf)
    gs_P = (g_P.float() * w_P[:, None]).to(bf)
    ends = offs.tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    print(f"rows per expert: min {int(counts.min())} mean {P // E} max {int(counts.max())}")

    if "rows" in parts:
        sweep_rows(x, g, token_P, w_P, w1, w2, b1, b2, x_P, z_ref, z, a, dz, gs_P, rows_of,
                   offs, P)
    if "wgrad" in parts:
        sweep_wgrad(x, g, token_P, w_P, a, x_P, g_P, gs_P, dz, offs, bounds)


def sweep_rows(x, g, token_P, w_P, w1, w2, b1, b2, x_P, z_ref, z, a, dz, gs_P, rows_of, offs,
               P) -> None:
    bf = torch.bfloat16
    ref = kernel_us(lambda: K.gather_rows(x, token_P, offs, bf)) + kernel_us(
        lambda: torch._grouped_mm(x_P, w1, offs=offs)) + kernel_us(
        lambda: K.gelu_rows(z, b1, offs))
    sweep("fwd x[token] @ w1 -> bias, gelu, weight", lambda bl: G.row_gemm(
        x, w1, offs, P, idx_P=token_P, epilogue=G.EPI_GELU, bias_EN=b1, scale_P=w_P,
        blocks=bl), ROW_SWEEP, ref, lambda out: close(out[1], z_ref, "z"))
    ref = kernel_us(lambda: torch._grouped_mm(a, w2, offs=offs))
    y_ref = torch._grouped_mm(a, w2, offs=offs).float() + b2[rows_of].float()
    sweep("fwd a @ w2 + b2", lambda bl: G.row_gemm(a, w2, offs, P, bias_EN=b2, blocks=bl),
          ROW_SWEEP, ref, lambda out: close(out, y_ref, "y"))
    ref = kernel_us(lambda: K.combine_backward(g, y_ref, w_P, b2, token_P, offs)) + kernel_us(
        lambda: torch._grouped_mm(gs_P, w2.transpose(1, 2), offs=offs)) + kernel_us(
        lambda: K.gelu_backward_rows(gs_P[:, :FH].contiguous(), z, b1, offs))
    gb_TE = g @ b2.t()
    sweep("bwd g[token] @ w2^T -> dz, dweight", lambda bl: G.row_gemm(
        g, w2.transpose(1, 2), offs, P, idx_P=token_P, epilogue=G.EPI_GELU_GRAD, aux_PN=z,
        scale_P=w_P, vec_TE=gb_TE, blocks=bl), ROW_SWEEP, ref,
        lambda out: close(out[0], dz, "dz"))
    ref = kernel_us(lambda: torch._grouped_mm(dz, w1.transpose(1, 2), offs=offs))
    dx_ref = torch._grouped_mm(dz, w1.transpose(1, 2), offs=offs)
    sweep("bwd dz @ w1^T", lambda bl: G.row_gemm(dz, w1.transpose(1, 2), offs, P, blocks=bl),
          ROW_SWEEP, ref, lambda out: close(out, dx_ref, "dx"))


def sweep_wgrad(x, g, token_P, w_P, a, x_P, g_P, gs_P, dz, offs, bounds) -> None:
    bf = torch.bfloat16
    ref = maybe_us(lambda: torch._grouped_mm(a.t(), gs_P, offs=offs))
    a_s = (a.float() * w_P[:, None]).to(bf)
    dw2_ref = torch.stack([a_s[s:e].float().t() @ g_P[s:e].float() for s, e in bounds])
    sweep("bwd dw2 = (w a)^T g[token]", lambda bl: G.group_wgrad(
        a_s, g, offs, r_idx=token_P, blocks=bl), WGRAD_SWEEP, ref,
        lambda out: close(out, dw2_ref, "dw2"))
    dw1_ref = torch.stack([x_P[s:e].float().t() @ dz[s:e].float() for s, e in bounds])
    ref = maybe_us(lambda: torch._grouped_mm(x_P.t(), dz, offs=offs))
    sweep("bwd dw1 = x[token]^T dz", lambda bl: G.group_wgrad(
        x, dz, offs, l_idx=token_P, blocks=bl), WGRAD_SWEEP, ref,
        lambda out: close(out, dw1_ref, "dw1"))
    print(f"bias gradients: segment_sum(dz) {kernel_us(lambda: K.segment_sum(dz, offs)):.1f} us, "
          f"segment_sum(w g[token]) "
          f"{kernel_us(lambda: K.segment_sum(g, offs, idx_P=token_P, scale_P=w_P)):.1f} us, "
          f"segment_sum(w g) materialised {kernel_us(lambda: K.segment_sum(gs_P, offs)):.1f} us")


if __name__ == "__main__":
    main()
