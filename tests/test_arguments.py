"""The command line of pretrain_gpt.py: the original XMoE launch line, router rules, every
"not supported" and inconsistent case (ValueError naming the flag), DeepSpeed JSON handling."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from megatron.arguments import (RunConfig, build_configs, deepspeed_config_dict, parse_args,
                                read_deepspeed_config, validate_args)

PADDED_VOCAB = 50304
WORLD = 2               # the original script: deepspeed --include localhost:0,1

# The XMoE fork's ds_config_gpt_TEMPLATE.json after the script's sed substitutions.
XMOE_DS_CONFIG = {
    "train_batch_size": 256,
    "train_micro_batch_size_per_gpu": 16,
    "steps_per_print": 10,
    "zero_optimization": {"stage": 0, "elastic_checkpoint": True},
    "gradient_clipping": 1.0,
    "prescale_gradients": True,
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
             "min_loss_scale": 1, "initial_scale_power": 11},
    "bf16": {"enabled": False},
    "curriculum_learning": {"enabled": False, "curriculum_type": "seqlen", "min_difficulty": 80,
                            "max_difficulty": 1024, "schedule_type": "fixed_linear",
                            "schedule_config": {"total_curriculum_step": 107142,
                                                "difficulty_step": 8}},
    "wall_clock_breakdown": False,
}

# The original launch script's options (examples/MoE, threshold routing, 64 experts of 384),
# variables substituted; EP_PARALLEL_SIZE was min(64, NUM_GPUS=4) = 4.
XMOE_LINE = """
--adam-beta1 0.9 --adam-beta2 0.95 --tensor-model-parallel-size 1
--moe-expert-parallel-size {ep} --num-experts 64 --topk 8 --expert-interval 2
--moe-loss-coeff 0.01 --moe-train-capacity-factor 8.0 --moe-eval-capacity-factor 8.0
--moe-min-capacity 4 --init-method-std 0.014 --lr-warmup-fraction 0.1 --micro-batch-size 16
--exit-duration-in-mins 30000000 --global-batch-size 256 --num-layers 12 --hidden-size 768
--ffn-hidden-size 3072 --moe-ffn-hidden-size 384 --num-attention-heads 12 --num-ffn-heads 1
--seq-length 1024 --max-position-embeddings 1024 --train-iters 60000 --lr 4.5e-4
--min-lr 4.5e-06 --lr-decay-style cosine --split 97,2,1 --log-interval 10 --eval-interval 100
--eval-iters 10 --test-iters 100 --save-interval 1000 --weight-decay 0.1 --clip-grad 1.0
--hysteresis 2 --num-workers 0 --fp16 --load {ckpt} --save {ckpt} --threshold 0.90
--gate-view-num 1 --no-pipeline-parallel --use-threshold --sparse-mlp --create-moe-param-group
--vocab-file {vocab} --merge-file {merges} --data-path {data} --data-impl mmap
--deepspeed --deepspeed_config {ds} --pipeline-model-parallel-size 1 --no-pipeline-parallel
"""


@pytest.fixture
def files(tmp_path: Path) -> dict:
    """Paths validate_args checks for existence: a dataset pair, vocab, merges, DeepSpeed JSON."""
    data = tmp_path / "gpt2-dataset_text_document"
    for ext in (".bin", ".idx"):
        Path(str(data) + ext).write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps(XMOE_DS_CONFIG))
    return {"data": str(data), "vocab": str(tmp_path / "vocab.json"),
            "merges": str(tmp_path / "merges.txt"), "ds": str(ds),
            "ckpt": str(tmp_path / "checkpoint"), "dir": tmp_path}


def xmoe_argv(files: dict, ep: int = 1, extra: str = "") -> list[str]:
    line = XMOE_LINE.format(ep=ep, ckpt=files["ckpt"], vocab=files["vocab"],
                            merges=files["merges"], data=files["data"], ds=files["ds"])
    return shlex.split(line + " " + extra)


def small_argv(files: dict, extra: str = "") -> list[str]:
    """A small valid CPU run without a DeepSpeed JSON."""
    return shlex.split(
        f"--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
        f"--micro-batch-size 2 --train-iters 10 --lr 1e-3 --data-path {files['data']} "
        f"--vocab-file {files['vocab']} --merge-file {files['merges']} "
        f"--distributed-backend gloo " + extra)


def configs(argv: list[str], world_size: int = 1) -> RunConfig:
    args = parse_args(argv)
    validated = validate_args(args, world_size)
    return build_configs(validated, PADDED_VOCAB)


def rejects(argv: list[str], *fragments: str, world_size: int = 1) -> str:
    """validate_args (or the dataclasses) raise ValueError containing every fragment."""
    with pytest.raises(ValueError) as info:
        configs(argv, world_size)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------------------------
# the original XMoE launch line


def test_original_xmoe_line_builds_the_right_configs(files):
    run = configs(xmoe_argv(files), world_size=WORLD)
    m, moe = run.model, run.model.moe
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == \
        (12, 768, 3072, 12)
    assert (m.max_position_embeddings, m.padded_vocab_size, m.params_dtype) == \
        (1024, PADDED_VOCAB, "fp16")
    assert m.init_method_std == 0.014 and m.num_experts == (64,) and m.expert_interval == 2
    assert moe.router == "threshold" and moe.threshold == 0.9 and moe.topk == 8
    assert moe.ffn_hidden_size == 384 and moe.aux_loss_coeff == 0.01 and moe.drop_tokens
    assert (moe.train_capacity_factor, moe.eval_capacity_factor, moe.min_capacity) == (8, 8, 4)
    assert moe.vocab_size == PADDED_VOCAB and moe.threshold_max_experts is None

    o = run.optimizer
    assert (o.lr, o.min_lr, o.lr_decay_style, o.lr_warmup_fraction) == \
        (4.5e-4, 4.5e-6, "cosine", 0.1)
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert o.create_moe_param_group and o.lr_warmup_iters == 0

    t = run.training
    assert (t.micro_batch_size, t.global_batch_size, t.data_parallel_size) == (16, 256, WORLD)
    assert t.gradient_accumulation_steps == 8 and t.seq_length == 1024
    assert (t.train_iters, t.train_tokens, t.eval_interval, t.eval_iters, t.test_iters) == \
        (60000, None, 100, 10, 100)
    assert t.fp16 and not t.bf16 and t.zero_stage == 0 and t.deepspeed
    assert t.deepspeed_config == files["ds"] and t.exit_duration_in_mins == 30000000
    assert t.distributed_backend in ("nccl", "gloo")

    d = run.data
    assert d.data_path == (files["data"],) and d.prefixes == (files["data"],)
    assert d.weights == (1.0,) and d.split == "97,2,1" and d.num_workers == 0
    assert (d.vocab_file, d.merge_file, d.tokenizer_type) == \
        (files["vocab"], files["merges"], "GPT2BPETokenizer")
    assert run.logging.log_interval == 10 and run.logging.log_moe_stats
    assert run.checkpoint == run.checkpoint.__class__(save=files["ckpt"], load=files["ckpt"],
                                                      save_interval=1000)


def test_original_xmoe_line_moe_layer_placement(files):
    model = configs(xmoe_argv(files), world_size=WORLD).model
    assert model.moe_layer_numbers_if_sparse() == (2, 4, 6, 8, 10, 12)
    assert [model.experts_for_layer(L) for L in range(1, 13)] == [1, 64] * 6


def test_original_xmoe_line_with_its_expert_parallel_size_needs_the_world_size(files):
    # The script passed EP_PARALLEL_SIZE=min(64, NUM_GPUS=4)=4 while launching 2 GPUs.
    rejects(xmoe_argv(files, ep=4), "--moe-expert-parallel-size 4", "world size", "2 processes",
            world_size=WORLD)


def test_expert_parallel_size_reaches_the_moe_config(files):
    run = configs(xmoe_argv(files, ep=2), world_size=WORLD)
    assert run.model.moe.expert_parallel_size == 2


def test_expert_parallel_not_dividing_experts(files):
    rejects(xmoe_argv(files, ep=3, extra="--global-batch-size 288"),
            "--moe-expert-parallel-size 3", "--num-experts 64", "divide", world_size=3)


def test_expert_parallel_with_sync_free_dispatch(files):
    rejects(xmoe_argv(files, ep=2, extra="--moe-sync-free-dispatch"),
            "--moe-sync-free-dispatch", "--moe-expert-parallel-size 2", world_size=WORLD)


# ----------------------------------------------------------------------------------------------
# router selection


@pytest.mark.parametrize("extra, router", [
    ("--num-experts 8", "switch"),
    ("--num-experts 8 --topk 2", "topk"),
    ("--num-experts 8 --topk 1 --use-topk", "topk"),
    ("--num-experts 8 --use-threshold --threshold 0.5", "threshold"),
    ("--num-experts 8 --use-hash-layer --topk 4", "hash"),
])
def test_router_selection(files, extra, router):
    moe = configs(small_argv(files, extra)).model.moe
    assert moe.router == router
    if router == "threshold":
        assert moe.threshold == 0.5


@pytest.mark.parametrize("flags", [("--use-threshold", "--use-topk"),
                                   ("--use-topk", "--use-hash-layer"),
                                   ("--use-threshold", "--use-hash-layer")])
def test_more_than_one_router_flag(files, flags):
    rejects(small_argv(files, "--num-experts 8 " + " ".join(flags)), *flags)


def test_dense_model_needs_no_router_flag(files):
    model = configs(small_argv(files, "--num-experts 1")).model
    assert all(model.experts_for_layer(L) == 1 for L in range(1, 5))


def test_defaults_follow_megatron_deepspeed(files):
    run = configs(small_argv(files, "--num-experts 4"))
    moe, o, t = run.model.moe, run.optimizer, run.training
    assert moe.aux_loss_coeff == 0.1 and moe.router == "switch" and moe.drop_tokens
    assert moe.ffn_hidden_size == run.model.ffn_hidden_size == 256     # 4 * hidden
    assert run.model.max_position_embeddings == 32                     # --seq-length
    assert (o.weight_decay, o.adam_beta2, o.adam_eps, o.lr_decay_style) == \
        (0.01, 0.999, 1e-8, "linear")
    assert (t.global_batch_size, t.zero_stage, t.seed, t.eval_iters) == (2, 0, 1234, 100)
    assert run.data.split == "969,30,1" and run.data.num_workers == 2
    assert run.checkpoint.save is None and run.logging.log_interval == 100


def test_moe_flags_reach_the_moe_config(files):
    moe = configs(small_argv(files, (
        "--num-experts 4 --use-threshold --threshold-max-experts 3 --moe-z-loss-coeff 0.001 "
        "--disable-moe-token-dropping --moe-sync-free-dispatch --moe-backend torch "
        "--seed 7"))).model.moe
    assert moe.threshold_max_experts == 3 and moe.z_loss_coeff == 0.001
    assert moe.backend == "torch"
    assert not moe.drop_tokens and moe.sync_free
    assert moe.hash_seed == 7 and moe.capacity(100, 4, training=True) is None


def test_moe_layer_placement_with_dense_prefix_and_per_layer_experts(files):
    model = configs(small_argv(files, (
        "--num-layers 8 --expert-interval 2 --no-moe-layer-num 2 --num-experts 4 8 16"))).model
    assert model.moe_layer_numbers_if_sparse() == (4, 6, 8)
    assert [model.experts_for_layer(L) for L in range(1, 9)] == [1, 1, 1, 4, 1, 8, 1, 16]


def test_bf16_and_eval_only(files):
    run = configs(small_argv(files, "--bf16"))
    assert run.model.params_dtype == "bf16" and run.training.bf16
    args = parse_args([a for a in small_argv(files) if a not in ("--train-iters", "10")]
                      + ["--eval-only"])
    validated = validate_args(args, 1)
    assert build_configs(validated, PADDED_VOCAB).training.eval_only


def test_build_configs_needs_validate_args_and_leaves_the_namespace_as_parsed(files):
    args = parse_args(small_argv(files))
    with pytest.raises(TypeError, match="validate_args"):
        build_configs(args, PADDED_VOCAB)
    before = vars(args).copy()
    validated = validate_args(args, 2)
    assert vars(args) == before                  # nothing derived is written back
    assert args.global_batch_size is None and validated.flags.global_batch_size == 2 * 2
    assert (validated.world_size, validated.data_parallel_size) == (2, 2)
    assert validated.router == "switch" and validated.zero_stage == 0   # --topk 1, no JSON


def test_local_rank_spellings(files):
    assert configs(small_argv(files, "--local_rank=3")).training.local_rank == 3
    assert configs(small_argv(files, "--local-rank 1")).training.local_rank == 1


# ----------------------------------------------------------------------------------------------
# not supported


@pytest.mark.parametrize("extra, fragments", [
    ("--tensor-model-parallel-size 2", ("--tensor-model-parallel-size 2", "not supported")),
    ("--pipeline-model-parallel-size 2", ("--pipeline-model-parallel-size 2", "not supported")),
    ("--gate-view-num 2", ("--gate-view-num 2", "not supported")),
    ("--num-ffn-heads 2", ("--num-ffn-heads 2", "not supported")),
    ("--data-impl lazy", ("--data-impl lazy", "not supported")),
    ("--data-impl cached", ("--data-impl cached", "not supported")),
    ("--tokenizer-type BertWordPieceCase", ("--tokenizer-type", "not supported")),
    ("--use-base-layer", ("--use-base-layer", "not supported")),
    ("--placeholder-expert", ("--placeholder-expert", "not supported")),
    ("--mlp-type residual", ("--mlp-type residual", "not supported")),
    ("--zero-stage 3", ("--zero-stage 3", "not supported")),
])
def test_not_supported(files, extra, fragments):
    rejects(small_argv(files, extra), *fragments)


def test_accepted_no_ops(files):
    run = configs(small_argv(files, "--no-pipeline-parallel --sparse-mlp --gate-view-num 1 "
                                    "--num-ffn-heads 1 --pipeline-model-parallel-size 1 "
                                    "--data-impl mmap --num-experts 2"))
    assert run.model.experts_for_layer(2) == 2


# ----------------------------------------------------------------------------------------------
# inconsistent values


@pytest.mark.parametrize("extra, fragments", [
    ("--global-batch-size 5", ("--global-batch-size 5", "--micro-batch-size 2")),
    ("--threshold 0", ("--threshold", "(0, 1]")),
    ("--threshold 1.5 --use-threshold", ("--threshold", "1.5")),
    ("--seq-length 64 --max-position-embeddings 32", ("--seq-length 64",
                                                      "--max-position-embeddings 32")),
    ("--fp16 --bf16", ("--fp16", "--bf16")),
    ("--lr-warmup-fraction 0.1 --lr-warmup-iters 5", ("--lr-warmup-fraction",
                                                      "--lr-warmup-iters")),
    ("--num-experts 4 8 16", ("--num-experts", "one per MoE layer")),
    ("--num-experts 0", ("--num-experts",)),
    ("--topk 0", ("--topk",)),
    ("--min-lr 1.0", ("--min-lr",)),
    ("--split 1,2,3,4", ("--split",)),
    ("--save /tmp/x", ("--save", "--save-interval")),
    ("--lr-warmup-fraction 2", ("--lr-warmup-fraction",)),
    ("--initial-loss-scale 1000", ("--initial-loss-scale",)),
    ("--hidden-dropout 1.5", ("--hidden-dropout",)),
])
def test_inconsistent(files, extra, fragments):
    rejects(small_argv(files, extra), *fragments)


def test_global_batch_must_divide_by_data_parallel_size(files):
    rejects(small_argv(files, "--global-batch-size 6"), "--global-batch-size 6",
            "data-parallel size 2", world_size=2)
    assert configs(small_argv(files, "--global-batch-size 8"),
                   world_size=2).training.gradient_accumulation_steps == 2


def test_train_duration_required(files):
    argv = [a for a in small_argv(files) if a not in ("--train-iters", "10")]
    rejects(argv, "--train-iters", "--train-tokens")
    assert configs(argv + ["--train-tokens", "1000"]).training.train_tokens == 1000


@pytest.mark.parametrize("flag", ["--num-layers", "--hidden-size", "--num-attention-heads",
                                  "--seq-length", "--micro-batch-size", "--lr"])
def test_required_flags(files, flag):
    argv = small_argv(files)
    i = argv.index(flag)
    rejects(argv[:i] + argv[i + 2:], flag)


def test_data_path_files_must_exist(files):
    missing = str(files["dir"] / "nope")
    argv = small_argv(files)
    argv[argv.index(files["data"])] = missing
    rejects(argv, f"--data-path: {missing}.bin not found")
    Path(missing + ".bin").write_bytes(b"")
    rejects(argv, f"--data-path: {missing}.idx not found")


def test_weighted_data_path(files):
    other = str(files["dir"] / "other")
    for ext in (".bin", ".idx"):
        Path(other + ext).write_bytes(b"")
    argv = small_argv(files)
    i = argv.index("--data-path")
    argv[i + 1:i + 2] = ["3", files["data"], "1", other]
    data = configs(argv).data
    assert data.prefixes == (files["data"], other) and data.weights == (0.75, 0.25)
    argv[i + 1:i + 5] = ["3", files["data"], "1"]
    rejects(argv, "--data-path", "pairs")


@pytest.mark.parametrize("flag", ["--vocab-file", "--merge-file"])
def test_tokenizer_files_must_exist(files, flag):
    argv = small_argv(files)
    i = argv.index(flag)
    rejects(argv[:i] + argv[i + 2:], flag, "required")
    argv[i + 1] = str(files["dir"] / "missing.txt")
    rejects(argv, flag, "missing.txt not found")


def test_nccl_needs_cuda(files, monkeypatch):
    import megatron.arguments as arguments
    monkeypatch.setattr(arguments, "_cuda_available", lambda: False)
    rejects(small_argv(files, "--distributed-backend nccl"), "--distributed-backend nccl")
    args = parse_args([a for a in small_argv(files) if a not in ("--distributed-backend",
                                                                  "gloo")])
    validated = validate_args(args, 1)
    assert build_configs(validated, PADDED_VOCAB).training.distributed_backend == "gloo"


# ----------------------------------------------------------------------------------------------
# DeepSpeed JSON


def _with_ds(files, config, extra: str = "") -> list[str]:
    """The XMoE line with --deepspeed_config pointing at `config` (a dict, or raw text)."""
    path = files["dir"] / "ds_test.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return xmoe_argv({**files, "ds": str(path)}, extra=extra)


@pytest.mark.parametrize("key, value, flag", [
    ("train_batch_size", 512, "--global-batch-size 256"),
    ("train_micro_batch_size_per_gpu", 8, "--micro-batch-size 16"),
    ("gradient_accumulation_steps", 4, "--micro-batch-size"),
    ("gradient_clipping", 0.5, "--clip-grad 1.0"),
])
def test_deepspeed_batch_mismatch(files, key, value, flag):
    rejects(_with_ds(files, {**XMOE_DS_CONFIG, key: value}), key, flag, world_size=WORLD)


def test_deepspeed_precision_mismatch(files):
    config = {**XMOE_DS_CONFIG, "fp16": {"enabled": False}}
    rejects(_with_ds(files, config), "fp16.enabled", "--fp16", world_size=WORLD)
    config = {**XMOE_DS_CONFIG, "bf16": {"enabled": True}}
    rejects(_with_ds(files, config), "bf16.enabled", "--bf16", world_size=WORLD)


def test_deepspeed_zero_stages(files):
    config = {**XMOE_DS_CONFIG, "zero_optimization": {"stage": 3}}
    rejects(_with_ds(files, config), "zero_optimization.stage 3", "not supported",
            world_size=WORLD)
    config = {**XMOE_DS_CONFIG, "zero_optimization": {"stage": 2}}
    assert configs(_with_ds(files, config), WORLD).training.zero_stage == 2
    rejects(_with_ds(files, config, "--zero-stage 1"), "--zero-stage 1", world_size=WORLD)


def test_deepspeed_unsupported_sections(files):
    config = {**XMOE_DS_CONFIG, "curriculum_learning": {"enabled": True}}
    rejects(_with_ds(files, config), "curriculum_learning", "not supported", world_size=WORLD)
    config = {**XMOE_DS_CONFIG, "optimizer": {"type": "Adam"}}
    rejects(_with_ds(files, config), "optimizer", "not supported", world_size=WORLD)


def test_deepspeed_fork_config_reaches_deepspeed_without_its_legacy_section(files, capsys):
    """The fork's JSON (fp16 and bf16 sections, a switched-off curriculum_learning,
    prescale_gradients, wall_clock_breakdown, ZeRO's elastic_checkpoint): DeepSpeed 0.19.8
    refuses any top-level curriculum_learning, so the dict the engine receives leaves it out, and
    one line says so. Its throughput timer (two device syncs per step) is switched off, in the
    same line, unless the JSON has a "timers" section or asks for wall_clock_breakdown."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    capsys.readouterr()                             # DeepSpeed's import-time warning
    ds = deepspeed_config_dict(configs(_with_ds(files, XMOE_DS_CONFIG), world_size=1))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "curriculum_learning" in out[0] and "ds_test.json" in out[0], out
    assert "throughput timer is off" in out[0], out
    assert ds == {k: v for k, v in XMOE_DS_CONFIG.items() if k != "curriculum_learning"} | \
        {"gradient_accumulation_steps": 16, "timers": {"throughput": {"enabled": False}}}
    parsed = ds_config.DeepSpeedConfig(ds)          # DeepSpeed's own parser accepts it
    assert parsed.float16_config.enabled and not parsed.bfloat16_config.enabled
    assert parsed.prescale_gradients and parsed.zero_optimization_stage == 0
    assert not parsed.timers_config.enabled
    # a "timers" section of the user's is kept as written
    timers = {"throughput": {"enabled": True, "synchronized": False}}
    ds = deepspeed_config_dict(configs(_with_ds(files, {**XMOE_DS_CONFIG, "timers": timers}),
                                       world_size=1))
    assert "throughput timer" not in capsys.readouterr().out
    assert ds["timers"] == timers
    parsed = ds_config.DeepSpeedConfig(ds)
    assert parsed.timers_config.enabled and not parsed.timers_config.synchronized
    # the template's other precision, bf16 on and fp16 off; Megatron-DeepSpeed's timers on
    config = {**XMOE_DS_CONFIG, "fp16": {**XMOE_DS_CONFIG["fp16"], "enabled": False},
              "bf16": {"enabled": True}, "wall_clock_breakdown": True}
    argv = [a for a in _with_ds(files, config, "--bf16") if a != "--fp16"]
    ds = deepspeed_config_dict(configs(argv, world_size=1))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "curriculum_learning" in out[0], out
    assert ds["wall_clock_breakdown"] is True       # DeepSpeed's timers work with our model
    assert "timers" not in ds and "throughput timer" not in out[0]      # DeepSpeed's default
    parsed = ds_config.DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled


