"""Installs the `megatron` package of xmoe (`pip install -e .`, tests: `pip install -e .[test]`).

Builds one small C++ extension, `megatron.data.preprocess._segment_cache` (the preprocessing
tool's segment cache); without it the tool uses the equal pure-Python path.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

segment_cache = Pybind11Extension(
    "megatron.data.preprocess._segment_cache",
    ["megatron/data/preprocess/segment_cache.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="xmoe",
    version="0.1.0",
    description="GPT pretraining with XMoE threshold-routed mixture-of-experts layers",
    packages=find_packages(include=["megatron", "megatron.*"]),
    ext_modules=[segment_cache],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.14",  # install it first with --no-build-isolation (README)
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
        "test": ["pytest>=7", "triton"],
    },
)
