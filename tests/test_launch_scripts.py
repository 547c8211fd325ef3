"""examples_deepspeed/MoE launch scripts: with DRY_RUN=1 each prints a command line that the real
`deepspeed` / `torchrun` argument parsers accept, whose pretrain_gpt.py arguments pass
megatron.arguments' validation (cross-checking the sed-filled DeepSpeed JSON) and build the
configuration the script documents. A bad setting stops before launching with one line (the
check runs here, without torch); RUN_NAME holds the model's shape; a failed launch (fake
launchers, and one real torchrun run) ends with the run's own error line, not the launcher's
traceback."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron.arguments import RunConfig, build_configs, parse_args, validate_args
from tests.tokenizer.gpt2_reference import write_gpt2_files

REPO = Path(__file__).resolve().parents[1]
MOE_DIR = REPO / "examples_deepspeed" / "MoE"
SCRIPTS = ("ds_pretrain_gpt_xmoe_small.sh", "ds_pretrain_gpt_topk_small.sh",
           "ds_pretrain_gpt_125M_dense.sh")
PADDED_VOCAB = 50304
PYTHON_BIN = str(Path(sys.executable).parent)      # python, torchrun, deepspeed of this env

@pytest.fixture
def paths(tmp_path: Path) -> dict:
    """Files validate_args checks for: a dataset pair (empty), a GPT-2-format vocabulary (the
    256 byte symbols and <|endoftext|>) and merges; and an output dir."""
    data = tmp_path / "data" / "corpus_text_document"
    data.parent.mkdir()
    for ext in (".bin", ".idx"):
        Path(str(data) + ext).write_bytes(b"")
    vocab, merges = write_gpt2_files([], tmp_path / "data")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    return {"DATA_PATH": str(data), "VOCAB_PATH": str(vocab), "MERGE_PATH": str(merges),
            "OUTPUT_DIR": str(tmp_path / "out"), "hostfile": str(hostfile)}


def dry_run(script: str, paths: dict, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "DRY_RUN": "1", "NUM_GPUS": "4",
                "NUM_NODES": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                **{k: v for k, v in paths.items() if k.isupper()}, **env}
    return subprocess.run(["bash", str(MOE_DIR / script)], env=full_env, capture_output=True,
                          text=True, timeout=60)


def launch(script: str, paths: dict, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """A real run (no DRY_RUN) with `bin_dir` first on PATH; stderr merged into stdout, so the
    last line of stdout is the last line a user sees."""
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/tmp", "NUM_GPUS": "4",
                "NUM_NODES": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                **{k: v for k, v in paths.items() if k.isupper()}, **env}
    return subprocess.run(["bash", str(MOE_DIR / script)], env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)


def fake_launcher(tmp_path: Path, name: str, body: str) -> Path:
    """A directory holding an executable `name` that runs the bash `body` (and records its
    arguments in calls.txt next to it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f'#!/bin/bash\necho "$@" >> "{bin_dir}/calls.txt"\n{body}\n')
    path.chmod(0o755)
    return bin_dir


def the_log(paths: dict) -> Path:
    logs = list((Path(paths["OUTPUT_DIR"]) / "log").iterdir())
    assert len(logs) == 1, logs
    return logs[0]


def split_command(stdout: str) -> tuple[list[str], list[str]]:
    """(launcher argv before pretrain_gpt.py, pretrain_gpt.py's own arguments)."""
    argv = shlex.split(stdout)
    scripts = [i for i, a in enumerate(argv) if a.endswith("pretrain_gpt.py")]
    assert len(scripts) == 1, stdout
    assert argv[scripts[0]] == str(REPO / "pretrain_gpt.py")
    return argv[:scripts[0] + 1], argv[scripts[0] + 1:]


def build(gpt_argv: list[str], world_size: int) -> RunConfig:
    args = parse_args(gpt_argv)
    validated = validate_args(args, world_size)
    return build_configs(validated, PADDED_VOCAB)


