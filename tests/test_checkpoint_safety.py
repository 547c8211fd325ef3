"""End to end: `pretrain_gpt.py` never overwrites checkpoints it did not load, and says in one line
(its last, exit code 2) what is wrong with a checkpoint directory or a save.

One run of the tiny XMoE model (tests/test_pretrain_gpt.py's data and flags) saves iter_0000002
and iter_0000004; the tests run copies of it through the launch scripts' flags
(`--load DIR --save DIR`). The unit tests of each check are in tests/test_checkpointing.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_pretrain_gpt import model_flags, run_pretrain, tiny_data  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
POINTER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "mp_rank_00_model_states.pt"


def short_run_flags(data: dict, iters: int) -> list[str]:
    return model_flags(data) + ["--train-iters", str(iters), "--lr-warmup-iters", "1",
                                "--eval-interval", "100", "--eval-iters", "1",
                                "--save-interval", "2"]


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):  # noqa: F811
    """A directory with iter_0000002, iter_0000004 and the pointer at 4 (of a 6-iteration
    schedule, stopped by --exit-interval)."""
    root = tmp_path_factory.mktemp("safety") / "ckpt"
    run_pretrain(short_run_flags(tiny_data, 6) + ["--exit-interval", "4", "--save", str(root)])
    assert (root / POINTER).read_text() == "4\n"
    return root


def snapshot(directory: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file: what a run must leave as it was."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(proc) -> str:
    """The last stderr line, after checking it is the only error line and no traceback came."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len([x for x in lines if "error" in x]) == 1, \
        proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
def test_copied_checkpoints_without_pointer_are_refused_then_a_truncated_one_named(
        checkpoints, tiny_data, tmp_path):  # noqa: F811
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints, copy)
    (copy / POINTER).unlink()
    before = snapshot(copy)
    flags = short_run_flags(tiny_data, 6) + ["--load", str(copy), "--save", str(copy)]
    line = error_line(run_pretrain(flags, check=False))
    assert line == (f"pretrain_gpt.py: error: --load {copy} holds 2 checkpoints (iter_0000002 "
                    f"... iter_0000004) but no {POINTER}: to resume from the newest complete "
                    f"one, iter_0000004, run `echo 4 > {copy / POINTER}`; to start afresh, "
                    f"move them out of {copy}")
    assert snapshot(copy) == before
    # the fix it names, then the model file of iter_0000004 cut short (a kill while copying)
    (copy / POINTER).write_text("4\n")
    with open(copy / "iter_0000004" / MODEL_FILE, "r+b") as f:
        f.truncate(4096)
    line = error_line(run_pretrain(flags, check=False))
    assert line.startswith(f"pretrain_gpt.py: error: {copy / 'iter_0000004' / MODEL_FILE} is "
                           "incomplete (")
    assert line.endswith(f"the newest intact checkpoint in {copy} is iter_0000002: to resume "
                         f"from it, run `echo 2 > {copy / POINTER}`")


@pytest.mark.slow
def test_save_into_another_runs_checkpoints_is_refused(checkpoints, tiny_data):  # noqa: F811
    before = snapshot(checkpoints)
    line = error_line(run_pretrain(short_run_flags(tiny_data, 6) + ["--save", str(checkpoints)],
                                   check=False))
    assert line == (f"pretrain_gpt.py: error: --save {checkpoints} already holds checkpoints "
                    "this run did not load (iter_0000002 ... iter_0000004): pass --load "
                    f"{checkpoints} to resume from them, or give --save an empty directory")
    assert snapshot(checkpoints) == before


@pytest.mark.slow
def test_model_flags_that_differ_are_named_in_one_line(checkpoints, tiny_data):  # noqa: F811
    """Was 39 lines of DeepSpeed's `size mismatch` (the issue's --num-experts 8 on 4)."""
    proc = run_pretrain(model_flags(tiny_data) + ["--eval-only", "--load", str(checkpoints),
                                                  "--num-experts", "4",
                                                  "--num-attention-heads", "8"], check=False)
    assert error_line(proc) == (
        f"pretrain_gpt.py: error: --load {checkpoints / 'iter_0000004'} was saved with other "
        "model flags: --num-attention-heads 4 (this run: 8), --num-experts 8 (this run: 4); "
        "pass the checkpoint's values")
    assert "size mismatch" not in proc.stderr


# Run pretrain_gpt.py with torch.save failing the way it does on a full disk (a partial file,
# then `enforce fail at inline_container.cc`) for iteration 6's files, and the free space 0.
_FULL_DISK = """
import runpy, sys, torch
try:
    import megatron.checkpoint_check as check
    check.free_bytes = lambda path: 0
except ImportError:
    pass
real_save = torch.save
def full_disk(obj, f, *args, **kwargs):
    if "tmp_iter_0000006" in str(f):
        with open(f, "wb") as out:
            out.write(b"PK" + bytes(300))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return real_save(obj, f, *args, **kwargs)
torch.save = full_disk
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_save_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
        checkpoints, tiny_data, tmp_path):  # noqa: F811
    resume = tmp_path / "resume"
    shutil.copytree(checkpoints, resume)
    proc = run_pretrain(short_run_flags(tiny_data, 6) + ["--load", str(resume), "--save",
                                                         str(resume)],
                        check=False, launcher=("-c", _FULL_DISK))
    assert error_line(proc) == (f"pretrain_gpt.py: error: no space left on device while saving "
                                f"iteration 6 to {resume}")
    assert sorted(p.name for p in resume.iterdir()) == ["iter_0000002", "iter_0000004", POINTER]
    assert (resume / POINTER).read_text() == "4\n"
    assert snapshot(resume / "iter_0000004") == snapshot(checkpoints / "iter_0000004")


def test_a_second_demo_replaces_the_first_demos_checkpoints(tmp_path, monkeypatch):
    """tools/demo.py trains with --save OUT/checkpoint and no --load, which pretrain_gpt.py
    refuses while OUT/checkpoint holds a previous demo's checkpoints: the demo removes them."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import demo

    (tmp_path / "checkpoint" / "iter_0000010").mkdir(parents=True)
    (tmp_path / "checkpoint" / POINTER).write_text("10\n")
    seen = []
    monkeypatch.setattr(demo, "build_dataset", lambda *args, **kw: ("prefix", "vocab", "merges"))
    monkeypatch.setattr(demo, "run_training", lambda *args, **kw: seen.append(
        os.path.exists(tmp_path / "checkpoint")))
    monkeypatch.setattr(demo, "parse_log", lambda *args, **kw: None)
    monkeypatch.setattr(demo, "summary_lines", lambda *args, **kw: [])
    assert demo.main(["--out-dir", str(tmp_path), "--train-iters", "2"]) == 0
    assert seen == [False]
