"""Installs the `megatron` package of xmoe (`pip install -e .`, tests: `pip install -e .[test]`).

Builds one small C++ extension, `megatron.data.preprocess._segment_cache` (the preprocessing
tool's segment cache), when a C++17 compiler works. It is optional: without a compiler, or if the
build fails, the install still succeeds, says so in one line (pip shows it with `-v`), and
`tools/preprocess_data.py` uses the equal pure-Python path. Check with
`python -c "import megatron.data.preprocess._segment_cache"`.
"""

import re
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.errors import CCompilerError, ExecError, PlatformError

# The errors of a missing or failing compiler (setuptools' own list for optional extensions).
COMPILER_ERRORS = (CCompilerError, ExecError, PlatformError)


class OptionalBuildExt(build_ext):
    """pybind11's build_ext; an optional extension that fails to build becomes a one-line note."""

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except COMPILER_ERRORS as err:
            if not ext.optional:
                raise
            print(f"xmoe: C++ extension {ext.name} not built ({_short_reason(err)}); "
                  "tools/preprocess_data.py will use its pure-Python path (same output, slower). "
                  "Install a C++17 compiler and reinstall to build it.", file=sys.stderr)


def _short_reason(err: Exception) -> str:
    """The error's first line, a failed command's argument list cut to the program's name."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"'?\[('[^']*')[^\]]*\]'?", r"\1", reason)


segment_cache = Pybind11Extension(
    "megatron.data.preprocess._segment_cache",
    ["megatron/data/preprocess/segment_cache.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
    optional=True,
)

setup(
    name="xmoe",
    version="0.1.0",
    description="GPT pretraining with XMoE threshold-routed mixture-of-experts layers",
    packages=find_packages(include=["megatron", "megatron.*"]),
    ext_modules=[segment_cache],
    cmdclass={"build_ext": OptionalBuildExt},
    python_requires=">=3.10",
    install_requires=[
        # torch._grouped_mm (the MoE experts' grouped GEMM) arrived in 2.8; tested with 2.13 on
        # CPU (.ci/run) and 2.11 on the H200.
        "torch>=2.8",
        # Tested with 0.19.8 only (.ci/run); newer releases remove config keys we write.
        # Install it first with --no-build-isolation (README).
        "deepspeed>=0.19.8,<0.20",
        "numpy",
        "regex",
        "six",
        "pybind11",
        # Compiled GPT-2 byte-level BPE engine (exact merge-rank semantics); see README.
        "tokenizers>=0.15",
        "tensorboard",  # --tensorboard-dir (torch.utils.tensorboard.SummaryWriter)
    ],
    extras_require={
        # triton: the MoE row kernels' CPU tests run them under its interpreter (CUDA builds
        # of torch ship it already).
        # transformers, safetensors: tests/test_hf_export.py (tools/convert_to_hf.py).
        # pytest-xdist: the suite's worker per core (pyproject.toml's addopts).
        "test": ["pytest>=7", "pytest-xdist>=3", "triton", "matplotlib", "transformers>=4.46", "safetensors>=0.4"],
        "study": ["matplotlib"],  # PNGs of tools/router_study.py and tools/threshold_sweep.py
        "hf": ["transformers>=4.46", "safetensors>=0.4"],  # tools/convert_to_hf.py
        # lm_eval --model hf on exported models (~0.5 GB more: datasets, pandas, pyarrow, ...).
        "eval": ["lm-eval[hf]>=0.4.13", "transformers>=4.46", "safetensors>=0.4"],
    },
)