def _legacy_forms(key: str) -> tuple[object, object]:
    """(switched off, switched on) forms of DeepSpeed's removed top-level section `key`."""
    if key in ("sparse_gradients", "graph_harvesting"):
        return False, True
    if key == "sparse_attention":               # had no switch: present means on
        return {}, {"mode": "fixed"}
    if key == "compression_training":           # one switch per technique
        return ({"weight_quantization": {"shared_parameters": {"enabled": False}}},
                {"weight_quantization": {"shared_parameters": {"enabled": True}}})
    return {"enabled": False, "x": 1}, {"enabled": True}


def test_deepspeed_removed_top_level_sections(files, capsys):
    """Every top-level section DeepSpeed refuses since it removed the feature: switched off ->
    dropped with one line; switched on -> one line naming it and what runs instead."""
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    removed = ds_config._REMOVED_TOP_LEVEL_CONFIG_KEYS
    assert "curriculum_learning" in removed
    for key in removed:
        off, on = _legacy_forms(key)
        ds = deepspeed_config_dict(configs(_with_ds(files, {**XMOE_DS_CONFIG, key: off})))
        assert key not in ds, key
        ds_config.DeepSpeedConfig(ds)
        assert key in capsys.readouterr().out
        message = rejects(_with_ds(files, {**XMOE_DS_CONFIG, key: on}), f'"{key}"',
                          "not supported")
        assert "\n" not in message and "instead" in message


