"""End to end: `pretrain_gpt.py` in subprocesses on a tiny XMoE model (CPU, fp32, gloo).

One uninterrupted 40-iteration run (checkpoints at 20 and 40) is shared by the tests of the log
format, the falling loss, TensorBoard, the golden loss curve and --eval-only; a 20 + 20 run
stopped by --exit-interval and resumed from its checkpoint must reproduce its losses exactly
(dropout on). Per-iteration losses are read back from TensorBoard (fp32 scalars: exact).

Starting python, torch and DeepSpeed costs more than the few iterations most tests train: the
runs that the data- and expert-parallel tests compare share two launches (`compared_runs`: the
2-rank runs in one torchrun launch, their one-rank references in one process beside it, each
run a whole `pretrain_gpt.main`, one after another, through tests/pretrain_runs.py); the two
bf16 runs share one process; independent runs elsewhere go side by side (one core each). A run
resumed from a checkpoint always starts a fresh process. Subprocesses run with
OMP_NUM_THREADS=1: on two shared cores, torch's OpenMP threads spin against other processes and
a step gets ~50x slower.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron.tokenizer import build_tokenizer
from tests.helpers import child_env, free_port
from tests.tokenizer.gpt2_reference import train_tiny_bpe

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden_tiny_xmoe_losses.json"
ITERS, HALF, GBS, SEQ = 40, 20, 8, 64

ITERATION_RE = re.compile(
    r"^ iteration +(?P<it>\d+)/ +(?P<total>\d+) \| consumed samples: +(?P<samples>\d+) \| "
    r"elapsed time per iteration \(ms\): (?P<ms>[\d.]+) \| learning rate: (?P<lr>[\d.E+-]+) \| "
    r"global batch size: +(?P<gbs>\d+) \| lm loss: (?P<lm>[\d.E+-]+) \| "
    r"moe aux loss: (?P<aux>[\d.E+-]+) \| loss scale: (?P<scale>[\d.]+) \| "
    r"grad norm: (?P<gn>[\d.]+) \| number of skipped iterations: +(?P<skipped>\d+) \| "
    r"number of nan iterations: +(?P<nan>\d+) \| samples per second: (?P<sps>[\d.]+) \| "
    r"tokens per second: (?P<tps>\d+) \| TFLOPs: (?P<tflops>[\d.]+) \|$")
MOE_RE = re.compile(
    r"^   moe layer (?P<layer>\d+): experts/token wanted (?P<wanted>[\d.]+) used "
    r"(?P<used>[\d.]+) \| dropped (?P<dropped>[\d.]+)% \| top1 p50 (?P<p50>[\d.]+) \| "
    r"expert FLOPs vs top-k (?P<vs_topk>[\d.]+), vs dense (?P<vs_dense>[\d.]+)$")
EVAL_RE = re.compile(r"^ (?P<what>validation|test) loss at iteration (?P<it>\d+) \| lm loss "
                     r"value: (?P<loss>[\d.E+-]+) \| lm loss PPL: (?P<ppl>[\d.E+-]+) \| $")


# ----------------------------------------------------------------------------------------------
# data and runs


def synthetic_corpus(num_docs: int = 300, seed: int = 0) -> list[str]:
    """Sentences of a tiny grammar: learnable, and the same text on every Python version."""
    rng = random.Random(seed)
    subjects = ["router", "expert", "token", "layer", "model", "gate", "batch", "kernel"]
    verbs = ["routes", "picks", "drops", "scores", "sends", "keeps", "sorts", "mixes"]
    objects = ["tokens", "experts", "weights", "losses", "logits", "samples", "layers"]
    adjectives = ["small", "sparse", "dense", "fast", "noisy", "stable", "adaptive"]
    docs = []
    for _ in range(num_docs):
        sentences = [f"The {rng.choice(adjectives)} {rng.choice(subjects)} "
                     f"{rng.choice(verbs)} {rng.randint(2, 9)} {rng.choice(objects)}."
                     for _ in range(rng.randint(2, 8))]
        docs.append(" ".join(sentences))
    return docs


def write_dataset(prefix: str, docs_ids: list[list[int]]) -> str:
    with MMapIndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        for ids in docs_ids:
            builder.add_item(np.asarray(ids, dtype=np.uint16))
            builder.end_document()
        builder.finalize()
    return prefix


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """{"prefix", "vocab", "merges", "bad_prefix" (ids beyond the vocabulary)}."""
    root = tmp_path_factory.mktemp("tiny_data")
    docs = synthetic_corpus()
    vocab, merges = train_tiny_bpe(docs[:40], 120, root / "vocab")
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    ids = [tokenizer.tokenize(d) + [tokenizer.eod] for d in docs]
    bad = [[i % 1000 + 500 for i in range(200)] for _ in range(20)]
    return {"prefix": write_dataset(str(root / "corpus"), ids), "vocab": vocab,
            "merges": merges, "bad_prefix": write_dataset(str(root / "bad"), bad),
            "vocab_size": tokenizer.vocab_size}


def model_flags(data: dict, data_prefix: str | None = None) -> list[str]:
    """A tiny XMoE GPT: 4 layers (MoE at 2 and 4, 8 experts), hidden 64, seq 64, 2 micro-batches
    of 4 per iteration, dropout 0.1 (Megatron's default, on)."""
    return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--num-experts", "8", "--expert-interval", "2",
            "--moe-ffn-hidden-size", "64", "--use-threshold", "--threshold", "0.5",
            "--moe-train-capacity-factor", "2", "--micro-batch-size", "4",
            "--global-batch-size", str(GBS), "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "4", "--seed", "1234",
            "--data-path", data_prefix or data["prefix"], "--split", "90,8,2",
            "--vocab-file", data["vocab"], "--merge-file", data["merges"],
            "--num-workers", "0", "--eval-interval", str(HALF), "--eval-iters", "2",
            "--log-interval", "5"]


