"""tools/inspect_dataset.py, run as a script: summary, --show-doc, --check and --repair."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.data.test_indexed_dataset import (
    build,
    file_bytes,
    reference_files,
    write_files,
    write_legacy_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "inspect_dataset.py"
EOD = 99

# Sequence lengths 3, 2, 1, 9 and an empty document.
DOCS = [[[1, 2, 3], [4, EOD]], [], [[EOD]], [[5, 6, 7, 8, 9, 10, 11, 12, EOD]]]


def run_inspect(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds megatron
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_summary_counts_dtype_histogram(tmp_path):
    prefix = build(str(tmp_path / "ds"), DOCS)
    result = run_inspect(prefix)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("dtype     uint16", "documents 4", "sequences 4", "tokens    15"):
        assert line in out
    histogram = [line.split() for line in out.split("histogram:")[1].strip().splitlines()]
    assert histogram == [["1", "1"], ["2-3", "2"], ["8-15", "1"]]


def test_show_doc_prints_ids(tmp_path):
    prefix = build(str(tmp_path / "ds"), DOCS)
    result = run_inspect(prefix, "--show-doc", 0)
    assert result.returncode == 0, result.stderr
    assert "sequence 0 (3 tokens): [1, 2, 3]" in result.stdout
    assert f"sequence 1 (2 tokens): [4, {EOD}]" in result.stdout
    result = run_inspect(prefix, "--show-doc", 1)
    assert result.returncode == 0 and "document 1: empty" in result.stdout
    result = run_inspect(prefix, "--show-doc", 4)
    assert result.returncode == 1 and "4 documents" in result.stderr
    assert "Traceback" not in result.stderr


def test_show_doc_decodes_with_gpt2(tmp_path, gpt2_files):
    tokenizer = pytest.importorskip("megatron.tokenizer")
    if not hasattr(tokenizer, "build_tokenizer"):
        pytest.skip("megatron.tokenizer.build_tokenizer not available yet")
    vocab, merges = gpt2_files
    # GPT-2 ids of "Hello world" and <|endoftext|>.
    prefix = build(str(tmp_path / "ds"), [[[15496, 995, 50256]]])
    result = run_inspect(prefix, "--show-doc", 0, "--vocab-file", vocab, "--merge-file", merges)
    assert result.returncode == 0, result.stderr
    assert "Hello world<|endoftext|>" in result.stdout


def test_check_good_dataset(tmp_path):
    prefix = build(str(tmp_path / "ds"), DOCS)
    result = run_inspect(prefix, "--check")
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stdout
    assert run_inspect(prefix, "--check", "--eod", EOD).returncode == 0
    result = run_inspect(prefix, "--check", "--eod", 7)
    assert result.returncode == 1
    assert "3 of 3 documents do not end with EOD id 7 (first: document 0)" in result.stdout


def test_check_reports_every_problem(tmp_path):
    prefix = str(tmp_path / "ds")
    idx, bin_ = reference_files(DOCS)
    n = 4
    bad_pointer = idx[:34 + 4 * n + 8] + np.int64(3).tobytes() + idx[34 + 4 * n + 16:]
    write_files(prefix, bad_pointer, bin_ + b"\x00\x00\x00\x00\x00\x00")
    result = run_inspect(prefix, "--check")
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 2
    assert "pointers disagree" in problems[0] and prefix + ".idx" in problems[0]
    assert "disagrees with the index" in problems[1] and prefix + ".bin" in problems[1]
    result = run_inspect(prefix, "--repair")
    assert result.returncode == 1 and "cannot repair" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_corrupt_header_and_missing(tmp_path):
    prefix = str(tmp_path / "ds")
    idx, bin_ = reference_files(DOCS)
    write_files(prefix, b"garbage!!" + idx[9:], bin_)
    result = run_inspect(prefix, "--check")
    assert result.returncode == 1 and "bad magic" in result.stdout
    result = run_inspect(tmp_path / "missing")
    assert result.returncode == 1 and "not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_legacy_check_then_repair(tmp_path):
    prefix = str(tmp_path / "legacy")
    write_legacy_dataset(prefix, DOCS)
    bin_before = Path(prefix + ".bin").read_bytes()

    result = run_inspect(prefix)  # still readable, and says so
    assert result.returncode == 0 and "legacy" in result.stdout and "tokens    15" in result.stdout
    result = run_inspect(prefix, "--check", "--eod", EOD)
    assert result.returncode == 1
    assert "legacy layout" in result.stdout and "--repair" in result.stdout
    assert "do not end with EOD" not in result.stdout  # corrected sizes put the EODs back

    result = run_inspect(prefix, "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "repaired" in result.stdout
    assert run_inspect(prefix, "--check", "--eod", EOD).returncode == 0
    correct = build(str(tmp_path / "correct"), DOCS)
    assert file_bytes(prefix) == file_bytes(correct)
    assert Path(prefix + ".bin").read_bytes() == bin_before
    assert sorted(os.listdir(tmp_path)) == [
        "correct.bin", "correct.idx", "legacy.bin", "legacy.idx"]

    result = run_inspect(prefix, "--repair")  # idempotent
    assert result.returncode == 0 and "nothing to repair" in result.stdout
    assert file_bytes(prefix) == file_bytes(correct)