def test_deepspeed_config_file_errors(files):
    missing = str(files["dir"] / "absent.json")
    argv = xmoe_argv({**files, "ds": missing})
    rejects(argv, "--deepspeed_config", missing, "not found", world_size=WORLD)
    rejects(_with_ds(files, "{not json"), "ds_test.json", "not valid JSON", world_size=WORLD)
    rejects(_with_ds(files, "[1, 2]"), "ds_test.json", "JSON object", world_size=WORLD)
    argv = [a for a in xmoe_argv(files) if a != "--deepspeed"]
    rejects(argv, "--deepspeed_config needs --deepspeed", world_size=WORLD)


def test_deepspeed_config_dict_from_flags(files):
    run = configs(small_argv(files, "--fp16 --global-batch-size 16 --clip-grad 0.5 "
                                    "--initial-loss-scale 65536 --loss-scale-window 500 "
                                    "--hysteresis 3 --min-loss-scale 2 --zero-stage 1"),
                  world_size=2)
    ds = deepspeed_config_dict(run)
    assert ds["train_batch_size"] == 16 == ds["train_micro_batch_size_per_gpu"] * 2 * \
        ds["gradient_accumulation_steps"]
    assert ds["gradient_accumulation_steps"] == run.training.gradient_accumulation_steps == 4
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 1}
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 2.0}
    assert ds["bf16"] == {"enabled": False} and ds["wall_clock_breakdown"] is False
    assert ds["steps_per_print"] >= 10 ** 9
    bf16 = deepspeed_config_dict(configs(small_argv(files, "--bf16")))
    assert bf16["bf16"] == {"enabled": True} and bf16["fp16"] == {"enabled": False}


