"""examples_deepspeed/MoE launch scripts: with DRY_RUN=1 each prints a command line that the real
`deepspeed` / `torchrun` argument parsers accept, whose pretrain_gpt.py arguments pass
megatron.arguments' validation (cross-checking the sed-filled DeepSpeed JSON) and build the
configuration the script documents."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from megatron.arguments import RunConfig, build_configs, parse_args, validate_args

REPO = Path(__file__).resolve().parents[1]
MOE_DIR = REPO / "examples_deepspeed" / "MoE"
SCRIPTS = ("ds_pretrain_gpt_xmoe_small.sh", "ds_pretrain_gpt_topk_small.sh",
           "ds_pretrain_gpt_125M_dense.sh")
PADDED_VOCAB = 50304


@pytest.fixture
def paths(tmp_path: Path) -> dict:
    """Files validate_args checks for: a dataset pair, vocabulary, merges; and an output dir."""
    data = tmp_path / "data" / "corpus_text_document"
    data.parent.mkdir()
    for ext in (".bin", ".idx"):
        Path(str(data) + ext).write_bytes(b"")
    vocab, merges = tmp_path / "data" / "vocab.json", tmp_path / "data" / "merges.txt"
    vocab.write_text("{}")
    merges.write_text("#version: 0.2\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    return {"DATA_PATH": str(data), "VOCAB_PATH": str(vocab), "MERGE_PATH": str(merges),
            "OUTPUT_DIR": str(tmp_path / "out"), "hostfile": str(hostfile)}


def dry_run(script: str, paths: dict, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "DRY_RUN": "1", "NUM_GPUS": "4",
                "NUM_NODES": "1", **{k: v for k, v in paths.items() if k.isupper()}, **env}
    return subprocess.run(["bash", str(MOE_DIR / script)], env=full_env, capture_output=True,
                          text=True, timeout=60)


def split_command(stdout: str) -> tuple[list[str], list[str]]:
    """(launcher argv before pretrain_gpt.py, pretrain_gpt.py's own arguments)."""
    argv = shlex.split(stdout)
    scripts = [i for i, a in enumerate(argv) if a.endswith("pretrain_gpt.py")]
    assert len(scripts) == 1, stdout
    assert argv[scripts[0]] == str(REPO / "pretrain_gpt.py")
    return argv[:scripts[0] + 1], argv[scripts[0] + 1:]


def build(gpt_argv: list[str], world_size: int) -> RunConfig:
    args = parse_args(gpt_argv)
    validate_args(args, world_size)
    return build_configs(args, PADDED_VOCAB)


def deepspeed_json(gpt_argv: list[str]) -> dict:
    path = gpt_argv[gpt_argv.index("--deepspeed_config") + 1]
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    r = subprocess.run(["bash", "-n", str(MOE_DIR / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_common_file_syntax_and_template_placeholders():
    assert subprocess.run(["bash", "-n", str(MOE_DIR / "gpt_launch_common.sh")]).returncode == 0
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
