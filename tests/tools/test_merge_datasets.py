"""tools/merge_datasets.py as a script: directory and prefix inputs, skips, errors, atomicity."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.data.test_indexed_dataset import (
    build,
    file_bytes,
    reference_files,
    write_files,
    write_legacy_dataset,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "merge_datasets.py"

A = [[[1, 2, 3], [4, 99]]]
B = [[[5, 99]], [], [[6, 7, 99]]]
C = [[[8, 8, 8, 99]]]


def run_merge(*args, cwd=REPO_ROOT):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script finds megatron
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_merge_directory_sorted_and_skips_non_pairs(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "b"), B)
    build(str(src / "a"), A)
    (src / "notes.txt").write_text("not a dataset")
    (src / "orphan.bin").write_bytes(b"\x00\x00")
    (src / "lonely.idx").write_bytes(b"")
    out = tmp_path / "merged"
    result = run_merge("--input", src, "--output-prefix", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"skipping {src / 'notes.txt'}: not a .bin/.idx dataset file" in result.stderr
    assert f"skipping {src / 'orphan.bin'}: no matching orphan.idx" in result.stderr
    assert f"skipping {src / 'lonely.idx'}: no matching lonely.bin" in result.stderr
    assert "merged 2 datasets" in result.stdout
    assert "4 sequences, 4 documents, 10 tokens" in result.stdout
    assert file_bytes(str(out)) == reference_files(A + B)


def test_merge_explicit_prefixes_keep_order_and_mix_with_directory(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "a"), A)
    build(str(src / "b"), B)
    c = build(str(tmp_path / "c"), C)
    out = tmp_path / "merged"
    result = run_merge("--input", c, src, str(src / "a") + ".idx", "--output-prefix", out)
    assert result.returncode == 0, result.stderr
    assert file_bytes(str(out)) == reference_files(C + A + B + A)


def test_merge_int32_and_legacy_input(tmp_path):
    a = build(str(tmp_path / "a"), A, np.int32)
    legacy = str(tmp_path / "legacy")
    write_legacy_dataset(legacy, B, np.int32)
    out = tmp_path / "merged"
    result = run_merge("--input", a, legacy, "--output-prefix", out)
    assert result.returncode == 0, result.stderr
    assert "legacy" in result.stderr and "Traceback" not in result.stderr
    assert file_bytes(str(out)) == reference_files(A + B, np.int32)


def _assert_clean_failure(result, tmp_path, out, *needles):
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[-1]
    assert not any(name.startswith(out.name) for name in os.listdir(out.parent))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_merge_dtype_mismatch_fails_cleanly(tmp_path):
    a = build(str(tmp_path / "a"), A)
    b = build(str(tmp_path / "b"), B, np.int32)
    out = tmp_path / "merged"
    result = run_merge("--input", a, b, "--output-prefix", out)
    _assert_clean_failure(result, tmp_path, out, f"{b}.idx", f"{a}.idx", "int32", "uint16")


def test_merge_corrupt_pair_fails_cleanly(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "a"), A)
    idx, bin_ = reference_files(B)
    write_files(str(src / "b"), idx[:-8], bin_)  # truncated index
    out = tmp_path / "merged"
    result = run_merge("--input", src, "--output-prefix", out)
    _assert_clean_failure(result, tmp_path, out, str(src / "b.idx"), "truncated")


def test_merge_refuses_output_that_is_an_input(tmp_path):
    a = build(str(tmp_path / "a"), A)
    b = build(str(tmp_path / "b"), B)
    before = file_bytes(b)
    (tmp_path / "sub").mkdir()
    result = run_merge("--input", a, tmp_path / "sub" / ".." / "b", "--output-prefix", b)
    assert result.returncode == 1 and "also an input" in result.stderr
    assert "Traceback" not in result.stderr
    assert file_bytes(b) == before


def test_merge_missing_input(tmp_path):
    result = run_merge("--input", tmp_path / "nope", "--output-prefix", tmp_path / "out")
    assert result.returncode == 1 and str(tmp_path / "nope") in result.stderr
    assert "Traceback" not in result.stderr


def test_merge_lists_every_input_and_records_them(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    a, b = build(str(src / "a"), A), build(str(src / "b"), B)
    result = run_merge("--input", src, "--output-prefix", tmp_path / "all")
    assert result.returncode == 0, result.stderr
    assert f"{a}: 1 documents, 2 sequences, 5 tokens" in result.stdout
    assert f"{b}: 3 documents, 2 sequences, 5 tokens" in result.stdout
    record = json.loads((tmp_path / "all.merge.json").read_text())
    assert [Path(i["prefix"]).name for i in record["inputs"]] == ["a", "b"]
    assert record["output"]["documents"] == 4


def test_merge_refuses_an_earlier_merge_of_its_other_inputs(tmp_path):
    """DIR holding its shards and an earlier merge of them: every document would count twice."""
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "a"), A)
    build(str(src / "b"), B)
    first = run_merge("--input", src, "--output-prefix", src / "all")
    assert first.returncode == 0, first.stderr
    again = run_merge("--input", src, "--output-prefix", src / "all")  # the same command twice
    assert again.returncode == 0, again.stderr
    assert f"skipping {src / 'all'}: the output of this merge" in again.stderr
    assert file_bytes(str(src / "all")) == reference_files(A + B)
    result = run_merge("--input", src, "--output-prefix", tmp_path / "other")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(src / "all") in lines[-1] and f"--exclude {src / 'all'}" in lines[-1], lines
    assert not any(n.startswith("other") for n in os.listdir(tmp_path))
    result = run_merge("--input", src, "--exclude", src / "all", "--output-prefix",
                       tmp_path / "other")
    assert result.returncode == 0, result.stderr
    assert file_bytes(str(tmp_path / "other")) == reference_files(A + B)
    result = run_merge("--input", src, "--exclude", src / "nope", "--output-prefix",
                       tmp_path / "other2")
    assert result.returncode == 1 and "--exclude" in result.stderr.splitlines()[-1]


def test_merge_refuses_a_dataset_the_size_of_all_others_without_record(tmp_path):
    """A merge written by another tool (no record): same documents, sequences and tokens as
    all the other inputs together."""
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "a"), A)
    build(str(src / "b"), B)
    build(str(src / "c"), C)
    build(str(src / "merged"), A + B + C)
    result = run_merge("--input", src, "--output-prefix", tmp_path / "out")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert str(src / "merged") in last and "--exclude" in last, last


def test_merge_ignores_hidden_files_of_running_or_killed_writers(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    build(str(src / "a"), A)
    (src / ".b.123.deadbeef.bin.tmp").write_bytes(b"\0\0")
    (src / ".b.lock").write_text("123 host\n")
    result = run_merge("--input", src, "--output-prefix", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert file_bytes(str(tmp_path / "out")) == reference_files(A)