def test_deepspeed_config_dict_round_trips_through_validation(files):
    """The built config, given back as --deepspeed_config, passes the cross-checks unchanged."""
    run = configs(small_argv(files, "--fp16 --global-batch-size 8 --zero-stage 2"), world_size=2)
    path = files["dir"] / "built.json"
    path.write_text(json.dumps(deepspeed_config_dict(run)))
    again = configs(small_argv(files, f"--fp16 --global-batch-size 8 --deepspeed "
                                      f"--deepspeed_config {path}"), world_size=2)
    assert again.training.zero_stage == 2 and read_deepspeed_config(str(path)) == \
        deepspeed_config_dict(again)


def test_deepspeed_config_dict_keeps_the_json_and_fills_gaps(files):
    config = {k: v for k, v in XMOE_DS_CONFIG.items() if k != "gradient_clipping"}
    run = configs(_with_ds(files, config), WORLD)
    ds = deepspeed_config_dict(run)
    assert ds["fp16"]["initial_scale_power"] == 11 and ds["steps_per_print"] == 10
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 8


def test_deepspeed_accepts_the_built_config(files):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    run = configs(small_argv(files, "--fp16 --global-batch-size 8 --zero-stage 1"))
    parsed = ds_config.DeepSpeedConfig(deepspeed_config_dict(run))
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu,
            parsed.gradient_accumulation_steps) == (8, 2, 4)
    fp16 = parsed.float16_config
    assert fp16.enabled and fp16.loss_scale == 0 and fp16.initial_scale_power == 32
    assert (fp16.loss_scale_window, fp16.hysteresis, fp16.min_loss_scale) == (1000, 2, 1)
    assert not parsed.bfloat16_config.enabled
    assert parsed.zero_optimization_stage == 1 and parsed.gradient_clipping == 1.0
    assert not parsed.timers_config.enabled         # no device syncs of DeepSpeed's per step


