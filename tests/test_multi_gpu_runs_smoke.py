"""Smoke runs of benchmarks/multi_gpu_runs.py on CPU (gloo, 2 processes, the --small model), so
that the multi-GPU experiments' one-command scripts cannot rot before a multi-GPU machine runs
them: the same code path (deepspeed launcher, TensorBoard read-back, checkpoint conversion,
train_throughput.py's all-to-all profile), tiny shapes."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "multi_gpu_runs.py"


def _run(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    env = child_env(PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--small", "--device", "cpu",
                           "--workdir", str(workdir), "--timeout", "150"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_correctness_expert_parallel_2_agrees_and_converted_checkpoint_evaluates_the_same(
        tmp_path):
    out = _run(["correctness", "--gpus", "2", "--steps", "4"], tmp_path).stdout
    rows = re.findall(r"^ +(\d+) \| +([\d.]+) \| +([\d.]+) \| +([\d.e+-]+) \| +([\d.]+) \| "
                      r"+([\d.]+) \| +([\d.e+-]+)$", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4], out
    assert all(float(r[3]) <= 1e-4 and float(r[6]) <= 1e-4 for r in rows), out
    assert re.search(r"^max relative difference: lm loss \S+, grad norm \S+ \(tolerance 0.0001, "
                     r"fp32 on CPU\)$", out, re.M), out
    assert "\nagree: yes\n" in out, out
    for what in ("validation", "test"):
        m = re.search(rf"^{what} lm loss: EP=2 run ([\d.]+) \| converted, eval-only ([\d.]+)",
                      out, re.M)
        assert m and abs(float(m[1]) - float(m[2])) <= 1e-4 * float(m[1]), out
    assert "\neval loss matches: yes" in out and out.rstrip().endswith("correctness: PASS")
    ckpt = tmp_path / "runs" / "ckpt_ep1" / "latest_checkpointed_iteration.txt"
    assert ckpt.read_text() == "4\n"


@pytest.mark.slow
def test_scaling_one_and_two_ranks_prints_a_two_row_table(tmp_path):
    """Also train_throughput.py's multi-GPU form (its 2-rank run, by the deepspeed launcher,
    with EP 2): one report, the global batch counted over both ranks."""
    out = _run(["scaling", "--gpus", "1,2", "--iters", "2"], tmp_path).stdout
    rows = re.findall(r"^ *(\d+) \| +(\d+) \| +(\d+) \| +([\d.]+)% \| +([\d.]+) \| +(\S+) \| "
                      r"+(\S+)$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    assert rows[0][3] == "100.0" and rows[0][5:] == ("-", "-"), out       # 1 rank: no EP
    assert float(rows[1][5]) > 0 and rows[1][6].endswith("%"), out       # all-to-all measured
    assert "target: >= 90% efficiency at 8 GPUs with EP = 8: not measured" in out
    two_ranks = (tmp_path / "logs" / "scaling_2.log").read_text()
    assert two_ranks.count("world size 2") == 1, two_ranks
    assert len(re.findall(r"^xmoe\s+\| .* tokens/s", two_ranks, re.M)) == 1, two_ranks


def test_a_hung_run_is_killed_and_children_get_nvlink_multicast_off(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("multi_gpu_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    opts = argparse.Namespace(workdir=str(tmp_path), device="cpu", timeout=3.0)
    cmd = [sys.executable, "-c", "import os, time; print('NVLS', os.environ['NCCL_NVLS_ENABLE'],"
           " flush=True); time.sleep(120)"]
    assert module.run_logged("sleeper", cmd, opts) is None
    out = capsys.readouterr().out
    assert "sleeper: FAILED (hung: killed after --timeout 3.0 s)" in out and "| NVLS 0" in out