def deepspeed_json(gpt_argv: list[str]) -> dict:
    path = gpt_argv[gpt_argv.index("--deepspeed_config") + 1]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    r = subprocess.run(["bash", "-n", str(MOE_DIR / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_common_file_syntax_and_template_placeholders():
    for sourced in ("gpt_launch_common.sh", "speed_options.sh"):
        assert subprocess.run(["bash", "-n", str(MOE_DIR / sourced)]).returncode == 0, sourced
    template = (MOE_DIR / "ds_config_gpt_TEMPLATE.json").read_text()
    for key in ("optimizer", "scheduler", "curriculum_learning"):
        assert f'"{key}"' not in template


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("gpus, nodes", [(4, 1), (2, 2)])
def test_dry_run_deepspeed_command_validates(script, paths, gpus, nodes):
    env = {"NUM_GPUS": str(gpus), "NUM_NODES": str(nodes)}
    if nodes > 1:
        env["HOSTFILE"] = paths["hostfile"]
    r = dry_run(script, paths, **env)
    assert r.returncode == 0, r.stderr
    launcher, gpt_argv = split_command(r.stdout)

    from deepspeed.launcher.runner import parse_args as deepspeed_parse_args
    ds = deepspeed_parse_args(launcher[1:] + gpt_argv)
    assert launcher[0] == "deepspeed"
    assert (ds.num_gpus, ds.num_nodes) == (gpus, nodes) and ds.user_args == gpt_argv
    if nodes > 1:
        assert ds.hostfile == paths["hostfile"]
    else:
        assert "--hostfile" not in launcher     # one node: local GPUs, no hostfile needed

    run = build(gpt_argv, world_size=gpus * nodes)
    t = run.training
    assert t.data_parallel_size == gpus * nodes and t.deepspeed and t.bf16 and not t.fp16
    assert t.gradient_accumulation_steps == 256 // (16 * gpus * nodes)

    config = deepspeed_json(gpt_argv)
    assert config["train_batch_size"] == t.global_batch_size == 256
    assert config["train_micro_batch_size_per_gpu"] == t.micro_batch_size == 16
    assert config["gradient_clipping"] == run.optimizer.clip_grad == 1.0
    assert config["zero_optimization"] == {"stage": 0} and config["prescale_gradients"] is True
    assert config["bf16"] == {"enabled": True} and config["fp16"]["enabled"] is False
    assert config["steps_per_print"] >= 2 ** 31 - 1
    assert not {"optimizer", "scheduler", "curriculum_learning"} & config.keys()


def test_dry_run_torchrun_single_and_multi_node(paths):
    from torch.distributed.run import get_args_parser

    r = dry_run(SCRIPTS[0], paths, LAUNCHER="torchrun", NUM_GPUS="8")
    assert r.returncode == 0, r.stderr
    launcher, gpt_argv = split_command(r.stdout)
    tr = get_args_parser().parse_args(launcher[1:] + gpt_argv)
    assert launcher[0] == "torchrun" and tr.standalone
    assert (tr.nnodes, tr.nproc_per_node, tr.training_script_args) == ("1", "8", gpt_argv)
    build(gpt_argv, world_size=8)

    r = dry_run(SCRIPTS[0], paths, LAUNCHER="torchrun", NUM_GPUS="4", NUM_NODES="2",
                NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="6001")
    assert r.returncode == 0, r.stderr
    launcher, gpt_argv = split_command(r.stdout)
    tr = get_args_parser().parse_args(launcher[1:] + gpt_argv)
    assert not tr.standalone and (tr.nnodes, tr.nproc_per_node, tr.node_rank) == ("2", "4", 1)
    assert (tr.master_addr, tr.master_port) == ("10.0.0.1", 6001)
    build(gpt_argv, world_size=8)


def test_xmoe_small_configuration(paths):
    _, gpt_argv = split_command(dry_run(SCRIPTS[0], paths).stdout)
    run = build(gpt_argv, world_size=4)
    m, moe, o, t = run.model, run.model.moe, run.optimizer, run.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == \
        (12, 768, 12, 3072)
    assert (m.max_position_embeddings, t.seq_length, m.params_dtype) == (1024, 1024, "bf16")
    assert m.num_experts == (64,) and m.expert_interval == 2 and m.init_method_std == 0.014
    assert [m.experts_for_layer(L) for L in range(1, 13)] == [1, 64] * 6
    assert moe.router == "threshold" and moe.threshold == 0.9 and moe.ffn_hidden_size == 384
    assert (moe.train_capacity_factor, moe.eval_capacity_factor, moe.min_capacity) == (8, 8, 4)
    assert moe.aux_loss_coeff == 0.01 and moe.drop_tokens
    assert "--moe-expert-parallel-size" in gpt_argv
    assert gpt_argv[gpt_argv.index("--moe-expert-parallel-size") + 1] == "1"
    assert o.create_moe_param_group and (o.lr, o.min_lr, o.lr_decay_style) == \
        (4.5e-4, 4.5e-6, "cosine")
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay) == (0.9, 0.95, 0.1)
    tokens = 60000 * 256 * 1024          # the XMoE fork's 60,000 iterations of 256 x 1024
    assert (t.train_tokens, t.train_iters) == (tokens, 60000)
    assert (o.lr_decay_tokens, o.lr_warmup_tokens) == (tokens, tokens // 10)
    assert (t.eval_interval, t.eval_iters, t.test_iters) == (100, 10, 100)
    assert run.data.split == "97,2,1" and run.logging.log_interval == 10
    assert run.checkpoint.save == run.checkpoint.load and run.checkpoint.save_interval == 1000
    assert run.checkpoint.save.startswith(paths["OUTPUT_DIR"])
    assert run.logging.tensorboard_dir.startswith(paths["OUTPUT_DIR"])
    assert not m.checkpoint_activations


def test_topk_small_differs_from_xmoe_small_only_in_router(paths):
    xmoe = build(split_command(dry_run(SCRIPTS[0], paths).stdout)[1], world_size=4)
    topk = build(split_command(dry_run(SCRIPTS[1], paths).stdout)[1], world_size=4)
    assert topk.model.moe.router == "topk" and topk.model.moe.topk == 8
    assert topk.model.moe.ffn_hidden_size * topk.model.moe.topk == topk.model.ffn_hidden_size
    same_router = replace(topk.model.moe, router="threshold", topk=xmoe.model.moe.topk)
    assert same_router == xmoe.model.moe
    assert topk.optimizer == xmoe.optimizer and topk.data == xmoe.data
    assert replace(topk.training, deepspeed_config=None) == \
        replace(xmoe.training, deepspeed_config=None)
    assert deepspeed_json(split_command(dry_run(SCRIPTS[1], paths).stdout)[1]) == \
        deepspeed_json(split_command(dry_run(SCRIPTS[0], paths).stdout)[1])
    assert topk.checkpoint.save != xmoe.checkpoint.save      # runs do not share checkpoints


def test_dense_baseline_has_no_moe_layer(paths):
    run = build(split_command(dry_run(SCRIPTS[2], paths).stdout)[1], world_size=4)
    m = run.model
    assert m.num_experts == (1,) and m.ffn_hidden_size == 3072
    assert all(m.experts_for_layer(L) == 1 for L in range(1, 13))
    assert (run.optimizer.lr, run.optimizer.min_lr) == (6.0e-4, 6.0e-5)
    assert not run.optimizer.create_moe_param_group


@pytest.mark.parametrize("script", SCRIPTS)
def test_fp16_zero2_and_activation_checkpointing(script, paths):
    r = dry_run(script, paths, PRECISION="fp16", ZERO_STAGE="2", ACTIVATION_CHECKPOINT="true")
    assert r.returncode == 0, r.stderr
    _, gpt_argv = split_command(r.stdout)
    run = build(gpt_argv, world_size=4)
    t = run.training
    assert t.fp16 and not t.bf16 and t.zero_stage == 2 and run.model.checkpoint_activations
    config = deepspeed_json(gpt_argv)
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "loss_scale_window": 500,
                              "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 11}
    assert config["bf16"] == {"enabled": False} and config["prescale_gradients"] is False
    # The flags carry the same loss scaling as the JSON.
    assert (t.initial_loss_scale, t.loss_scale_window, t.hysteresis, t.min_loss_scale) == \
        (2.0 ** 11, 500, 2, 1.0)


def test_fp32_and_a_blended_data_path(paths, tmp_path):
    second = tmp_path / "data" / "other_text_document"
    for ext in (".bin", ".idx"):
        Path(str(second) + ext).write_bytes(b"")
    blend = f"0.7 {paths['DATA_PATH']} 0.3 {second}"
    r = dry_run(SCRIPTS[0], paths, PRECISION="fp32", DATA_PATH=blend)
    assert r.returncode == 0, r.stderr
    run = build(split_command(r.stdout)[1], world_size=4)
    assert run.model.params_dtype == "fp32"
    assert run.data.prefixes == (paths["DATA_PATH"], str(second))
    assert run.data.weights == pytest.approx((0.7, 0.3))


def test_dry_run_writes_only_the_json(paths):
    r = dry_run(SCRIPTS[0], paths)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in Path(paths["OUTPUT_DIR"]).iterdir())
    assert len(written) == 1 and written[0].startswith("ds_config_gpt-xmoe-small")


@pytest.mark.parametrize("env, message", [
    ({"LAUNCHER": "mpirun"}, "LAUNCHER must be deepspeed or torchrun"),
    ({"PRECISION": "fp8"}, "PRECISION must be bf16, fp16 or fp32"),
    ({"NUM_NODES": "2"}, "needs HOSTFILE"),
    ({"COMPILE": "yes"}, "COMPILE must be routing, routing-graphs, model or none"),
    ({"DISPATCH": "fast"}, "DISPATCH must be sync-free or exact"),
    ({"DISPATCH": "exact", "COMPILE": "model"},
     "DISPATCH=exact cannot be combined with COMPILE=model"),
])
def test_bad_settings_stop_before_launching(paths, env, message):
    r = dry_run(SCRIPTS[0], paths, **env)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_expert_parallel_size_from_the_environment(paths):
    """EP_PARALLEL_SIZE reaches --moe-expert-parallel-size; validation checks it against the
    world size the launcher will create."""
    r = dry_run(SCRIPTS[0], paths, EP_PARALLEL_SIZE="4", NUM_GPUS="4")
    _, gpt_argv = split_command(r.stdout)
    assert gpt_argv[gpt_argv.index("--moe-expert-parallel-size") + 1] == "4"
    assert build(gpt_argv, world_size=4).model.moe.expert_parallel_size == 4
    with pytest.raises(ValueError, match="must divide the world size"):
        build(gpt_argv, world_size=2)


@pytest.mark.parametrize("compile_env, flags", [
    (None, ["--moe-compile-routing"]), ("routing", ["--moe-compile-routing"]),
    ("routing-graphs", ["--moe-routing-cuda-graphs"]), ("model", ["--compile"]),
    ("none", [])])
def test_compile_setting(paths, compile_env, flags):
    env = {} if compile_env is None else {"COMPILE": compile_env}
    _, gpt_argv = split_command(dry_run(SCRIPTS[0], paths, **env).stdout)
    got = [f for f in gpt_argv
           if f in ("--moe-compile-routing", "--moe-routing-cuda-graphs", "--compile")]
    assert got == flags
    run = build(gpt_argv, world_size=4)
    assert run.model.moe.compile_routing == (flags[:1] in (["--moe-compile-routing"],
                                                            ["--moe-routing-cuda-graphs"]))
    assert run.model.moe.routing_cuda_graphs == (flags == ["--moe-routing-cuda-graphs"])
    assert (run.training.compile is not None) == (flags == ["--compile"])


@pytest.mark.parametrize("script, env, sync_free", [
    (SCRIPTS[0], {}, True), (SCRIPTS[1], {}, True), (SCRIPTS[0], {"DISPATCH": "exact"}, False),
    (SCRIPTS[0], {"EP_PARALLEL_SIZE": "4", "NUM_GPUS": "4"}, False),
    (SCRIPTS[0], {"DISPATCH": "exact", "COMPILE": "routing-graphs"}, False),
    (SCRIPTS[2], {}, False)])
def test_dispatch_setting(paths, script, env, sync_free):
    """DISPATCH: sync-free by default for MoE scripts on one expert-parallel rank, exact with
    EP_PARALLEL_SIZE > 1 (the exchange needs host sizes) or when asked; the dense script has no
    MoE layer to dispatch into."""
    r = dry_run(script, paths, **env)
    assert r.returncode == 0, r.stderr
    gpt_argv = split_command(r.stdout)[1]
    assert ("--moe-sync-free-dispatch" in gpt_argv) == sync_free
    assert build(gpt_argv, world_size=4).model.moe.sync_free == sync_free


def test_sync_free_dispatch_with_expert_parallelism_stops_with_one_line(paths):
    r = dry_run(SCRIPTS[0], paths, DISPATCH="sync-free", EP_PARALLEL_SIZE="4", NUM_GPUS="4")
    assert r.returncode == 2 and r.stdout == ""
    assert "--moe-sync-free-dispatch cannot be combined with --moe-expert-parallel-size 4" in \
        r.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------
# RUN_NAME: the model's shape, so a changed shape never resumes another shape's checkpoint

SHAPE_SETTINGS = {"NUM_LAYERS": "24", "HIDDEN_SIZE": "384", "NUM_ATTN_HEADS": "6",
                  "FFN_HIDDEN_SIZE": "1536", "SEQ_LEN": "2048"}
MOE_SHAPE_SETTINGS = {"NUM_EXPERTS": "32", "MOE_FFN_HIDDEN_SIZE": "768", "EXPERT_INTERVAL": "3"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_name_holds_the_model_shape(script, paths):
    def checkpoint(**env: str) -> str:
        r = dry_run(script, paths, **env)
        assert r.returncode == 0, r.stderr
        gpt_argv = split_command(r.stdout)[1]
        return gpt_argv[gpt_argv.index("--save") + 1]

    default = checkpoint()
    assert all(f"-{part}-" in default for part in ("l12", "h768", "a12", "ffn3072", "s1024"))
    settings = SHAPE_SETTINGS | ({} if script == SCRIPTS[2] else MOE_SHAPE_SETTINGS)
    names = {default} | {checkpoint(**{key: value}) for key, value in settings.items()}
    assert len(names) == len(settings) + 1, names


# ----------------------------------------------------------------------------------------------
# a failed launch ends with the run's own error line, not the launcher's traceback

LAUNCHER_TRACEBACK = """echo 'Traceback (most recent call last):' >&2
echo '  File "/usr/bin/torchrun", line 8, in <module>' >&2
echo 'torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ' >&2
echo '============================================================' >&2
echo 'pretrain_gpt.py FAILED' >&2"""


def test_failed_launch_ends_with_the_first_error_line(paths, tmp_path):
    bin_dir = fake_launcher(tmp_path, "deepspeed", f"""
echo "[launcher] starting 4 processes"
echo "pretrain_gpt.py: error: --data-path: /x/corpus.bin not found" >&2
echo "worker-1: pretrain_gpt.py: error (rank 1): a later one" >&2
{LAUNCHER_TRACEBACK}
exit 3""")
    r = launch(SCRIPTS[0], paths, bin_dir)
    assert r.returncode == 3
    log = the_log(paths)
    assert r.stdout.splitlines()[-1] == \
        f"pretrain_gpt.py: error: --data-path: /x/corpus.bin not found (log: {log})"
    text = log.read_text()
    assert "ChildFailedError" in text and "[launcher] starting" in text
    launcher, gpt_argv = split_command(text.splitlines()[0])      # the command comes first
    assert launcher[0] == "deepspeed" and "--deepspeed_config" in gpt_argv
    assert (bin_dir / "calls.txt").read_text().split() == launcher[1:] + gpt_argv


def test_failed_launch_without_our_error_line_names_the_first_exception(paths, tmp_path):
    bin_dir = fake_launcher(tmp_path, "torchrun", f"""
echo "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" >&2
{LAUNCHER_TRACEBACK}
exit 1""")
    r = launch(SCRIPTS[0], paths, bin_dir, LAUNCHER="torchrun")
    assert r.returncode == 1
    last = r.stdout.splitlines()[-1]
    assert "torchrun exited with code 1" in last and str(the_log(paths)) in last
    assert "torch.OutOfMemoryError: CUDA out of memory" in last


def test_successful_launch_logs_and_exits_0(paths, tmp_path):
    bin_dir = fake_launcher(tmp_path, "deepspeed", 'echo " iteration        1/   60000 |"')
    r = launch(SCRIPTS[2], paths, bin_dir)
    assert r.returncode == 0, r.stdout
    assert "iteration        1/" in the_log(paths).read_text()
    assert "error" not in r.stdout


def test_missing_launcher_is_one_line(paths, tmp_path):
    r = launch(SCRIPTS[0], paths, tmp_path)           # no deepspeed on this PATH
    assert r.returncode == 127
    assert r.stdout.strip().splitlines() == [r.stdout.strip()] and "deepspeed" in r.stdout
    assert not (Path(paths["OUTPUT_DIR"]) / "log").exists()


@pytest.mark.slow
def test_failed_torchrun_run_ends_with_its_error_line(paths):
    """A real run that fails inside pretrain_gpt.py (the data files exist, so the check before
    launching passes, but they are empty): torchrun's ChildFailedError traceback comes after
    pretrain_gpt.py's line, which the script repeats last."""
    tiny = {"LAUNCHER": "torchrun", "NUM_GPUS": "1", "NUM_LAYERS": "2", "HIDDEN_SIZE": "64",
            "NUM_ATTN_HEADS": "4", "FFN_HIDDEN_SIZE": "128", "SEQ_LEN": "32", "NUM_EXPERTS": "4",
            "MOE_FFN_HIDDEN_SIZE": "32", "GLOBAL_BATCH_SIZE": "4", "MICRO_BATCH_SIZE": "4",
            "NUM_WORKERS": "0", "COMPILE": "none", "PRECISION": "fp32"}
    r = launch(SCRIPTS[0], paths, Path(PYTHON_BIN), **tiny)
    assert r.returncode == 1, r.stdout[-3000:]
    log = the_log(paths)
    assert "ChildFailedError" in log.read_text()
    assert r.stdout.splitlines()[-1] == (f"pretrain_gpt.py: error: {paths['DATA_PATH']}.idx: "
                                         f"truncated header (0 of 34 bytes) (log: {log})")


# ----------------------------------------------------------------------------------------------
# DRY_RUN=1 checks what it can here, without torch or a GPU, and says what it did not check

def test_dry_run_says_what_it_checked_and_what_not(paths):
    r = dry_run(SCRIPTS[0], paths, NUM_GPUS="8", EP_PARALLEL_SIZE="2")
    assert r.returncode == 0, r.stderr
    report = r.stderr
    assert "8 processes" in report and "--global-batch-size 256" in report
    assert "--moe-expert-parallel-size 2" in report and paths["DATA_PATH"] in report
    assert paths["VOCAB_PATH"] in report
    not_checked = [line for line in report.splitlines() if "not checked" in line]
    assert len(not_checked) == 1 and "GPU" in not_checked[0] and "NCCL" in not_checked[0]
    split_command(r.stdout)                           # stdout is still the command alone


@pytest.mark.parametrize("env, message", [
    ({"GLOBAL_BATCH_SIZE": "96"}, "--global-batch-size 96 is not a positive multiple of "
                                  "--micro-batch-size 16 x data-parallel size 4 (= 64)"),
    ({"NUM_GPUS": "3"}, "--global-batch-size 256 is not a positive multiple of "
                        "--micro-batch-size 16 x data-parallel size 3"),
    ({"EP_PARALLEL_SIZE": "3", "NUM_GPUS": "3", "GLOBAL_BATCH_SIZE": "48"},
     "--moe-expert-parallel-size 3 must divide --num-experts 64"),
    ({"EP_PARALLEL_SIZE": "8"}, "--moe-expert-parallel-size 8 must divide the world size "
                                "(4 processes)"),
    ({"DATA_PATH": "/nonexistent/corpus"}, "--data-path: /nonexistent/corpus.bin not found"),
    ({"VOCAB_PATH": "/nonexistent/vocab.json"}, "--vocab-file: /nonexistent/vocab.json not found"),
    ({"HIDDEN_SIZE": "770"}, "--hidden-size 770 is not divisible by"),
    ({"MICRO_BATCH_SIZE": "sixteen"}, "argument --micro-batch-size: invalid int value: "
                                      "'sixteen'"),
    ({"NUM_NODES": "2", "HOSTFILE": "/nonexistent/hostfile"},
     "HOSTFILE /nonexistent/hostfile not found"),
    ({"NUM_NODES": "3", "NUM_GPUS": "2", "GLOBAL_BATCH_SIZE": "96", "HOSTFILE": "hostfile"},
     "NUM_NODES=3 but HOSTFILE"),
    ({"NUM_NODES": "2", "NUM_GPUS": "8", "HOSTFILE": "hostfile"}, "slots=4"),
])
def test_dry_run_bad_config_is_one_line(paths, env, message):
    env = {k: paths["hostfile"] if v == "hostfile" else v for k, v in env.items()}
    r = dry_run(SCRIPTS[0], paths, **env)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_bad_config_stops_a_real_run_before_launching(paths, tmp_path):
    bin_dir = fake_launcher(tmp_path, "deepspeed", "exit 0")
    r = launch(SCRIPTS[0], paths, bin_dir, GLOBAL_BATCH_SIZE="96")
    assert r.returncode == 2 and "--global-batch-size 96" in r.stdout.strip().splitlines()[-1]
    assert not (bin_dir / "calls.txt").exists()