@pytest.mark.parametrize("router_flags", ["--use-threshold", "--use-hash-layer", "--topk 2"])
def test_built_model_config_runs_the_model(files, router_flags):
    """The GPTConfig built from flags is what GPTModel takes (threshold, hash, top-k MoE)."""
    torch = pytest.importorskip("torch")
    from megatron.model.gpt_model import GPTModel

    model_config = configs(small_argv(files, f"--num-experts 4 --moe-ffn-hidden-size 32 "
                                             f"{router_flags}")).model
    model = GPTModel(model_config)
    out = model(torch.randint(0, PADDED_VOCAB, (2, 32)))
    assert len(out.moe_stats) == 2 and out.logits.shape == (2, 32, PADDED_VOCAB)  # MoE: 2, 4


def test_compile_routing_flag(files):
    assert not configs(xmoe_argv(files), world_size=WORLD).model.moe.compile_routing
    run = configs(xmoe_argv(files, extra="--moe-compile-routing"), world_size=WORLD)
    assert run.model.moe.compile_routing and not run.model.moe.routing_cuda_graphs
    run = configs(xmoe_argv(files, extra="--moe-routing-cuda-graphs"), world_size=WORLD)
    assert run.model.moe.compile_routing and run.model.moe.routing_cuda_graphs
    with pytest.raises(ValueError, match="--moe-routing-cuda-graphs cannot be combined with "
                                         "--checkpoint-activations"):
        configs(xmoe_argv(files, extra="--moe-routing-cuda-graphs --checkpoint-activations"),
                world_size=WORLD)


