"""Run the Triton kernel tests on CPU under triton's interpreter, in a process of their own:
the MoE layer's (test_moe_kernels.py, test_capacity_kernels.py, test_threshold_kernel.py), the
master-weight AdamW step's
(tests/test_adamw_kernel.py) and the fused output-layer cross-entropy's (test_lm_loss.py).

triton decides between compiling and interpreting a kernel when it decorates it, from the
TRITON_INTERPRET variable, so the variable must be set before anything imports the kernels:
a fresh process is the clean way (and it keeps the interpreter out of every other test).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.model.moe.backend import triton_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs test_moe_kernels.py directly")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "model" / "test_moe_kernels.py"),
                           str(ROOT / "tests" / "test_adamw_kernel.py"),
                           str(ROOT / "tests" / "model" / "test_capacity_kernels.py"),
                           str(ROOT / "tests" / "model" / "test_threshold_kernel.py"),
                           str(ROOT / "tests" / "model" / "test_lm_loss.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 90, proc.stdout[-3000:]   # not silently skipped


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_kernels_on_cpu_without_interpreter_name_the_flag(monkeypatch):
    from megatron.config import MoEConfig
    from megatron.model.moe import MoELayer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = MoELayer(MoEConfig(backend="triton"), 16, 4, 0.02, 0.02, 1)
    with pytest.raises(ValueError, match="--moe-backend triton needs a CUDA device"):
        layer(torch.randn(5, 16))
