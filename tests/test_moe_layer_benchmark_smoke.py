"""Smoke run of benchmarks/moe_layer.py on CPU (--small), so the script cannot rot: every
variant and baseline is timed and the sanity check against baseline (a) holds. (The CUDA-graph
and compiled timings need a GPU: --cuda-graph is accepted and skipped here.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_moe_layer_small_cpu_run_prints_every_variant():
    env = child_env(PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "moe_layer.py"), "--device", "cpu",
         "--small", "--cuda-graph"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    diff = re.search(r"max \|ours - baseline \(a\)\| = (\S+);", out)
    assert diff and float(diff.group(1)) < 1e-4, out        # same function as the original
    for name in ("ours exact, torch ops", "ours sync-free, rt compiled", "(a) capacity-padded",
                 "(a') batched [E,C,D] bmm", "(b) dense FFN", "router only (ours)"):
        assert re.search(rf"^{re.escape(name)}\s+[\d.]+\s", out, re.M), f"no line for {name}"
    assert re.search(r"^ours sync-free: [\d.]+x faster than \(a\) \[target >= 30x\].*"
                     r"[\d.]+x the time of \(b\) \[target <= 1.5x\]", out, re.M), out
