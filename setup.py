"""Installs the `megatron` package of xmoe (`pip install -e .`, tests: `pip install -e .[test]`)."""

from setuptools import find_packages, setup

setup(
    name="xmoe",
    version="0.1.0",
    description="GPT pretraining with XMoE threshold-routed mixture-of-experts layers",
    packages=find_packages(include=["megatron", "megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "regex",
        "six",
        "pybind11",
        # Compiled GPT-2 byte-level BPE engine (exact merge-rank semantics); see README.
        "tokenizers>=0.15",
    ],
    extras_require={
        "test": ["pytest>=7"],
    },
)
