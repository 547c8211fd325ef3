"""tools/router_study.py: configurations, log parsing, results, refusals, and tiny studies.

Fast tests read log text written by megatron/training_log.py's own line formatters (so a format
change fails here) and sweep.json fixtures shaped like tools/threshold_sweep.py's schema. The slow
tests run tiny studies end to end in subprocesses (pretrain_gpt.py and tools/threshold_sweep.py
for real): a study stopped between configurations and rerun, and one killed (SIGTERM) in the
middle of a run and resumed from its checkpoint; the parsers then read the real logs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.training_log import (IntervalSummary, MoELayerSummary, eval_block, iteration_line,
                                   moe_lines)
from tests.test_pretrain_gpt import tiny_data  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import router_study  # noqa: E402
import study_configs  # noqa: E402
import study_logs  # noqa: E402
import study_plots  # noqa: E402
import study_report  # noqa: E402
import study_runner  # noqa: E402

HAVE_MATPLOTLIB = study_plots._pyplot() is not None
PNGS = ["expert_load.png", "experts_per_token.png", "sweep.png", "val_loss.png"]


# ----------------------------------------------------------------------------------------------
# configurations


def test_default_configurations_keep_the_papers_ratios_at_any_hidden_size():
    names = [c.name for c in study_configs.select_configs(None, 768, 0.9)]
    assert names == ["dense", "topk2-16x1536", "topk8-64x384", "switch-8x3072",
                     "xmoe-64x384-t0.9", "d2s-64x384-t1.0"]
    small = {c.kind: c for c in study_configs.select_configs(None, 64, 0.7)}
    assert [c.name for c in small.values()] == ["dense", "topk2-16x128", "topk8-64x32",
                                                 "switch-8x256", "xmoe-64x32-t0.7",
                                                 "d2s-64x32-t1.0"]
    for c in small.values():     # top-8, XMoE and d2s experts: 1/8 of the dense FFN (256)
        assert c.expert_ffn * {"dense": 1, "topk2": 2, "topk8": 8, "switch": 1, "xmoe": 8,
                               "d2s": 8}[c.kind] == 256


def test_each_configuration_differs_only_in_its_moe_flags(tiny_data, tmp_path):
    args, extra = router_study.parse_args(study_args(tiny_data, tmp_path, "--train-iters", "4")
                                         + ["--", "--bf16"])
    s = router_study.build_settings(args, extra)
    configs = {c.kind: c for c in study_configs.select_configs(None, s.hidden_size, 0.9)}
    flags = {k: study_configs.training_flags(s, c, "CK", "TB") for k, c in configs.items()}
    common = flags["dense"][flags["dense"].index("--micro-batch-size"):]
    for f in flags.values():
        assert f[f.index("--micro-batch-size"):] == common
        assert f[-1] == "--bf16" and f[f.index("--save") + 1] == f[f.index("--load") + 1] == "CK"
    moe = {k: f[f.index("--num-experts"):f.index("--micro-batch-size")] for k, f in flags.items()}
    assert moe["dense"] == ["--num-experts", "1"]
    assert moe["topk2"][-3:] == ["--use-topk", "--topk", "2"]
    assert moe["switch"][-2:] == ["--topk", "1"] and "--use-topk" not in moe["switch"]
    assert moe["xmoe"][-3:] == ["--use-threshold", "--threshold", "0.9"]
    assert moe["d2s"][-4:] == ["--use-threshold", "--threshold", "1.0",
                               "--disable-moe-token-dropping"]
    assert moe["xmoe"][moe["xmoe"].index("--moe-train-capacity-factor") + 1] == "8.0"


def test_active_parameters_match_the_models_own_count():
    """With one expert used per MoE layer the study's count equals GPTModel's active count."""
    from megatron.config import GPTConfig, MoEConfig
    from megatron.model import GPTModel

    model = GPTModel(GPTConfig(num_layers=4, hidden_size=32, num_attention_heads=2,
                               padded_vocab_size=128, max_position_embeddings=16,
                               ffn_hidden_size=128, num_experts=(8,), expert_interval=2,
                               moe=MoEConfig(router="threshold", ffn_hidden_size=16)))
    counts = model.parameter_counts()
    assert study_configs.active_parameters(counts["total"], counts["expert"], 8, [1.0, 1.0]) \
        == model.num_parameters(active_only=True)
    assert study_configs.active_parameters(counts["total"], counts["expert"], 8, [8.0, 8.0]) \
        == counts["total"]


# ----------------------------------------------------------------------------------------------
# logs: text from megatron/training_log.py's formatters


def interval(its, loss, routing=()):
    layers = [MoELayerSummary(layer, {"wanted_per_token": w, "used_per_token": u,
                                      "dropped_fraction": d, "top1_p50": 0.4,
                                      "flops_vs_topk": u, "flops_vs_dense": u / 8},
                              np.full(64, 1 / 64)) for layer, w, u, d in routing]
    n = len(its)
    summary = IntervalSummary(list(its), [loss] * n, [0.01] * n, [1.0] * n, [1e-3] * n,
                              [1.0] * n, [False] * n, layers)
    line = iteration_line(summary, 20, its[-1] * 8, 0.05 * n, 8, 32, 0.1)
    return [line] + moe_lines(summary)


def synthetic_log(moe=True) -> str:
    routing = lambda w: [(2, w, w - 0.5, 0.1), (4, w + 1, w, 0.0)] if moe else []  # noqa: E731
    lines = ["== router_study: attempt 1 (from scratch): python pretrain_gpt.py ...",
             "number of parameters: 101,088 (experts 68,608); training for 20 iterations of 8 "
             "samples"]
    lines += interval(range(1, 6), 5.0, routing(6.0)) + interval(range(6, 11), 4.5, routing(5.0))
    lines += eval_block("validation", 10, 4.4).splitlines()
    lines += interval(range(11, 16), 4.2, routing(4.0))          # lost: the run was killed
    lines += ["== router_study: attempt 2 (resuming from iteration 10): python ...",
              "number of parameters: 101,088 (experts 68,608); training for 20 iterations of 8 "
              "samples"]
    lines += interval(range(11, 16), 4.1, routing(3.5)) + interval(range(16, 21), 4.0,
                                                                   routing(3.0))
    lines += eval_block("validation", 20, 3.9).splitlines()
    lines += eval_block("test", 20, 3.95).splitlines()
    return "\n".join(lines) + "\n"


def test_parser_reads_megatron_lines_and_a_resumed_run_replaces_repeated_iterations():
    log = study_logs.parse_training_log(synthetic_log(), "train.log", moe=True)
    assert (log.total_params, log.expert_params, log.total_iters) == (101088, 68608, 20)
    assert sorted(log.intervals) == [5, 10, 15, 20] and log.attempts == 2
    assert log.intervals[15].lm_loss == pytest.approx(4.1)       # the resumed attempt's line
    assert [i.first_of_attempt for _, i in sorted(log.intervals.items())] == [
        True, False, True, False]
    assert log.routing[15][2].wanted == pytest.approx(3.5)
    final = log.final_routing()
    assert final[2].used == pytest.approx(2.5) and final[2].dropped == pytest.approx(0.1)
    assert final[4].flops_vs_dense == pytest.approx(3.0 / 8, abs=0.01)
    assert log.validation[20][0] == pytest.approx(3.9)
    assert log.test[0] == 20 and log.test[2] == pytest.approx(math.exp(3.95), rel=1e-6)
    assert log.train_seconds() == pytest.approx(4 * 5 * 0.05, rel=1e-3)
    assert log.steady_tokens_per_second() == pytest.approx(8 * 32 / 0.05, rel=1e-3)
    assert study_logs.routing_curves(log)[4][-1] == (20, pytest.approx(4.0), pytest.approx(3.0))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("| lm loss:", "| lm-loss:"), "train.log:3: cannot read this line"),
    (lambda t: t.replace("experts/token wanted", "experts wanted"), "cannot read this line"),
    (lambda t: "\n".join(x for x in t.splitlines() if " test loss" not in x),
     "no ' test loss at iteration N"),
    (lambda t: "\n".join(x for x in t.splitlines() if "moe layer" not in x),
     "no '   moe layer L: experts/token"),
    (lambda t: t.replace("number of parameters", "parameters"), "no 'number of parameters"),
])
def test_parser_fails_loudly_on_a_changed_format(edit, message):
    with pytest.raises(study_logs.LogFormatError) as info:
        study_logs.parse_training_log(edit(synthetic_log()), "train.log", moe=True)
    assert message in str(info.value) and str(info.value).startswith("train.log")


def test_a_dense_log_needs_no_moe_lines():
    log = study_logs.parse_training_log(synthetic_log(moe=False), "d.log", moe=False)
    assert not log.routing and log.final_routing() == {}


# ----------------------------------------------------------------------------------------------
# sweep.json, records, results.md, plots


def fixture_sweep(router, thresholds, experts=64, layers=(2, 4)) -> dict:
    rows = []
    for k, t in enumerate(thresholds):
        used = 1.0 + k
        load = list(np.arange(1, experts + 1) / (experts * (experts + 1) / 2))
        row_layers = [{"layer": L, "experts": experts, "wanted_per_token": used,
                       "used_per_token": used, "dropped_fraction": 0.0,
                       "expert_flops_vs_all": used / experts, "expert_flops_vs_dense": used / 8,
                       "expert_load": load} for L in layers]
        rows.append({"threshold": t, "val_loss": 4.0 - 0.1 * k, "val_ppl": math.exp(4 - 0.1 * k),
                     "experts_per_token": used, "wanted_per_token": used,
                     "dropped_fraction": 0.0, "expert_flops_vs_all": used / experts,
                     "expert_flops_vs_dense": used / 8, "layers": row_layers})
    return {"checkpoint": "CK", "iteration": 20, "router": router, "trained_threshold": None,
            "eval_tokens": 512, "capacity_factor": None, "rows": rows}


def test_sweep_schema_is_checked_by_name():
    study_report.check_sweep(fixture_sweep("topk", [None]), "s.json")
    broken = fixture_sweep("threshold", [0.5, 1.0])
    del broken["rows"][1]["layers"][0]["expert_load"]
    with pytest.raises(ValueError, match=r"s\.json .*row 1, a layer has no 'expert_load'"):
        study_report.check_sweep(broken, "s.json")
    del broken["rows"]
    with pytest.raises(ValueError, match="no 'rows'"):
        study_report.check_sweep(broken, "s.json")


def records():
    """Records of a dense, a top-2 and a d2s configuration built from synthetic logs."""
    out = []
    for kind in ("dense", "topk2", "d2s"):
        config = study_configs.make_config(kind, 64, 0.9)
        log = study_logs.parse_training_log(synthetic_log(config.is_moe), "t.log",
                                            moe=config.is_moe)
        if kind == "dense":
            evaluation = {"source": "x", "val_loss": 4.1, "val_ppl": math.exp(4.1),
                          "experts_per_token": None, "dropped_fraction": None,
                          "expert_flops_vs_dense": 1.0}
            sweep = None
        else:
            sweep = fixture_sweep(config.router, [0.5, 1.0] if kind == "d2s" else [None],
                                  config.num_experts)
            evaluation = study_report.evaluation_from_row(
                study_report.as_trained_row(sweep, config), "tools/threshold_sweep.py")
        out.append(study_report.config_record(config, settings_for_report(), log, evaluation,
                                              sweep if kind == "d2s" else None,
                                              {"wall_seconds": 75.0}))
    return out


def settings_for_report() -> study_configs.StudySettings:
    values = {f: 1 for f in study_configs.StudySettings.__dataclass_fields__}
    values.update(data_path=("/d/c",), vocab_file="v", merge_file="m", split="97,2,1",
                  global_batch_size=8, seq_length=32, train_iters=20, lr=1e-3, min_lr=1e-5,
                  capacity_factor=8.0, eval_capacity_factor=8.0, threshold=0.9,
                  sweep_thresholds=(0.5, 1.0), extra_args=("--bf16",), expert_interval=2,
                  hidden_size=64)
    return study_configs.StudySettings(**values)


def test_results_table_sweep_table_and_plots(tmp_path, capsys):
    recs = records()
    d2s = recs[2]
    assert d2s["end_of_training"]["used_per_token"] == pytest.approx((2.5 + 3.0) / 2)
    p = d2s["parameters"]       # 68,608 expert parameters over 2 layers x 64 experts
    assert p["active"] == pytest.approx(101088 - 68608 + 68608 / 128 * 5.5)
    router_study.write_outputs(str(tmp_path), settings_for_report(), recs, ["switch-8x256"])
    md = (tmp_path / "results.md").read_text()
    assert "**Token budget: 5,120 tokens per configuration** (20 iterations x 8 samples x 32 " \
           "tokens)" in md
    assert "MoE in every 2nd layer" in md and "extra pretrain_gpt.py flags: --bf16" in md
    rows = [line for line in md.splitlines() if line.startswith("| d2s-64x32-t1.0 |")]
    assert rows[0].split(" | ")[1:8] == ["101.1K", "35.4K", "3.50", "2.75", "0.34",
                                         f"{math.exp(3.9):.2f}", f"{math.exp(3.95):.2f}"]
    assert "| 1.00 | 2.00 | 2.00 | 0.0% | 0.031 | 0.25 | 3.9000 |" in md
    assert "Not finished yet: switch-8x256" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget"]["tokens"] == 5120 and saved["pending"] == ["switch-8x256"]
    assert [c["name"] for c in saved["configs"]] == ["dense", "topk2-16x128", "d2s-64x32-t1.0"]
    if HAVE_MATPLOTLIB:
        assert sorted(p.name for p in tmp_path.glob("*.png")) == PNGS
        for name in PNGS:
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
            assert f"[{name}]({name})" in md
    assert not list(tmp_path.glob(".*"))          # no temporaries left


def test_tables_list_configurations_in_the_default_order_whichever_run_finished_them():
    finished = [{"name": k, "kind": k} for k in ("switch", "dense", "d2s", "topk2")]
    assert [r["kind"] for r in router_study.in_default_order(finished)] == \
        ["dense", "topk2", "switch", "d2s"]


def test_without_matplotlib_tables_are_written_and_the_install_named(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    router_study.write_outputs(str(tmp_path), settings_for_report(), records(), [])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install matplotlib" in out[0] and "results.md" in out[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


# ----------------------------------------------------------------------------------------------
# refusals: one line, exit code 2, nothing run


def study_args(data, out: Path, *more: str) -> list[str]:
    return ["--data-path", data["prefix"], "--vocab-file", data["vocab"], "--merge-file",
            data["merges"], "--split", "90,8,2", "--out-dir", str(out), "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--num-workers", "0",
            "--eval-iters", "2", "--lr", "3e-3", *more]


@pytest.mark.parametrize("more, message", [
    (["--configs", "dense", "moe8"], "--configs: unknown configuration 'moe8'; known at hidden "
     "size 32: dense, topk2-16x64, topk8-64x16, switch-8x128, xmoe-64x16-t0.9, d2s-64x16-t1.0"),
    (["--threshold", "1.5"], "--threshold: 1.5 is outside (0, 1]"),
    (["--sweep-thresholds", "0.5", "0"], "--sweep-thresholds: 0.0 is outside (0, 1]"),
    (["--train-tokens", "100"], "give the budget as --train-tokens or --train-iters"),
    (["--data-path", "/nonexistent/corpus"], "--data-path: /nonexistent/corpus.bin not found"),
    (["--vocab-file", "/nonexistent/v.json"], "--vocab-file: /nonexistent/v.json not found"),
    (["--", "--lr", "1"], "--lr after `--`: the study sets --lr itself"),
    (["--global-batch-size", "6"], "--global-batch-size 6 is not a positive multiple of "
     "--micro-batch-size 4"),
    (["--launcher", "deepspeed"], "give --world-size"),
    (["--hidden-size", "33"], "--hidden-size 33 must be even"),
])
def test_bad_input_is_refused_in_one_line_before_any_run(tiny_data, tmp_path, capsys, more,
                                                         message):
    argv = study_args(tiny_data, tmp_path / "out", "--train-iters", "4")
    if "--" in more:
        argv += more
    else:
        for flag in ("--data-path", "--vocab-file", "--hidden-size"):
            if flag in more:         # replace the default's value
                k = argv.index(flag)
                del argv[k:k + 2]
        argv += more
    code = router_study.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("router_study.py: error: ") and message in err[0], err[0]
    assert not (tmp_path / "out").exists()


def test_argparse_errors_are_one_line_too(tiny_data, tmp_path, capsys):
    code = router_study.main(study_args(tiny_data, tmp_path, "--train-iters", "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--train-iters: invalid int" in err[0]


def test_a_study_directory_with_other_settings_is_refused(tiny_data, tmp_path, capsys):
    argv = study_args(tiny_data, tmp_path, "--train-iters", "4")
    settings = router_study.build_settings(*router_study.parse_args(argv))
    router_study.check_study_file(str(tmp_path), settings)
    saved = json.loads((tmp_path / "study.json").read_text())["settings"]
    assert saved["train_iters"] == 4 and saved["lr"] == 3e-3
    router_study.check_study_file(str(tmp_path), settings)        # the same: accepted
    argv[argv.index("--lr") + 1] = "1e-3"
    assert router_study.main(argv + ["--dry-run"]) == 0            # checks only, no directory
    capsys.readouterr()
    assert router_study.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"router_study.py: error: --out-dir {tmp_path} holds a study with --lr "
                   f"0.003 (this run: 0.001): use another --out-dir, or move {tmp_path} away "
                   "to start over"]
    assert not (tmp_path / "runs").exists()


def test_one_study_per_directory_at_a_time(tiny_data, tmp_path, capsys):
    with study_runner.StudyLock(str(tmp_path)):
        code = router_study.main(study_args(tiny_data, tmp_path, "--train-iters", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"(PID {os.getpid()})" in err[0], err


def test_dry_run_prints_every_command_and_runs_nothing(tiny_data, tmp_path, capsys):
    argv = study_args(tiny_data, tmp_path / "out", "--train-tokens", "2560", "--launcher",
                      "torchrun --standalone --nproc_per_node 2", "--configs", "xmoe", "d2s",
                      "--dry-run")
    assert router_study.main(argv) == 0
    out = capsys.readouterr()
    commands = out.out.strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("torchrun --standalone --nproc_per_node 2 ")
                                      for c in commands)
    assert "--train-iters 10 " in commands[0] and "--lr-warmup-iters 1 " in commands[0]
    assert "/runs/d2s-64x16-t1.0/checkpoint" in commands[1]
    assert "checked for 2 process(es)" in out.err and not (tmp_path / "out").exists()


def test_launch_script_dry_run_checks_every_configuration(tiny_data, tmp_path):
    """examples_deepspeed/MoE/ds_study_small.sh: its variables become the driver's flags,
    PRECISION / COMPILE / EXTRA_ARGS the flags of every run, NUM_GPUS > 1 the launcher."""
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, DATA_PATH=tiny_data["prefix"],
               VOCAB_PATH=tiny_data["vocab"], MERGE_PATH=tiny_data["merges"], NUM_LAYERS="2",
               HIDDEN_SIZE="32", NUM_ATTN_HEADS="2", SEQ_LEN="32", GLOBAL_BATCH_SIZE="8",
               MICRO_BATCH_SIZE="4", TRAIN_TOKENS="5000", NUM_GPUS="2", CONFIGS="dense d2s",
               EXTRA_ARGS="--hidden-dropout 0.0", SPLIT="90,8,2",
               OUTPUT_DIR=str(tmp_path / "out"))

    script = REPO / "examples_deepspeed" / "MoE" / "ds_study_small.sh"

    def study(**settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script)], env=dict(env, **settings),
                              capture_output=True, text=True, timeout=120)

    r = study()
    assert r.returncode == 0, r.stderr
    commands = r.stdout.strip().splitlines()
    assert len(commands) == 2 and "2 configuration(s) checked for 2 process(es)" in r.stderr
    for c in commands:
        assert c.startswith("deepspeed --num_gpus 2 --master_port 29500 ")
        assert c.endswith("--bf16 --moe-compile-routing --moe-sync-free-dispatch "
                          "--hidden-dropout 0.0")
        assert "--train-iters 20 " in c and "--lr 0.00045 " in c and "--split 90,8,2 " in c
    assert "--num-experts 1 " in commands[0] and "--disable-moe-token-dropping" in commands[1]
    assert not (tmp_path / "out").exists()
    bad = study(THRESHOLD="0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "router_study.py: error: --threshold: 0.0 is outside (0, 1]"]
    exact = study(DISPATCH="exact")
    assert exact.returncode == 0, exact.stderr
    exact_commands = exact.stdout.strip().splitlines()
    assert len(exact_commands) == 2 and all(
        c.endswith("--bf16 --moe-compile-routing --hidden-dropout 0.0") for c in exact_commands)
    for setting, message in ((dict(DISPATCH="exact", COMPILE="model"),
                              "DISPATCH=exact cannot be combined with COMPILE=model"),
                             (dict(DISPATCH="fast"), "DISPATCH must be sync-free or exact")):
        r = study(**setting)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_failed_run_ends_the_study_with_its_error_and_log(tiny_data, tmp_path, capsys):
    """A command that passes the checks but fails when run (nccl without CUDA): exit code 1, the
    run's own error line and its log, last."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    argv = study_args(tiny_data, tmp_path, "--train-iters", "4", "--configs", "dense", "--",
                      "--distributed-backend", "nccl")
    assert router_study.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "runs" / "dense" / "train.log"
    assert err[-1] == ("router_study.py: error: dense: pretrain_gpt.py exited with code 2: "
                       "pretrain_gpt.py: error: --distributed-backend nccl needs CUDA; use gloo "
                       f"on CPU (log: {log})")
    assert not (tmp_path / "runs" / "dense" / "result.json").exists()