def run_pretrain(flags: list[str], check: bool = True, launcher: tuple = (),
                 script: Path = REPO / "pretrain_gpt.py",
                 timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, str(script), *flags]
    proc = subprocess.run(cmd, env=child_env(PYTHONPATH=str(REPO)), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_pretrain_many(runs: dict[str, list[str]], out_dir: Path,
                      launcher: tuple = ()) -> dict[str, subprocess.CompletedProcess]:
    """Each of `runs` ({name: flags}) as pretrain_gpt.main, one after another in one launch of
    tests/pretrain_runs.py: {name: its exit code (None: it did not run, a run before it failed),
    stdout and stderr, every rank's joined}. Read a run's result through `succeeded`."""
    out_dir.mkdir(parents=True)
    spec = out_dir / "runs.json"
    spec.write_text(json.dumps(runs))
    driver = run_pretrain([str(spec), str(out_dir)], check=False, launcher=launcher,
                          script=REPO / "tests" / "pretrain_runs.py", timeout=900)
    results = {}
    for name, flags in runs.items():
        def joined(ext: str) -> str:
            return "".join(p.read_text() for p in sorted(out_dir.glob(f"{name}.rank*.{ext}")))

        codes = [int(p.read_text()) for p in out_dir.glob(f"{name}.rank*.rc")]
        code = max(codes, key=abs) if codes else None
        results[name] = subprocess.CompletedProcess(
            flags, code, joined("out"), joined("err") if codes else driver.stderr)
    return results


def succeeded(runs: dict[str, subprocess.CompletedProcess],
              name: str) -> subprocess.CompletedProcess:
    """runs[name] after checking that it ran and exited 0 (else its stderr's tail, naming it)."""
    proc = runs[name]
    if proc.returncode != 0:
        what = "did not run" if proc.returncode is None else f"failed ({proc.returncode})"
        raise AssertionError(f"run {name!r} {what}:\n{proc.stderr[-4000:]}")
    return proc


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def lines_matching(stdout: str, pattern: re.Pattern) -> list[re.Match]:
    return [m for m in map(pattern.match, stdout.splitlines()) if m]


def resumable_flags(data: dict, save: Path) -> list[str]:
    """The straight run's schedule, its length given as --train-tokens, saved at 40 only."""
    return model_flags(data) + ["--train-tokens", str(ITERS * GBS * SEQ), "--save", str(save),
                                "--save-interval", str(ITERS)]


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory):
    """The uninterrupted run (checkpoints at 20 and 40) and, side by side with it (each uses one
    core), the first half of test_exact_resume's: stopped by --exit-interval 20 ("stopped": its
    process, TensorBoard in tb1, checkpoint in ckpt_half)."""
    root = tmp_path_factory.mktemp("straight")
    with ThreadPoolExecutor(2) as pool:
        straight = pool.submit(run_pretrain, model_flags(tiny_data) + [
            "--train-iters", str(ITERS), "--tensorboard-dir", str(root / "tb"),
            "--save", str(root / "ckpt"), "--save-interval", str(HALF)])
        stopped = pool.submit(run_pretrain, resumable_flags(tiny_data, root / "ckpt_half") + [
            "--exit-interval", str(HALF), "--tensorboard-dir", str(root / "tb1")], False)
    return {"stdout": straight.result().stdout, "tb": root / "tb", "ckpt": root / "ckpt",
            "stopped": stopped.result(), "root": root}


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.slow
def test_tiny_xmoe_trains_and_logs_in_megatron_format(straight_run):
    out = straight_run["stdout"]
    iters = lines_matching(out, ITERATION_RE)
    assert [int(m["it"]) for m in iters] == list(range(5, ITERS + 1, 5)), out[-3000:]
    assert all(int(m["total"]) == ITERS and int(m["gbs"]) == GBS for m in iters)
    assert [int(m["samples"]) for m in iters] == [it * GBS for it in range(5, ITERS + 1, 5)]
    assert all(int(m["skipped"]) == 0 and int(m["nan"]) == 0 for m in iters)
    assert all(float(m["scale"]) == 1.0 and float(m["gn"]) > 0 for m in iters)
    first, last = float(iters[0]["lm"]), float(iters[-1]["lm"])
    assert first > math.log(300) - 0.5 and last < first - 1.0, (first, last)
    # each iteration line is followed by one line per MoE layer (2 and 4)
    lines = out.splitlines()
    for m in iters:
        k = lines.index(m.group(0))
        moe = [MOE_RE.match(line) for line in lines[k + 1:k + 3]]
        assert all(moe) and [int(x["layer"]) for x in moe] == [2, 4], lines[k:k + 3]
        for x in moe:
            assert 1.0 <= float(x["wanted"]) <= 8.0 and float(x["used"]) <= float(x["wanted"])
            assert 0.0 <= float(x["dropped"]) <= 100.0 and 0.0 < float(x["p50"]) <= 1.0
    evals = lines_matching(out, EVAL_RE)
    assert [(m["what"], int(m["it"])) for m in evals] == [
        ("validation", HALF), ("validation", ITERS), ("test", ITERS)]
    for m in evals:
        assert float(m["ppl"]) == pytest.approx(math.exp(float(m["loss"])), rel=1e-5)
    assert (straight_run["ckpt"] / "latest_checkpointed_iteration.txt").read_text() == "40\n"


