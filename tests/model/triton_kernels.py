"""What the Triton kernel test modules share: where they run and how they load the kernels.

On CUDA the kernels run compiled; on CPU only under triton's interpreter, in the subprocess
test_moe_kernels_interpreted.py starts with TRITON_INTERPRET=1 set from the beginning (triton
reads the variable when it decorates a kernel).
"""

import importlib
import os

import pytest
import torch

from megatron.model.moe.backend import triton_available

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
NEEDS_TRITON = pytest.mark.skipif(not triton_available(), reason="needs triton")
CUDA_OR_INTERPRETER = pytest.mark.skipif(
    not CUDA and not INTERPRETED,
    reason="CPU: run under TRITON_INTERPRET=1 by test_moe_kernels_interpreted")


def kernel_module(name: str, kernel: str, package: str = "megatron.model.moe"):
    """Import <package>.<name>; on CPU check that `kernel` is interpreted (the variable was
    set before the import), so a test never runs a compiled CPU fallback."""
    module = importlib.import_module(f"{package}.{name}")
    if not CUDA:
        assert type(getattr(module, kernel)).__name__ == "InterpretedFunction"
    return module