def test_keep_last_checkpoint_and_pointer_repair(tmp_path):
    import torch

    for it in (10, 20, 30):
        tag = tmp_path / f"iter_{it:07d}"
        tag.mkdir()
        torch.save({}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("20\n")
    note = study_runner.repair_pointer(str(tmp_path))      # iter 30 complete, pointer behind
    assert "iter_0000030 is complete but the pointer named iteration 20" in note
    assert study_runner.read_pointer(str(tmp_path)) == 30
    assert study_runner.repair_pointer(str(tmp_path)) is None
    keep = study_runner.KeepLastCheckpoint(str(tmp_path))
    keep(f"saved checkpoint at iteration      20 to {tmp_path}")   # not the pointer's: kept
    assert len(list(tmp_path.glob("iter_*"))) == 3
    keep(f"saved checkpoint at iteration      30 to {tmp_path}")
    assert [p.name for p in tmp_path.glob("iter_*")] == ["iter_0000030"]


# ----------------------------------------------------------------------------------------------
# end to end (slow): pretrain_gpt.py and tools/threshold_sweep.py for real


def run_study(argv, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / "router_study.py"), *argv,
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)


def need_sweep_tool():
    if not os.path.isfile(router_study.SWEEP_TOOL):
        pytest.skip("tools/threshold_sweep.py does not exist yet")


