"""The router study's PNGs, drawn from the configurations' records (study_report.config_record).

    val_loss.png           validation loss vs tokens trained, every configuration
    experts_per_token.png  threshold routers: experts per token wanted (solid) and used (dashed)
                           vs iteration, one line per MoE layer, one panel per configuration
    sweep.png              dense-to-sparse sweep: validation ppl vs expert FLOPs relative to a
                           dense FFN, with every other configuration's point as trained
    expert_load.png        per MoE configuration a heat map, MoE layers x experts, of each
                           expert's load (share of the kept token-expert pairs) relative to an
                           even share (1 = balanced), on the evaluation batches

matplotlib is optional (`pip install matplotlib`, the `study` extra): `write_plots` returns None
without it and the caller says so in one line.
"""

from __future__ import annotations

import os
from typing import List, Optional


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")               # files only, no display
    import matplotlib.pyplot as plt
    return plt


def write_plots(out_dir: str, records: List[dict]) -> Optional[List[str]]:
    """The PNGs that apply to `records` (file names in `out_dir`), or None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    written = []
    for name, draw in (("val_loss.png", _val_loss), ("experts_per_token.png", _experts),
                       ("sweep.png", _sweep), ("expert_load.png", _expert_load)):
        fig = draw(plt, records)
        if fig is None:
            continue
        path = os.path.join(out_dir, name)
        tmp = os.path.join(out_dir, f".{name}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(name)
    return written


def _val_loss(plt, records: List[dict]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        points = r["validation"]
        ax.plot([p["tokens"] for p in points], [p["loss"] for p in points], marker="o",
                markersize=3, label=r["name"])
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("validation lm loss")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _experts(plt, records: List[dict]):
    chosen = [r for r in records if r["router"] == "threshold" and r["routing_curves"]]
    if not chosen:
        return None
    fig, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 4.2), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        for k, (layer, points) in enumerate(sorted(r["routing_curves"].items(),
                                                   key=lambda kv: int(kv[0]))):
            color = f"C{k % 10}"
            its = [p[0] for p in points]
            ax.plot(its, [p[1] for p in points], color=color, label=f"layer {layer} wanted")
            ax.plot(its, [p[2] for p in points], color=color, linestyle="--",
                    label=f"layer {layer} used")
        ax.set_title(f"{r['name']} ({r['num_experts']} experts)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("experts per token")
        ax.set_yscale("log", base=2)        # from ~all experts (a new router) down to ~1-3
        ax.set_ylim(0.9, r["num_experts"] * 1.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return fig


def _sweep(plt, records: List[dict]):
    d2s = [r for r in records if r["kind"] == "d2s" and r["sweep"] is not None]
    if not d2s:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in d2s:
        rows = sorted(r["sweep"]["rows"], key=lambda row: row["expert_flops_vs_dense"])
        xs = [row["expert_flops_vs_dense"] for row in rows]
        ax.plot(xs, [row["val_ppl"] for row in rows], marker="o", label=f"{r['name']} sweep")
        for row in rows:
            ax.annotate(f"{row['threshold']:g}", (row["expert_flops_vs_dense"], row["val_ppl"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    markers = iter("s^vDP*Xph")
    for r in records:
        if r["kind"] == "d2s":
            continue
        e = r["evaluation"]
        ax.scatter([e["expert_flops_vs_dense"]], [e["val_ppl"]], marker=next(markers, "o"),
                   s=50, zorder=3, label=f"{r['name']} (as trained)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expert FLOPs relative to a dense FFN (MoE layers)")
    ax.set_ylabel("validation ppl")
    ax.set_title("Dense-to-sparse: perplexity vs expert compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def _expert_load(plt, records: List[dict]):
    chosen = [r for r in records if r["num_experts"] > 1 and r["evaluation"].get("expert_load")]
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 1.2 + 0.45 * sum(
        len(r["evaluation"]["expert_load"]) for r in chosen) + 0.6 * len(chosen)),
        squeeze=False)
    for ax, r in zip(axes[:, 0], chosen):
        loads = r["evaluation"]["expert_load"]
        relative = [[v * len(row) for v in row] for row in loads]
        image = ax.imshow(relative, aspect="auto", cmap="viridis", vmin=0,
                          interpolation="nearest")
        ax.set_yticks(range(len(loads)))
        ax.set_yticklabels([f"layer {layer}" for layer in r["evaluation"]["layers"]], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        peak = max(max(row) for row in relative)
        ax.set_title(f"{r['name']}: expert load / even share (max {peak:.2f})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return fig