def test_compile_flag_implies_sync_free_dispatch(files):
    run = configs(xmoe_argv(files, extra="--compile"), world_size=WORLD)
    assert run.training.compile == "inductor" and run.model.moe.sync_free
    run = configs(xmoe_argv(files, extra="--compile aot_eager"), world_size=WORLD)
    assert run.training.compile == "aot_eager"
    assert configs(xmoe_argv(files), world_size=WORLD).training.compile is None
    rejects(xmoe_argv(files, ep=2, extra="--compile"), "--compile", "--moe-expert-parallel-size 2",
            world_size=WORLD)


def test_moe_backend_flag(files):
    assert configs(xmoe_argv(files), world_size=WORLD).model.moe.backend == "auto"
    for choice in ("torch", "triton", "auto"):
        run = configs(xmoe_argv(files, extra=f"--moe-backend {choice}"), world_size=WORLD)
        assert run.model.moe.backend == choice
    with pytest.raises(SystemExit):
        configs(xmoe_argv(files, extra="--moe-backend cuda"), world_size=WORLD)


# (old flags, the backend they run, the one warning line each gives)
DEPRECATED_MOE_FLAGS = [
    ("--moe-kernels torch", "torch", ["--moe-kernels torch is deprecated: use --moe-backend "
                                      "torch"]),
    ("--moe-kernels triton", "triton", ["--moe-kernels triton is deprecated"]),
    ("--moe-expert-impl loop", "torch", ["--moe-expert-impl loop is deprecated: the per-expert "
                                         "loop is a test reference now"]),
    ("--moe-expert-impl grouped", "auto", ["--moe-expert-impl grouped is deprecated and changes "
                                           "nothing"]),
    ("--moe-expert-gemm grouped_mm", "auto", ["--moe-expert-gemm grouped_mm is deprecated"]),
    ("--moe-expert-gemm fused", "auto", ["--moe-expert-gemm fused was retired (slower in every "
                                         "benchmark: benchmarks/HISTORY.md): the default runs"]),
    ("--moe-kernels torch --moe-expert-gemm fused", "torch",
     ["--moe-kernels torch is deprecated", "--moe-expert-gemm fused was retired"]),
    ("--moe-backend triton --moe-kernels torch", "triton",
     ["--moe-kernels torch is deprecated", "--moe-backend triton wins over the deprecated"]),
]