@pytest.mark.slow
def test_tiny_study_stopped_between_configurations_then_completed(tiny_data, tmp_path):
    """dense + d2s (swept at 0.5 and 1.0): stopped after dense, rerun: dense is skipped, d2s
    trained and swept; tables and PNGs; the records agree with the real logs."""
    need_sweep_tool()
    out = tmp_path / "study"
    argv = study_args(tiny_data, out, "--train-iters", "12", "--configs", "dense", "d2s",
                      "--sweep-thresholds", "0.5", "--log-interval", "3", "--eval-interval", "6")
    first = run_study(argv + ["--stop-after", "1"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stopped after 1 configuration(s)" in first.stdout
    assert (out / "runs" / "dense" / "result.json").is_file()
    assert not (out / "runs" / "d2s-64x16-t1.0").exists()
    assert "Not finished yet: d2s-64x16-t1.0" in (out / "results.md").read_text()

    second = run_study(argv)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "== dense: finished earlier" in second.stdout
    dense_log = (out / "runs" / "dense" / "train.log").read_text()
    assert dense_log.count(study_logs.ATTEMPT_MARK) == 1          # not trained again
    results = json.loads((out / "results.json").read_text())
    assert results["pending"] == [] and results["budget"]["tokens"] == 12 * 8 * 32
    dense, d2s = results["configs"]
    # the parser on the real log, against the record and the log's own numbers
    log = study_logs.parse_training_log((out / "runs" / "d2s-64x16-t1.0" / "train.log")
                                        .read_text(), "train.log", moe=True)
    assert sorted(log.intervals) == [3, 6, 9, 12] and sorted(log.validation) == [6, 12]
    assert d2s["test"]["ppl"] == pytest.approx(math.exp(d2s["test"]["loss"]), rel=1e-5)
    assert d2s["end_of_training"]["used_per_token"] == pytest.approx(64.0, abs=0.01)
    assert d2s["parameters"]["active"] == pytest.approx(d2s["parameters"]["total"], rel=1e-3)
    assert dense["parameters"]["expert"] == 0 and dense["evaluation"]["val_ppl"] > 1
    rows = d2s["sweep"]["rows"]
    assert [r["threshold"] for r in rows] == [0.5, 1.0] and d2s["sweep"]["capacity_factor"] is None
    assert rows[0]["experts_per_token"] < rows[1]["experts_per_token"]
    assert rows[1]["experts_per_token"] == pytest.approx(64.0, abs=0.01)
    md = (out / "results.md").read_text()
    assert "| dense |" in md and "| d2s-64x16-t1.0 |" in md and "| 0.50 |" in md
    assert "Not finished yet" not in md
    if HAVE_MATPLOTLIB:
        assert sorted(p.name for p in out.glob("*.png")) == PNGS
    assert (out / "runs" / "dense" / "eval.log").is_file()
    assert [p.name for p in (out / "runs" / "dense" / "checkpoint").glob("iter_*")] == [
        "iter_0000012"]
    # a later run of some configurations keeps the others' rows
    third = run_study(argv[:argv.index("--configs")] + argv[argv.index("--configs") + 3:]
                      + ["--configs", "dense"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "| d2s-64x16-t1.0 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_study_killed_mid_run_resumes_from_the_checkpoint(tiny_data, tmp_path):
    need_sweep_tool()
    out = tmp_path / "study"
    argv = study_args(tiny_data, out, "--train-iters", "30", "--configs", "xmoe",
                      "--save-interval", "10", "--log-interval", "5")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "router_study.py"), *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("saved checkpoint at iteration      10"):
            proc.send_signal(signal.SIGTERM)
            break
    tail = proc.stdout.read()
    assert proc.wait(timeout=60) == 143
    assert "router_study.py: stopped (SIGTERM): rerun the same command to resume" in tail
    run = out / "runs" / "xmoe-64x16-t0.9"
    assert not (run / "result.json").exists()
    assert study_runner.read_pointer(str(run / "checkpoint")) == 10

    again = run_study(argv)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "training 30 iterations (resuming from iteration 10)" in again.stdout
    text = (run / "train.log").read_text()
    assert f"{study_logs.ATTEMPT_MARK} 2 (resuming from iteration 10)" in text
    assert "loaded checkpoint from" in text
    record = json.loads((run / "result.json").read_text())
    assert [v["iteration"] for v in record["validation"]] == [3, 6, 9, 12, 15, 18, 21, 24, 27,
                                                              30]
    assert record["evaluation"]["source"] == "tools/threshold_sweep.py"
    assert len(record["evaluation"]["expert_load"]) == 1         # one MoE layer
    assert [p.name for p in (run / "checkpoint").glob("iter_*")] == ["iter_0000030"]
