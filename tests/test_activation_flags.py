"""--no-bias-gelu-fusion, --openai-gelu and --onnx-safe resolve to the GeLU form the original
XMoE fork's ParallelMLP (dense MLP and every expert) picked for the same flags."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.arguments import build_configs, parse_args, validate_args
from megatron.run_config import gelu_form

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base_argv(tmp_path: Path) -> list[str]:
    """A small valid CPU command line (the files validate_args checks exist, empty)."""
    data = tmp_path / "corpus_text_document"
    for ext in (".bin", ".idx"):
        Path(str(data) + ext).write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return shlex.split(
        f"--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        f"--num-experts 4 --use-threshold --micro-batch-size 2 --train-iters 10 --lr 1e-3 "
        f"--data-path {data} --vocab-file {tmp_path / 'vocab.json'} "
        f"--merge-file {tmp_path / 'merges.txt'} --distributed-backend gloo")


def activation(argv: list[str]) -> str:
    args = parse_args(argv)
    validated = validate_args(args, 1)
    return build_configs(validated, 128).model.activation


# Megatron-DeepSpeed's ParallelMLP (the fork's too): openai_gelu, else onnx_safe (erf_gelu),
# else bias_gelu_fusion (fused tanh), else F.gelu.
CASES = [
    ("", "gelu_tanh"),
    ("--no-bias-gelu-fusion", "gelu"),
    ("--openai-gelu", "gelu_tanh"),
    ("--openai-gelu --no-bias-gelu-fusion", "gelu_tanh"),
    ("--onnx-safe True", "gelu_erf_onnx"),
    ("--onnx-safe", "gelu_erf_onnx"),
    ("--onnx-safe true --no-bias-gelu-fusion", "gelu_erf_onnx"),
    ("--onnx-safe True --openai-gelu", "gelu_tanh"),
    ("--onnx-safe True --openai-gelu --no-bias-gelu-fusion", "gelu_tanh"),
    ("--onnx-safe false", "gelu_tanh"),
    ("--onnx-safe 0 --no-bias-gelu-fusion", "gelu"),
]


@pytest.mark.parametrize("flags,form", CASES)
def test_flags_resolve_to_megatrons_choice(base_argv, flags, form):
    assert activation(base_argv + shlex.split(flags)) == form


def test_resolution_table():
    """Every combination, against the precedence written out once more."""
    for fusion in (False, True):
        for openai in (False, True):
            for onnx in (False, True):
                want = ("gelu_tanh" if openai else "gelu_erf_onnx" if onnx
                        else "gelu_tanh" if fusion else "gelu")
                assert gelu_form(fusion, openai, onnx) == want, (fusion, openai, onnx)


def test_bad_onnx_safe_value_names_the_flag_last(base_argv, tmp_path):
    """argparse stops with one line naming the flag and the value, as the last line."""
    script = ("import sys; from megatron.arguments import parse_args; "
              "parse_args(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", script, *base_argv, "--onnx-safe", "maybe"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--onnx-safe" in last and "'maybe'" in last, proc.stderr
