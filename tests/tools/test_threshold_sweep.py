"""tools/threshold_sweep.py: one model load, many thresholds on the same validation batches.

Fast tests use a checkpoint laid out as save_checkpoint writes it (pointer, DeepSpeed's model
file with "module" and our client state, the layout file) of an untrained model whose routers
are sharpened; the slow test trains a tiny threshold-1.0 model with pretrain_gpt.py and checks
every sweep row against `pretrain_gpt.py --eval-only --use-checkpoint-args --threshold T`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.arguments import build_configs, parse_args, validate_args
from megatron.checkpoint_check import MODEL_FILENAME, TRACKER_FILENAME
from megatron.evaluation import evaluate
from megatron.expert_checkpoint import convert_checkpoint, write_layout
from megatron.model import GPTModel
from megatron.tokenizer import build_tokenizer
from megatron.training import build_datasets, data_iterator, sample_counts
from tests.test_pretrain_gpt import (EVAL_RE, lines_matching, model_flags, run_pretrain,  # noqa
                                     tensorboard_scalars, tiny_data)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import threshold_sweep  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

ROW_KEYS = {"threshold", "val_loss", "val_ppl", "experts_per_token", "wanted_per_token",
            "dropped_fraction", "expert_flops_vs_all", "expert_flops_vs_dense", "layers"}
LAYER_KEYS = {"layer", "experts", "wanted_per_token", "used_per_token", "dropped_fraction",
              "expert_flops_vs_all", "expert_flops_vs_dense", "expert_load"}


def data_flags(data: dict) -> list[str]:
    return ["--data-path", data["prefix"], "--vocab-file", data["vocab"], "--merge-file",
            data["merges"], "--split", "90,8,2"]


def fake_checkpoint(root: Path, data: dict, router_flags: list[str], iteration: int = 7) -> str:
    """The tiny model of tests/test_pretrain_gpt.py with other router flags, untrained, its
    routers sharpened (x20) so that tokens differ in how many experts they want."""
    flags = [f for f in model_flags(data) if f not in ("--use-threshold", "--threshold", "0.5")]
    args = parse_args(flags + router_flags + ["--train-iters", "1"])
    validated = validate_args(args, 1)
    tokenizer = build_tokenizer("GPT2BPETokenizer", data["vocab"], data["merges"])
    config = build_configs(validated, tokenizer.padded_vocab_size).model
    torch.manual_seed(3)
    model = GPTModel(config)
    with torch.no_grad():
        for layer in model.transformer.layers:
            if layer.is_moe:
                layer.mlp.gate_weight.mul_(20.0)
    saved = dataclasses.asdict(config)
    tag = root / f"iter_{iteration:07d}"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "iteration": iteration,
                "args": {"model": saved}}, tag / MODEL_FILENAME)
    write_layout(str(tag), 1, model=saved)
    (root / TRACKER_FILENAME).write_text(f"{iteration}\n")
    return str(root)


@pytest.fixture(scope="module")
def threshold_ckpt(tiny_data, tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("thr"), tiny_data,
                           ["--use-threshold", "--threshold", "0.8"])


@pytest.fixture(scope="module")
def topk_ckpt(tiny_data, tmp_path_factory):
    return fake_checkpoint(tmp_path_factory.mktemp("topk"), tiny_data, ["--topk", "2"])


def sweep(ckpt: str, data: dict, out: Path, *extra: str) -> int:
    return threshold_sweep.main(["--load", ckpt, *data_flags(data), "--eval-iters", "2",
                                 "--micro-batch-size", "4", "--out", str(out),
                                 "--device", "cpu", *extra])


def reference_rows(ckpt: str, data: dict, thresholds: list[float]) -> list:
    """evaluate() of a model built with each threshold, on the first 2 validation batches."""
    args = parse_args(["--use-checkpoint-args", "--load", ckpt, "--eval-only",
                       "--micro-batch-size", "4", "--eval-iters", "2", "--num-workers", "0",
                       *data_flags(data)])
    validated = validate_args(args, 1)
    tokenizer = build_tokenizer("GPT2BPETokenizer", data["vocab"], data["merges"])
    run = build_configs(validated, tokenizer.padded_vocab_size)
    valid = build_datasets(run, sample_counts(run.training, 0), tokenizer.vocab_size)[1]
    it = data_iterator(valid, 0, run.training, 0)
    micro_batches = [next(it) for _ in range(2)]
    state = torch.load(Path(ckpt) / "iter_0000007" / MODEL_FILENAME, weights_only=False)
    results = []
    for t in thresholds:
        model = GPTModel(dataclasses.replace(run.model, moe=dataclasses.replace(
            run.model.moe, threshold=t)))
        model.load_state_dict(state["module"])
        results.append(evaluate(model, iter(micro_batches), 2, 1, torch.device("cpu")))
    return results


def test_sweep_rows_equal_evaluation_at_each_threshold(threshold_ckpt, tiny_data, tmp_path,
                                                        capsys):
    thresholds = [0.3, 0.6, 0.9, 1.0]
    assert sweep(threshold_ckpt, tiny_data, tmp_path / "out", "--thresholds",
                 *map(str, thresholds)) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert report["checkpoint"] == threshold_ckpt and report["iteration"] == 7
    assert report["router"] == "threshold" and report["trained_threshold"] == 0.8
    assert report["capacity_factor"] == 1.0 and report["eval_tokens"] == 2 * 4 * 64
    rows = report["rows"]
    assert [r["threshold"] for r in rows] == thresholds
    for row, ref in zip(rows, reference_rows(threshold_ckpt, tiny_data, thresholds)):
        assert set(row) == ROW_KEYS
        assert row["val_loss"] == pytest.approx(ref.lm_loss, rel=1e-6)
        assert row["val_ppl"] == pytest.approx(np.exp(ref.lm_loss), rel=1e-6)
        assert [layer["layer"] for layer in row["layers"]] == [2, 4]
        for layer, want in zip(row["layers"], ref.moe_layers):
            assert set(layer) == LAYER_KEYS and layer["experts"] == 8
            assert layer["used_per_token"] == pytest.approx(want.used_per_token, rel=1e-6)
            assert layer["wanted_per_token"] == pytest.approx(want.wanted_per_token, rel=1e-6)
            assert layer["dropped_fraction"] == pytest.approx(want.dropped_fraction, abs=1e-6)
            assert layer["expert_flops_vs_all"] == pytest.approx(layer["used_per_token"] / 8)
            assert layer["expert_flops_vs_dense"] == pytest.approx(
                layer["used_per_token"] * 64 / 256)
            assert sum(layer["expert_load"]) == pytest.approx(1.0)
            np.testing.assert_allclose(layer["expert_load"], want.load_fractions, rtol=1e-6)
        assert row["experts_per_token"] == pytest.approx(
            np.mean([layer["used_per_token"] for layer in row["layers"]]))
    used = [r["experts_per_token"] for r in rows]
    wanted = [r["wanted_per_token"] for r in rows]
    assert used == sorted(used) and wanted == sorted(wanted) and wanted[0] < wanted[-1]
    assert rows[-1]["dropped_fraction"] > 0          # capacity factor 1 at threshold 1.0
    with open(tmp_path / "out" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in table] == thresholds
    assert float(table[1]["val_loss"]) == pytest.approx(rows[1]["val_loss"], rel=1e-6)
    assert "layer2_used_per_token" in table[0]
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    for t in thresholds:
        assert f"\n{t:9.2f} " in printed, printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "sweep.csv", "sweep.json", "sweep.png"]


def test_dropless_and_capacity_factor(threshold_ckpt, tiny_data, tmp_path):
    assert sweep(threshold_ckpt, tiny_data, tmp_path / "a", "--thresholds", "1.0",
                 "--dropless") == 0
    dropless = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert dropless["capacity_factor"] is None
    row = dropless["rows"][0]
    assert row["dropped_fraction"] == 0 and row["experts_per_token"] > 7.5
    assert row["experts_per_token"] == pytest.approx(row["wanted_per_token"])
    assert row["expert_flops_vs_all"] == pytest.approx(row["experts_per_token"] / 8)
    assert sweep(threshold_ckpt, tiny_data, tmp_path / "b", "--thresholds", "1.0",
                 "--moe-eval-capacity-factor", "4") == 0
    four = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert four["capacity_factor"] == 4.0
    assert 0 < four["rows"][0]["dropped_fraction"] < row["experts_per_token"]


def test_expert_parallel_shards_are_merged(threshold_ckpt, tiny_data, tmp_path):
    """A checkpoint saved with expert-parallel size 2 (experts in two shard files) sweeps like
    the same weights at size 1."""
    convert_checkpoint(threshold_ckpt, "iter_0000007", str(tmp_path / "ep2"), 2)
    assert sweep(str(tmp_path / "ep2"), tiny_data, tmp_path / "a", "--thresholds", "0.6") == 0
    assert sweep(threshold_ckpt, tiny_data, tmp_path / "b", "--thresholds", "0.6") == 0
    a, b = (json.loads((tmp_path / d / "sweep.json").read_text())["rows"] for d in "ab")
    assert a == b


def test_a_top_k_checkpoint_gives_one_row_as_trained(topk_ckpt, tiny_data, tmp_path):
    assert sweep(topk_ckpt, tiny_data, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert report["router"] == "topk" and report["trained_threshold"] is None
    (row,) = report["rows"]
    assert row["threshold"] is None
    assert all(layer["wanted_per_token"] == pytest.approx(2.0) for layer in row["layers"])


def test_without_matplotlib_the_tool_names_the_install(threshold_ckpt, tiny_data, tmp_path,
                                                        monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert sweep(threshold_ckpt, tiny_data, tmp_path / "out", "--thresholds", "0.6") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "pip install matplotlib" in out[-1]
    assert str(tmp_path / "out" / "sweep.json") in out[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sweep.csv", "sweep.json"]


@pytest.mark.parametrize("case, message", [
    ("missing", "--load {root}/nowhere does not exist"),
    ("high", "--thresholds must be in (0, 1], got 1.5"),
    ("zero", "--thresholds must be in (0, 1], got 0.0"),
    ("topk", "was trained with the topk router"),
    ("data", "--data-path: /nonexistent/corpus.bin not found"),
    ("dense", "no MoE layer"),
])
def test_bad_input_is_one_line_and_writes_nothing(threshold_ckpt, topk_ckpt, tiny_data,
                                                  tmp_path, capsys, case, message):
    ckpt = {"missing": str(tmp_path / "nowhere"), "topk": topk_ckpt}.get(case, threshold_ckpt)
    data = dict(tiny_data, prefix="/nonexistent/corpus") if case == "data" else tiny_data
    if case == "dense":
        ckpt = fake_checkpoint(tmp_path / "dense", tiny_data, ["--num-experts", "1"])
    thresholds = {"high": ["1.5"], "zero": ["0"]}.get(case, ["0.5", "0.9"])
    code = sweep(ckpt, data, tmp_path / "out", "--thresholds", *thresholds)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("threshold_sweep.py: error: ")
    assert message.format(root=tmp_path) in err[0], err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------
# end to end: pretrain_gpt.py trains, the sweep equals its --eval-only runs


@pytest.mark.slow
def test_sweep_equals_pretrain_eval_only_at_each_threshold(tiny_data, tmp_path):
    """A tiny model trained at threshold 1.0 (dense-to-sparse), swept at 0.5, 0.8, 1.0: each row
    equals `pretrain_gpt.py --eval-only --use-checkpoint-args --threshold T` on the same batches
    (loss and experts/token from its TensorBoard scalars); that run prints the MoE statistics
    under the validation block and reports the routing it changed."""
    flags = model_flags(tiny_data)
    flags[flags.index("--threshold") + 1] = "1.0"
    run_pretrain(flags + ["--train-iters", "10", "--save", str(tmp_path / "ckpt"),
                          "--save-interval", "10"])
    thresholds = [0.5, 0.8, 1.0]
    assert sweep(str(tmp_path / "ckpt"), tiny_data, tmp_path / "sweep", "--thresholds",
                 *map(str, thresholds)) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    used = [r["experts_per_token"] for r in rows]
    assert used == sorted(used) and rows[0]["wanted_per_token"] < rows[-1]["wanted_per_token"]
    for t, row in zip(thresholds[:2], rows):
        tb = tmp_path / f"tb{t}"
        proc = run_pretrain(["--eval-only", "--use-checkpoint-args", "--load",
                             str(tmp_path / "ckpt"), "--threshold", str(t),
                             "--micro-batch-size", "4", "--eval-iters", "2", "--num-workers",
                             "0", "--tensorboard-dir", str(tb), *data_flags(tiny_data)])
        assert tensorboard_scalars(tb, "validation/lm-loss")[10] == pytest.approx(
            row["val_loss"], rel=1e-5)
        for layer in row["layers"]:
            tag = f"validation/moe-layer-{layer['layer']}/experts-per-token-used"
            assert tensorboard_scalars(tb, tag)[10] == pytest.approx(layer["used_per_token"],
                                                                      rel=1e-5)
        assert tensorboard_scalars(tb, "test/moe-mean/experts-per-token-used")
        lines = proc.stdout.splitlines()
        block = lines.index(lines_matching(proc.stdout, EVAL_RE)[0].group(0))
        assert lines[block + 2].startswith("   validation MoE layer 2: wanted ")
        assert lines[block + 4].startswith("   validation MoE mean:")
        assert f"was trained with --threshold 1.0 (this run: {t})" in proc.stderr