@pytest.mark.slow
def test_tensorboard_has_training_and_moe_scalars(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(straight_run["tb"].glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(straight_run["tb"]), size_guidance={"scalars": 0,
                                                                   "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("lm-loss", "learning-rate", "grad-norm", "loss-scale", "tokens-per-second",
                "moe/aux-loss", "validation/lm-loss", "test/lm-loss"):
        assert tag in scalars, tag
    for layer in (2, 4):
        for name in ("experts-per-token-wanted", "experts-per-token-used", "dropped-fraction"):
            assert f"moe/layer{layer}/{name}" in scalars
        assert f"moe/layer{layer}/expert-load-fraction" in acc.Tags()["histograms"]
    assert sorted(tensorboard_scalars(straight_run["tb"], "lm-loss")) == list(
        range(1, ITERS + 1))


@pytest.mark.slow
def test_golden_loss_curve(straight_run):
    """The first 10 losses of the fixed-seed tiny run, fp32 CPU, at rtol 1e-4.

    Regenerate (after an intended change of the numerics) with
        XMOE_REGENERATE_GOLDEN=1 python -m pytest tests/test_pretrain_gpt.py -k golden
    and commit tests/data/golden_tiny_xmoe_losses.json.
    """
    losses = tensorboard_scalars(straight_run["tb"], "lm-loss")
    first = [losses[it] for it in range(1, 11)]
    if os.environ.get("XMOE_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"description": "lm loss of iterations 1-10 of "
                                      "tests/test_pretrain_gpt.py's straight run",
                                      "lm_loss": first}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["lm_loss"]
    np.testing.assert_allclose(first, golden, rtol=1e-4)


@pytest.mark.slow
def test_exact_resume_matches_uninterrupted_run(straight_run, tiny_data, tmp_path):
    """20 iterations stopped by --exit-interval (with a save; straight_run's "stopped"), then
    resumed to 40 in a fresh process: every iteration's loss equals the uninterrupted run's bit
    for bit (the run length is given as --train-tokens here, which must give the same 40
    iterations and LR schedule)."""
    first, ckpt = straight_run["stopped"], straight_run["root"] / "ckpt_half"
    assert first.returncode == 0, f"the first half failed:\n{first.stderr[-4000:]}"
    assert f"exiting program at iteration {HALF}" in first.stdout
    assert not lines_matching(first.stdout, EVAL_RE)[-1]["what"] == "test"
    second = run_pretrain(resumable_flags(tiny_data, ckpt) + [
        "--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb2")])
    assert f"loaded checkpoint from {ckpt} at iteration {HALF}" in second.stdout
    assert int(lines_matching(second.stdout, ITERATION_RE)[0]["it"]) == HALF + 5
    straight = tensorboard_scalars(straight_run["tb"], "lm-loss")
    resumed = {**tensorboard_scalars(straight_run["root"] / "tb1", "lm-loss"),
               **tensorboard_scalars(tmp_path / "tb2", "lm-loss")}
    assert sorted(resumed) == list(range(1, ITERS + 1))
    assert [resumed[i] for i in range(1, ITERS + 1)] == [straight[i] for i in range(1, ITERS + 1)]
    lr = tensorboard_scalars(tmp_path / "tb2", "learning-rate")
    assert lr == {i: v for i, v in tensorboard_scalars(straight_run["tb"], "learning-rate").items()
                  if i > HALF}


@pytest.mark.slow
def test_eval_only_prints_validation_and_test(straight_run, tiny_data):
    proc = run_pretrain(model_flags(tiny_data) + ["--eval-only", "--load",
                                                  str(straight_run["ckpt"])])
    evals = lines_matching(proc.stdout, EVAL_RE)
    assert [(m["what"], int(m["it"])) for m in evals] == [("validation", ITERS), ("test", ITERS)]
    assert not lines_matching(proc.stdout, ITERATION_RE)
    # the test split is evaluated from its first batch both times: the same loss
    trained_test = lines_matching(straight_run["stdout"], EVAL_RE)[-1]
    assert evals[1]["loss"] == trained_test["loss"]


@pytest.mark.slow
def test_exit_duration_stops_and_saves(tiny_data, tmp_path):
    """--exit-duration-in-mins (rank 0's clock, broadcast): a limit already passed at the first
    check stops after iteration 1 with a checkpoint, and no final validation or test."""
    proc = run_pretrain(model_flags(tiny_data) + [
        "--train-iters", "10", "--exit-duration-in-mins", "1e-6",
        "--save", str(tmp_path / "ckpt"), "--save-interval", "10"])
    assert "exiting program at iteration 1" in proc.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "1\n"
    assert not lines_matching(proc.stdout, EVAL_RE)


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.slow
def test_token_id_beyond_vocabulary_is_one_error_line(tiny_data):
    proc = run_pretrain(model_flags(tiny_data, tiny_data["bad_prefix"])
                        + ["--train-iters", "10", "--num-workers", "1"], check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("pretrain_gpt.py: error: "), proc.stderr
    assert f"outside the vocabulary [0, {tiny_data['vocab_size']})" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_flag_exits_2_with_one_line(tiny_data):
    proc = run_pretrain(model_flags(tiny_data) + ["--train-iters", "2",
                                                  "--tensor-model-parallel-size", "2"],
                        check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("pretrain_gpt.py: error: --tensor-model-parallel-size 2 is "
                                   "not supported (only 1)")


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
    (["--global-batch-size", "6"], "--global-batch-size 6 is not a positive multiple of "
                                   "--micro-batch-size 4"),
    (["--data-path", "/nonexistent/corpus"], "--data-path: /nonexistent/corpus.bin not found"),
    (["--pipeline-model-parallel-size", "2"], "--pipeline-model-parallel-size 2 is not "
                                              "supported"),
])
def test_bad_flags_in_process(tiny_data, capsys, monkeypatch, extra, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pretrain_gpt.main(model_flags(tiny_data) + ["--train-iters", "2"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain_gpt.py: error: "), err
    assert message in err[0]


def test_fp16_without_zero_is_rejected_before_building(tiny_data):
    """DeepSpeed 0.19.8 never scales the loss for fp16 at ZeRO stage 0 while its optimizer
    unscales the gradients: training stalls (seen on an H200), so the run refuses it."""
    from megatron.arguments import build_configs, validate_args
    from megatron.engine import setup_model_and_optimizer

    args = pretrain_gpt.parse_args(model_flags(tiny_data) + ["--train-iters", "2", "--fp16"])
    validated = validate_args(args, 1)
    run = build_configs(validated, 384)
    with pytest.raises(ValueError, match=r"--fp16 with ZeRO stage 0 .*DeepSpeed#8393"):
        setup_model_and_optimizer(run, torch.device("cpu"), 2)


# ----------------------------------------------------------------------------------------------
# data and expert parallelism


def _torchrun(nproc: int) -> tuple:
    return ("-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()))


ZERO_STAGES = ("0", "1", "2")


def data_parallel_flags(data: dict) -> list[str]:
    return model_flags(data) + ["--train-iters", "8", "--hidden-dropout", "0",
                                "--attention-dropout", "0", "--log-interval", "4"]


def expert_parallel_flags(data: dict, zero: str) -> list[str]:
    """8 iterations, every one logged, dropout off, --clip-grad 0.05 (below every norm)."""
    return model_flags(data) + ["--train-iters", "8", "--hidden-dropout", "0",
                                "--attention-dropout", "0", "--log-interval", "1",
                                "--clip-grad", "0.05", "--zero-stage", zero]


def launcher_twin_flags(data: dict) -> list[str]:
    """EP=2, 6 iterations: run by the deepspeed launcher and by torchrun."""
    return model_flags(data) + ["--train-iters", "6", "--log-interval", "1",
                                "--hidden-dropout", "0", "--attention-dropout", "0",
                                "--moe-expert-parallel-size", "2"]


def ep2_by_dp2_flags(data: dict) -> list[str]:
    """6 iterations, micro-batch 2, ZeRO 2, --clip-grad 0.05: world 4 or one rank."""
    return model_flags(data) + ["--train-iters", "6", "--hidden-dropout", "0",
                                "--attention-dropout", "0", "--log-interval", "1",
                                "--micro-batch-size", "2", "--clip-grad", "0.05",
                                "--zero-stage", "2"]


def ep2_checkpointed_flags(data: dict, save: Path) -> list[str]:
    """8 iterations with EP=2 on 2 ranks, ZeRO 1, checkpoints at 4 and 8."""
    return model_flags(data) + ["--train-iters", "8", "--zero-stage", "1",
                                "--moe-expert-parallel-size", "2", "--eval-interval", "4",
                                "--save", str(save), "--save-interval", "4"]


@pytest.fixture(scope="module")
def compared_runs(tiny_data, tmp_path_factory):
    """The 2-rank runs the data- and expert-parallel tests check, in one torchrun launch, and
    their one-rank references, in one process: {"runs": {name: CompletedProcess}, "tb": the
    folder holding each run's TensorBoard folder, by name, "root"}."""
    root = tmp_path_factory.mktemp("compared")
    tb = root / "tb"

    def logged(name: str, flags: list[str]) -> tuple[str, list[str]]:
        return name, flags + ["--tensorboard-dir", str(tb / name)]

    ep2 = ["--moe-expert-parallel-size", "2"]
    half = ep2_checkpointed_flags(tiny_data, root / "ckpt_half")
    two_ranks = dict([
        *(logged(f"ep2_zero{z}", expert_parallel_flags(tiny_data, z) + ep2)
          for z in ZERO_STAGES),
        logged("dp2", data_parallel_flags(tiny_data)),
        logged("ep2_torchrun", launcher_twin_flags(tiny_data)),
        logged("ep2_checkpointed", ep2_checkpointed_flags(tiny_data, root / "ckpt")),
        logged("ep2_stopped_at_4", half + ["--exit-interval", "4"])])
    one_rank = dict([
        *(logged(f"ep1_zero{z}", expert_parallel_flags(tiny_data, z)) for z in ZERO_STAGES),
        logged("dp1", data_parallel_flags(tiny_data)),
        logged("ep2_by_dp2_reference", ep2_by_dp2_flags(tiny_data))])
    with ThreadPoolExecutor(2) as pool:        # side by side: the one-rank runs use one core
        two = pool.submit(run_pretrain_many, two_ranks, root / "two_ranks", _torchrun(2))
        one = pool.submit(run_pretrain_many, one_rank, root / "one_rank")
        runs = {**two.result(), **one.result()}
    return {"runs": runs, "tb": tb, "root": root, "ep2_half_flags": half}


@pytest.mark.slow
def test_two_data_parallel_ranks_equal_one_rank_with_accumulation(compared_runs):
    """torchrun, 2 gloo ranks x micro-batch 4 vs 1 rank x 2 accumulated micro-batches of 4:
    the same samples per step and the same mean gradient, so the same losses (dropout off, as
    the ranks would draw the same masks where one rank draws two)."""
    runs, tb = compared_runs["runs"], compared_runs["tb"]
    two, one = succeeded(runs, "dp2"), succeeded(runs, "dp1")
    assert len(lines_matching(two.stdout, ITERATION_RE)) == 2      # rank 0 prints, once
    losses = [tensorboard_scalars(tb / d, "lm-loss") for d in ("dp1", "dp2")]
    assert sorted(losses[1]) == list(range(1, 9))
    np.testing.assert_allclose([losses[1][i] for i in range(1, 9)],
                               [losses[0][i] for i in range(1, 9)], rtol=2e-5)
    test_losses = [lines_matching(p.stdout, EVAL_RE)[-1]["loss"] for p in (one, two)]
    assert float(test_losses[0]) == pytest.approx(float(test_losses[1]), rel=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_expert_parallel_2_equals_one_rank(compared_runs, zero):
    """EP=2 x DP=1 (each rank 4 of the 8 experts, tokens exchanged by all_to_all) vs one rank
    accumulating the same 2 micro-batches: the same losses and grad norms (clipping active:
    --clip-grad 0.05 is below the norms, so a wrongly counted expert norm changes the update),
    under ZeRO 0 (fp32: our clipping), 1 and 2 (DeepSpeed's). The three stages' runs share one
    torchrun launch and one one-rank process (compared_runs)."""
    runs, tb = compared_runs["runs"], compared_runs["tb"]
    two, one = f"ep2_zero{zero}", f"ep1_zero{zero}"
    succeeded(runs, two)
    succeeded(runs, one)
    for tag in ("lm-loss", "grad-norm"):
        a, b = (tensorboard_scalars(tb / d, tag) for d in (one, two))
        assert sorted(b) == list(range(1, 9)), f"ZeRO {zero}: {tag} iterations {sorted(b)}"
        np.testing.assert_allclose([b[i] for i in range(1, 9)], [a[i] for i in range(1, 9)],
                                   rtol=2e-5, err_msg=f"ZeRO {zero}: {tag}")
    norms = tensorboard_scalars(tb / one, "grad-norm")
    assert min(norms.values()) > 0.05, f"ZeRO {zero}: clipping did not act on every step"


CONVERT = REPO / "tools" / "convert_expert_parallel_checkpoint.py"


@pytest.fixture(scope="module")
def ep2_run(compared_runs):
    """8 iterations with EP=2 on 2 ranks, ZeRO 1, checkpoints at 4 and 8 (compared_runs'
    "ep2_checkpointed")."""
    proc = succeeded(compared_runs["runs"], "ep2_checkpointed")
    return {"stdout": proc.stdout, "tb": compared_runs["tb"] / "ep2_checkpointed",
            "ckpt": compared_runs["root"] / "ckpt"}


@pytest.mark.slow
def test_expert_parallel_checkpoint_holds_every_rank_and_resumes_exactly(ep2_run, compared_runs):
    tag_dir = ep2_run["ckpt"] / "iter_0000008"
    shards = sorted(p.name for p in tag_dir.glob("expert_parallel_rank_*"))
    assert shards == ["expert_parallel_rank_000_of_002.pt", "expert_parallel_rank_001_of_002.pt"]
    a, b = (torch.load(tag_dir / s, weights_only=True)["tensors"] for s in shards)
    w1 = "transformer.layers.1.mlp.experts.w1"
    assert a[w1].shape == b[w1].shape == (4, 64, 64) and not torch.equal(a[w1], b[w1])
    # stopped at 4 (dropout on; compared_runs' "ep2_stopped_at_4"), resumed to 8 in a fresh
    # launch: bit-identical losses
    succeeded(compared_runs["runs"], "ep2_stopped_at_4")
    flags, tb = compared_runs["ep2_half_flags"], compared_runs["tb"]
    resume = tb.parent / "ep2_resumed"
    second = run_pretrain(flags + ["--load", flags[flags.index("--save") + 1],
                                   "--tensorboard-dir", str(resume)], launcher=_torchrun(2))
    assert "loaded checkpoint" in second.stdout
    resumed = {**tensorboard_scalars(tb / "ep2_stopped_at_4", "lm-loss"),
               **tensorboard_scalars(resume, "lm-loss")}
    straight = tensorboard_scalars(ep2_run["tb"], "lm-loss")
    assert [resumed[i] for i in range(1, 9)] == [straight[i] for i in range(1, 9)]


@pytest.mark.slow
def test_expert_parallel_checkpoint_refuses_another_size(ep2_run, tiny_data):
    proc = run_pretrain(model_flags(tiny_data) + ["--eval-only", "--load", str(ep2_run["ckpt"])],
                        check=False)
    assert proc.returncode != 0
    assert "--moe-expert-parallel-size 2; this run uses 1" in proc.stderr
    assert "convert_expert_parallel_checkpoint.py" in proc.stderr


def _convert(load, save, size) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(CONVERT), "--load", str(load), "--save",
                           str(save), "--target-expert-parallel-size", str(size)],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_convert_expert_parallel_2_to_1_evaluates_the_same(ep2_run, tiny_data, tmp_path):
    proc = _convert(ep2_run["ckpt"], tmp_path / "ep1", 1)
    assert proc.returncode == 0, proc.stderr
    assert "expert-parallel size 2" in proc.stdout and "expert-parallel size 1" in proc.stdout
    assert (tmp_path / "ep1" / "latest_checkpointed_iteration.txt").read_text() == "8\n"
    with ThreadPoolExecutor(2) as pool:        # side by side, one core each
        back = pool.submit(_convert, tmp_path / "ep1", tmp_path / "ep2", 2)
        one = run_pretrain(model_flags(tiny_data) + ["--eval-only", "--load",
                                                     str(tmp_path / "ep1")])
    evals = lines_matching(one.stdout, EVAL_RE)
    assert [(m["what"], int(m["it"])) for m in evals] == [("validation", 8), ("test", 8)]
    trained_test = lines_matching(ep2_run["stdout"], EVAL_RE)[-1]
    assert trained_test["what"] == "test"
    assert float(evals[1]["loss"]) == pytest.approx(float(trained_test["loss"]), rel=2e-5)
    # and back to 2 (converted while the evaluation ran): the same shards as the original
    back = back.result()
    assert back.returncode == 0, back.stderr
    for r in range(2):
        name = f"expert_parallel_rank_{r:03d}_of_002.pt"
        a = torch.load(ep2_run["ckpt"] / "iter_0000008" / name, weights_only=True)["tensors"]
        b = torch.load(tmp_path / "ep2" / "iter_0000008" / name, weights_only=True)["tensors"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_convert_rejects_a_size_that_does_not_divide_the_experts(ep2_run, tmp_path):
    proc = _convert(ep2_run["ckpt"], tmp_path / "ep3", 3)
    assert proc.returncode == 1
    assert "8 experts, not divisible by --target-expert-parallel-size 3" in proc.stderr
    assert not (tmp_path / "ep3" / "iter_0000008").exists()


@pytest.mark.slow
def test_deepspeed_launcher_runs_expert_parallel(tiny_data, compared_runs, tmp_path):
    """`deepspeed --num_gpus 2 --num_nodes 1 pretrain_gpt.py ...` (on CPU: 2 gloo processes)
    with EP=2 trains and matches torchrun's losses (compared_runs' "ep2_torchrun")."""
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    cmd = [launcher, "--num_gpus", "2", "--num_nodes", "1", "--master_port", str(free_port()),
           str(REPO / "pretrain_gpt.py"), *launcher_twin_flags(tiny_data),
           "--tensorboard-dir", str(tmp_path / "ds")]
    proc = subprocess.run(cmd, env=child_env(PYTHONPATH=str(REPO)), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    succeeded(compared_runs["runs"], "ep2_torchrun")
    a, b = (tensorboard_scalars(d, "lm-loss")
            for d in (tmp_path / "ds", compared_runs["tb"] / "ep2_torchrun"))
    assert sorted(a) == list(range(1, 7)) and a == b


@pytest.mark.slow
def test_expert_parallel_2_by_data_parallel_2_equals_one_rank(tiny_data, compared_runs,
                                                             tmp_path):
    """World 4 = EP 2 x expert-data-parallel 2 (expert gradients reduced over pairs of ranks
    holding the same experts), ZeRO 2, vs one rank accumulating 4 micro-batches of 2
    (compared_runs' "ep2_by_dp2_reference")."""
    four = run_pretrain(ep2_by_dp2_flags(tiny_data) + [
        "--tensorboard-dir", str(tmp_path / "tb4"), "--moe-expert-parallel-size", "2"],
        launcher=_torchrun(4))
    assert "expert-parallel size 2" in four.stdout
    succeeded(compared_runs["runs"], "ep2_by_dp2_reference")
    one = compared_runs["tb"] / "ep2_by_dp2_reference"
    for tag in ("lm-loss", "grad-norm"):
        a, b = (tensorboard_scalars(d, tag) for d in (one, tmp_path / "tb4"))
        assert sorted(b) == list(range(1, 7))
        np.testing.assert_allclose([b[i] for i in range(1, 7)], [a[i] for i in range(1, 7)],
                                   rtol=2e-5, err_msg=tag)


# ----------------------------------------------------------------------------------------------
# precision and compile


def bf16_flags(data: dict) -> list[str]:
    return model_flags(data) + ["--train-iters", "8", "--bf16", "--log-interval", "1",
                                "--eval-interval", "8", "--save-interval", "8"]


@pytest.fixture(scope="module")
def bf16_runs(tiny_data, tmp_path_factory):
    """--bf16, 8 iterations saved at 8 ("straight": TensorBoard root/tb, checkpoint root/a) and
    the same stopped by --exit-interval 4 ("stopped_at_4": root/tb1, root/b), in one process."""
    root = tmp_path_factory.mktemp("bf16")
    flags = bf16_flags(tiny_data)
    runs = run_pretrain_many({
        "straight": flags + ["--tensorboard-dir", str(root / "tb"), "--save", str(root / "a")],
        "stopped_at_4": flags + ["--exit-interval", "4", "--tensorboard-dir",
                                 str(root / "tb1"), "--save", str(root / "b")]}, root / "runs")
    return {"runs": runs, "root": root}


@pytest.mark.slow
def test_bf16_trains_and_resumes_exactly(tiny_data, bf16_runs):
    """--bf16 at ZeRO 0 runs on our master-weight AdamW (no DeepSpeed bf16 wrapper): the loss
    falls, and 4 + 4 iterations with a checkpoint between (the second half in a fresh process)
    equal 8 straight, bit for bit."""
    root = bf16_runs["root"]
    straight = succeeded(bf16_runs["runs"], "straight")
    succeeded(bf16_runs["runs"], "stopped_at_4")
    run_pretrain(bf16_flags(tiny_data) + ["--load", str(root / "b"), "--save", str(root / "b"),
                                          "--tensorboard-dir", str(root / "tb2")])
    losses = tensorboard_scalars(root / "tb", "lm-loss")
    resumed = {**tensorboard_scalars(root / "tb1", "lm-loss"),
               **tensorboard_scalars(root / "tb2", "lm-loss")}
    assert [resumed[i] for i in range(1, 9)] == [losses[i] for i in range(1, 9)]
    assert losses[8] < losses[1] - 0.5
    assert all(math.isfinite(v) for v in tensorboard_scalars(root / "tb", "grad-norm").values())
    state = torch.load(root / "a" / "iter_0000008" / "mp_rank_00_model_states.pt",
                       weights_only=False)
    assert state["module"]["transformer.layers.1.mlp.gate_weight"].dtype == torch.float32
    assert state["module"]["transformer.layers.1.mlp.experts.w1"].dtype == torch.bfloat16
    assert state["optimizer"]["format"] == "xmoe_master_weights_v1"
    assert "lm loss" in straight.stdout


@pytest.mark.slow
def test_compile_flag_trains_like_eager(tiny_data, tmp_path):
    """--compile (aot_eager here: the traced graphs without inductor's build time on CPU)
    gives the losses of the uncompiled sync-free run, in training and in evaluation. 3
    iterations (the updates of iterations 2 and 3 reach the losses of 3 and the evaluations)
    and 1 evaluation batch: on CPU the per-expert loop recompiles for every new split of the
    tokens, which is what takes the time. The two runs side by side, one core each."""
    flags = model_flags(tiny_data) + ["--train-iters", "3", "--lr-warmup-iters", "1",
                                      "--log-interval", "1", "--hidden-dropout", "0",
                                      "--attention-dropout", "0", "--eval-iters", "1"]
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_pretrain, flags + extra + ["--tensorboard-dir", str(tmp_path / d)])
                for extra, d in ((["--compile", "aot_eager"], "c"),
                                 (["--moe-sync-free-dispatch"], "e"))]
    for run in runs:
        run.result()            # raises, naming the run's error, if it failed
    a, b = (tensorboard_scalars(tmp_path / d, "lm-loss") for d in ("c", "e"))
    assert sorted(a) == list(range(1, 4))
    np.testing.assert_allclose([a[i] for i in range(1, 4)], [b[i] for i in range(1, 4)],
                               rtol=1e-5)
    for tag in ("validation/lm-loss", "test/lm-loss"):
        a, b = (tensorboard_scalars(tmp_path / d, tag) for d in ("c", "e"))
        assert sorted(a) == [3] and a[3] == pytest.approx(b[3], rel=1e-5), (tag, a, b)


@pytest.mark.slow
def test_bf16_load_without_optimizer_state_keeps_the_weights(tiny_data, bf16_runs, tmp_path):
    """--no-load-optim: the fp32 master weights are refreshed from the loaded bf16 weights (were
    they left at their initial values, the first step would throw the training away). Loads
    bf16_runs' "straight" checkpoint (8 iterations)."""
    succeeded(bf16_runs["runs"], "straight")
    flags = model_flags(tiny_data) + ["--bf16", "--log-interval", "1", "--eval-interval", "100"]
    run_pretrain(flags + ["--train-iters", "10", "--load", str(bf16_runs["root"] / "a"),
                          "--no-load-optim", "--tensorboard-dir", str(tmp_path / "tb2")])
    first = tensorboard_scalars(bf16_runs["root"] / "tb", "lm-loss")
    resumed = tensorboard_scalars(tmp_path / "tb2", "lm-loss")
    assert sorted(resumed) == [9, 10]       # iteration 10's forward runs on step 9's update
    assert abs(resumed[10] - first[8]) < 0.5 < first[1] - first[8]
