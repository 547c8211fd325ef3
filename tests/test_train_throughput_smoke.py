"""Smoke run of benchmarks/train_throughput.py on CPU (tiny shapes), so the script cannot rot:
it builds each config through megatron.arguments and the training step, and prints its lines.
Its multi-GPU form (2 ranks, EP 2) is checked on the run tests/test_multi_gpu_runs_smoke.py's
scaling test makes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_throughput_small_cpu_run_prints_every_config():
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "train_throughput.py"), "--small",
         "--device", "cpu", "--iters", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "failed" not in out, out
    for name in ("xmoe", "topk8", "dense"):
        line = re.search(rf"^{name}\s+\| .* tokens/s \| .* ms/step \| MFU .* \| experts/token "
                         rf".* \| MoE share .* \| lm loss (\S+)", out, re.M)
        assert line, f"no result line for {name}:\n{out}"
        assert float(line.group(1)) > 0.0                      # a finite loss came back
    # XMoE's routers were sharpened to ~3 experts per token (threshold 0.9); top-8 takes 8.
    used = re.search(r"^xmoe .* experts/token ([\d.]+) used / ([\d.]+) wanted", out, re.M)
    assert used and 2.0 < float(used.group(2)) < 4.0, out
    assert re.search(r"^topk8 .* experts/token [\d.]+ used / 8\.00 wanted", out, re.M), out
    assert re.search(r"^xmoe / dense tokens/s = [\d.]+ \[target >= 0.95: (NOT )?met\]", out, re.M)
    assert re.search(r"^topk8 / xmoe step time = [\d.]+.* vs expert-FLOP ratio [\d.]+", out, re.M)