@pytest.mark.parametrize("flags, backend, lines", DEPRECATED_MOE_FLAGS)
def test_deprecated_moe_flags_map_onto_the_backend_with_one_line_each(files, caplog, flags,
                                                                      backend, lines):
    with caplog.at_level("WARNING", logger="megatron.arguments"):
        run = configs(xmoe_argv(files, extra=flags), world_size=WORLD)
    assert run.model.moe.backend == backend
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron.arguments"]
    assert len(messages) == len(lines), messages
    for message, line in zip(messages, lines):
        assert message.startswith(line) and "\n" not in message, message


def test_no_warning_without_deprecated_flags(files, caplog):
    with caplog.at_level("WARNING", logger="megatron.arguments"):
        configs(xmoe_argv(files, extra="--moe-backend torch"), world_size=WORLD)
    assert not [r for r in caplog.records if r.name == "megatron.arguments"]


def test_data_path_suggests_the_prefix_that_exists(files):
    """A path with .bin/.idx, or the --output-prefix without _text_document: say what exists."""
    argv = small_argv(files)
    i = argv.index(files["data"])
    for given in (files["data"] + ".bin", files["data"] + ".idx",
                  str(files["dir"] / "gpt2-dataset")):
        argv[i] = given
        message = rejects(argv, f"--data-path: {given}.bin not found",
                          f"did you mean {files['data']}")
        assert "\n" not in message


def test_vocabulary_files_are_recorded_as_absolute_paths(files, monkeypatch):
    """The checkpoint keeps the run's vocab/merge paths for generation and export, which may
    run from another directory: relative paths are made absolute when the run starts."""
    monkeypatch.chdir(files["dir"])
    argv = small_argv(files)
    argv[argv.index(files["vocab"])] = "vocab.json"
    argv[argv.index(files["merges"])] = "merges.txt"
    data = configs(argv).data
    assert (data.vocab_file, data.merge_file) == (files["vocab"], files["merges"])
