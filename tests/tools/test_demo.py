"""tools/demo.py: thread count of its steps, the routing summary, paths from any directory."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import demo  # noqa: E402


def test_child_env_limits_threads_unless_the_user_chose():
    env, note = demo.child_env({"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    assert "OMP_NUM_THREADS=1" in note
    env, note = demo.child_env({"OMP_NUM_THREADS": "3"})
    assert env["OMP_NUM_THREADS"] == "3" and "yours" in note


def test_out_dir_is_resolved_against_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = demo.parse_args(["--quick", "--out-dir", "a/b"])
    assert args.out_dir == str(tmp_path / "a" / "b")


LOG = """\
 iteration        2/       4 | lm loss: 7.0E+00 | moe aux loss: 1.0E-02 |
   moe layer 2: experts/token wanted 3.90 used 3.50 | dropped 10.3% | top1 p50 0.16 | x
   moe layer 4: experts/token wanted 4.00 used 3.00 | dropped 25.0% | top1 p50 0.14 | x
 iteration        4/       4 | lm loss: 6.0E+00 | moe aux loss: 1.0E-02 |
   moe layer 2: experts/token wanted 2.50 used 2.50 | dropped 0.0% | top1 p50 0.41 | x
   moe layer 4: experts/token wanted 4.10 used 3.90 | dropped 4.9% | top1 p50 0.12 | x
 validation loss at iteration 4 | lm loss value: 6.1E+00 | lm loss PPL: 4.5E+02 |
 test loss at iteration 4 | lm loss value: 6.2E+00 | lm loss PPL: 4.9E+02 |
"""


def test_summary_explains_wanted_used_dropped_and_follows_the_run():
    text = "\n".join(demo.summary_lines(demo.parse_log(LOG.splitlines()), 12.0))
    assert re.search(r"iteration +2 +layer 2: 3\.90 -> 3\.50 \(10\.3%\) p50 0\.16", text), text
    assert re.search(r"iteration +4 +layer 2: 2\.50 -> 2\.50 \(0\.0%\) p50 0\.41", text), text
    for word in ("wanted:", "used:", "dropped:", "p50:"):
        assert word in text, text
    assert f">= {demo.THRESHOLD}" in text and f"<= {demo.CAPACITY_FACTOR} x" in text, text
    # What the run did, read from the log (not a fixed story): layer 2 fell, layer 4 rose.
    assert re.search(r"layer 2: wanted 3\.90 -> 2\.50 .*fell", text), text
    assert re.search(r"layer 4: wanted 4\.00 -> 4\.10 .*rose", text), text


@pytest.mark.slow
def test_quick_demo_from_another_directory(tmp_path):
    """The shortened main job from outside the repository with a relative --out-dir: corpus ->
    vocabulary -> preprocess -> check -> tiny XMoE training -> evaluations -> summary. 20
    iterations instead of --quick's 60: the loss still falls by far more than 0.5, and the
    summary has 5 rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--quick",
                        "--train-iters", "20", "--out-dir", "rel/out"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    out = tmp_path / "rel" / "out"
    assert "is consistent" in r.stdout and "OMP_NUM_THREADS=1 (yours)" in r.stdout
    ds = MMapIndexedDataset(str(out / "demo_text_document"))
    assert len(ds) >= 5 and ds.num_tokens > 10_000
    eod = json.loads((out / "vocab" / "vocab.json").read_text(encoding="utf-8"))["<|endoftext|>"]
    assert all(int(ds.get(i)[-1]) == eod for i in range(len(ds)))
    assert (out / "train.log").is_file() and (out / "checkpoint").is_dir()

    summary = r.stdout[r.stdout.index("== summary"):]
    first, last = map(float, re.search(r"lm loss: ([0-9.]+) \(iteration \d+\) -> ([0-9.]+)",
                                       summary).groups())
    assert last < first - 0.5, summary
    for what in ("validation", "test"):
        loss, ppl = map(float, re.search(rf"{what}: lm loss ([0-9.]+), PPL ([0-9.]+)",
                                         summary).groups())
        assert 0 < loss < first and ppl == pytest.approx(math.exp(loss), rel=0.01), summary
    rows = re.findall(r"iteration +\d+ +layer 2: ([0-9.]+) -> ([0-9.]+) \(([0-9.]+)%\) p50",
                      summary)
    assert len(rows) >= 3, summary
    assert all(1.0 <= float(u) <= float(w) <= demo.NUM_EXPERTS for w, u, _ in rows), summary
    assert "wanted:" in summary and "dropped:" in summary
