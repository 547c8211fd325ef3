"""What benchmarks/train_throughput.py prints: a line per config, the --breakdown table and
the end-to-end speed issue's goals as same-run ratios."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from _step_profile import CATEGORIES, PHASES, StepProfile


# The goals of the end-to-end speed issue (same-run ratios; H200, bf16, micro-batch 16 x 1024).
TARGET_VS_DENSE, STRETCH_VS_DENSE = 1.0, 1.1    # xmoe / dense tokens/s, --compile
TARGET_VS_DENSE_EAGER = 0.9                     # xmoe / dense tokens/s, eager
TARGET_TOKENS_PER_S = 450_000                   # xmoe, --compile
TARGET_DENSE_VS_PLAIN = 0.95                    # dense / plain tokens/s, --compile
REFERENCE_PEAK_GIB = 14.5                       # xmoe --compile in the run: information


@dataclasses.dataclass
class Result:
    name: str
    ms_per_step: float
    tokens_per_s: float
    mfu: float
    tflops: float
    peak_gib: float
    used_per_token: Optional[float]
    wanted_per_token: Optional[float]
    dropped: Optional[float]
    profile: Optional[StepProfile]      # kernel time per step by category / phase (profiled)
    lm_loss: float
    params: int
    scales: List[float]
    on_gpu: bool
    world: int = 1                      # ranks; the global batch is micro-batch x world

    @property
    def kernel_ms(self) -> Optional[float]:
        return None if self.profile is None else self.profile.kernel_ms

    @property
    def moe_ms(self) -> Optional[float]:
        return None if self.profile is None else self.profile.moe_ms


# ----------------------------------------------------------------------------------------------
# report


def result_line(r: Result) -> str:
    experts = ("-" if r.used_per_token is None else
               f"{r.used_per_token:.2f} used / {r.wanted_per_token:.2f} wanted, "
               f"{100 * r.dropped:.1f}% dropped")
    busy = ("-" if r.kernel_ms is None or not r.on_gpu else
            f"{100 * r.kernel_ms / r.ms_per_step:.0f}%")
    of = "GPU kernel" if r.on_gpu else "CPU op"
    share = ("-" if r.moe_ms is None or not r.kernel_ms or r.used_per_token is None else
             f"{100 * r.moe_ms / r.kernel_ms:.1f}% of {of} time ({r.moe_ms:.1f} ms/step)")
    return (f"{r.name:<6} | {r.tokens_per_s / 1e3:7.1f}k tokens/s | {r.ms_per_step:7.2f} ms/step"
            f" | MFU {100 * r.mfu:5.1f}% ({r.tflops:5.1f} TFLOP/s) | peak {r.peak_gib:5.1f} GiB"
            f" | GPU busy {busy} | experts/token {experts} | MoE share {share}"
            f" | lm loss {r.lm_loss:.3f}"
            f" | params {r.params / 1e6:.1f}M" + _all_to_all_field(r))


def _all_to_all_field(r: Result) -> str:
    """' | all-to-all X ms/step (Y% of step)' with several ranks and a profile, else ''."""
    if r.world <= 1 or r.profile is None:
        return ""
    what = "NCCL kernels" if r.on_gpu else "gloo ops"
    return (f" | all-to-all {r.profile.all_to_all_ms:.2f} ms/step ({what}, "
            f"{100 * r.profile.all_to_all_ms / r.ms_per_step:.1f}% of step)")


def breakdown_lines(results: Dict[str, Result], compiled: bool) -> List[str]:
    """The --breakdown table: a column per profiled config, ms per step."""
    columns = [r for r in results.values() if r.profile is not None]
    if not columns:
        return ["--- step breakdown: no profiled config"]
    of = "GPU kernel" if columns[0].on_gpu else "CPU op"
    width = max(len(c) for c in (*CATEGORIES, *PHASES)) + 2

    def row(label: str, values: List[float]) -> str:
        return f"{label:<{width}}|" + "|".join(f"{v:>9.2f} " for v in values)

    lines = [f"--- step breakdown: ms per step of {of} time over {columns[0].profile.steps} "
             f"profiled step(s), wall time from the timed loops (benchmarks/_step_profile.py)",
             f"{'':<{width}}|" + "|".join(f"{r.name:>9} " for r in columns)]
    if compiled:
        lines.append("(--compile: phase rows only; module hooks would force recompiles and "
                     "fusion blurs module boundaries)")
    else:
        lines.append("by category")
        lines += [row(c, [r.profile.categories[c] for r in columns]) for c in CATEGORIES]
    lines.append("by phase")
    lines += [row(p, [r.profile.phases[p] for r in columns]) for p in PHASES]
    if columns[0].on_gpu:
        lines.append(row("kernels linked to no op", [r.profile.unlinked_ms for r in columns]))
    lines += [row(f"{of} total", [r.kernel_ms for r in columns]),
              row("step wall time", [r.ms_per_step for r in columns]),
              row("host gap (wall - kernel)", [r.ms_per_step - r.kernel_ms for r in columns])]
    if columns[0].on_gpu:
        lines.append(f"{'GPU kernels per step':<{width}}|"
                     + "|".join(f"{r.profile.kernels_per_step:>9.0f} " for r in columns))
    return lines


def _verdict(value: float, target: float, applies: bool = True) -> str:
    """met / NOT met, or for a --compile goal in an eager run, no verdict."""
    if not applies:
        return "a --compile goal, this run is eager"
    return "met" if value >= target else "NOT met"


def summary_lines(results: Dict[str, Result], compiled: bool) -> List[str]:
    """The issue's goals as same-run ratios; the xmoe / dense goal of this run's mode."""
    lines = []
    x, k, d, p = (results.get(n) for n in ("xmoe", "topk8", "dense", "plain"))
    if x is not None and d is not None:
        ratio = x.tokens_per_s / d.tokens_per_s
        if compiled:
            lines.append(f"xmoe / dense tokens/s = {ratio:.3f} [target >= {TARGET_VS_DENSE} "
                         f"(stretch {STRETCH_VS_DENSE}): {_verdict(ratio, TARGET_VS_DENSE)}"
                         f"{', stretch met' if ratio >= STRETCH_VS_DENSE else ''}]")
        else:
            lines.append(f"xmoe / dense (eager) tokens/s = {ratio:.3f} [target >= "
                         f"{TARGET_VS_DENSE_EAGER}: {_verdict(ratio, TARGET_VS_DENSE_EAGER)}]")
    if x is not None:
        lines.append(f"xmoe tokens/s {x.tokens_per_s / 1e3:.1f}k [target >= "
                     f"{TARGET_TOKENS_PER_S / 1e3:.0f}k: "
                     f"{_verdict(x.tokens_per_s, TARGET_TOKENS_PER_S, compiled)}]")
    if d is not None and p is not None:
        ratio = d.tokens_per_s / p.tokens_per_s
        lines.append(f"dense / plain tokens/s = {ratio:.3f} [target >= {TARGET_DENSE_VS_PLAIN}: "
                     f"{_verdict(ratio, TARGET_DENSE_VS_PLAIN, compiled)}]")
    if x is not None:
        peak = f"{x.peak_gib:.1f} GiB" if x.on_gpu else "not measured on CPU"
        lines.append(f"xmoe peak memory {peak} [information only: the issue's reference is "
                     f"{REFERENCE_PEAK_GIB} GiB, compiled, from another run]")
    if k is not None and d is not None:
        lines.append(f"topk8 / dense tokens/s = {k.tokens_per_s / d.tokens_per_s:.3f}")
    if x is not None and k is not None and x.used_per_token:
        flop_ratio = k.used_per_token / x.used_per_token
        moe = ""
        if x.moe_ms and k.moe_ms:
            moe = f"; MoE-layer kernel time ratio {k.moe_ms / x.moe_ms:.2f}"
        lines.append(f"topk8 / xmoe step time = {k.ms_per_step / x.ms_per_step:.2f}{moe} vs "
                     f"expert-FLOP ratio {flop_ratio:.2f} ({k.used_per_token:.2f} / "
                     f"{x.used_per_token:.2f} experts per token)")
    return lines
