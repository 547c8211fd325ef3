"""--use-checkpoint-args: the model flags come from the checkpoint's saved model config, routing
flags given on the command line override it, other explicit model flags that differ are refused
by name; and which routing settings may differ from a checkpoint at all (checkpoint_args)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron.arguments import build_configs, parse_args, validate_args
from megatron.checkpoint_args import OVERRIDABLE_ROUTING, model_differences
from megatron.config import MoEConfig
from tests.test_arguments import PADDED_VOCAB, configs, files, rejects, small_argv  # noqa: F401

SAVED_FLAGS = ("--num-experts 4 --expert-interval 2 --moe-ffn-hidden-size 32 --use-threshold "
               "--threshold 0.7 --ffn-hidden-size 96 --max-position-embeddings 64 "
               "--no-bias-gelu-fusion --layernorm-epsilon 1e-6 --moe-eval-capacity-factor 2 "
               "--hidden-dropout 0.2 --moe-min-capacity 2")


def save_model_flags(files: dict, model: dict | None, iteration: int = 5,
                     model_file_args: dict | None = None) -> str:
    """A checkpoint directory with what --use-checkpoint-args reads: the pointer and the layout
    file (with `model`, as save_checkpoint writes it); with `model_file_args`, also a model
    file holding them as the client state "args" (checkpoints older than the layout's model)."""
    ckpt = files["dir"] / "ckpt"
    tag = ckpt / f"iter_{iteration:07d}"
    tag.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    layout = {"version": 1, "expert_parallel_size": 1, "weights_only": False}
    if model is not None:
        layout["model"] = json.loads(json.dumps(model, default=str))
    (tag / "xmoe_checkpoint.json").write_text(json.dumps(layout) + "\n")
    if model_file_args is not None:
        import torch

        torch.save({"module": {}, "iteration": iteration, "args": model_file_args},
                   tag / "mp_rank_00_model_states.pt")
    return str(ckpt)


def eval_argv(files: dict, ckpt: str, extra: str = "") -> list[str]:
    """Only --load, data, tokenizer and batch flags: no model flags."""
    return (["--use-checkpoint-args", "--load", ckpt, "--eval-only", "--micro-batch-size", "2",
             "--data-path", files["data"], "--vocab-file", files["vocab"], "--merge-file",
             files["merges"], "--distributed-backend", "gloo"] + extra.split())


@pytest.fixture
def saved(files):
    """(checkpoint dir, the saved GPTConfig)."""
    model = configs(small_argv(files, SAVED_FLAGS)).model
    return save_model_flags(files, dataclasses.asdict(model)), model


def test_model_flags_come_from_the_checkpoint(files, saved):
    ckpt, model = saved
    run = configs(eval_argv(files, ckpt))
    assert run.model == model
    assert run.model.activation == "gelu" and run.model.layernorm_epsilon == 1e-6
    assert run.model.moe.eval_capacity_factor == 2 and run.model.moe.threshold == 0.7
    assert run.training.seq_length == 64        # the saved --max-position-embeddings
    assert run.checkpoint.load == ckpt and run.training.eval_only


@pytest.mark.parametrize("extra, changes", [
    ("--threshold 0.4", dict(threshold=0.4)),
    ("--threshold=0.45", dict(threshold=0.45)),
    ("--moe-eval-capacity-factor 1.5 --moe-min-capacity 0", dict(eval_capacity_factor=1.5,
                                                                 min_capacity=0)),
    ("--disable-moe-token-dropping", dict(drop_tokens=False)),
    ("--threshold-max-experts 2", dict(threshold_max_experts=2)),
    ("--use-topk --topk 2", dict(router="topk", topk=2)),
])
def test_explicit_routing_flags_win(files, saved, extra, changes):
    ckpt, model = saved
    run = configs(eval_argv(files, ckpt, extra))
    assert run.model == dataclasses.replace(model, moe=dataclasses.replace(model.moe, **changes))


def test_explicit_run_settings_stay_the_command_lines(files, saved):
    ckpt, model = saved
    run = configs(eval_argv(files, ckpt, "--seq-length 32 --bf16 --hidden-size 64"))
    assert run.training.seq_length == 32 and run.model.params_dtype == "bf16"
    assert run.model.max_position_embeddings == 64      # an equal shape flag is accepted


@pytest.mark.parametrize("extra, named", [
    ("--hidden-size 128", "--hidden-size 64 (this run: 128)"),
    ("--num-experts 8", "--num-experts 4 (this run: 8)"),
    ("--openai-gelu", "--no-bias-gelu-fusion (exact erf GeLU) (this run: the default GeLU"),
    ("--layernorm-epsilon 1e-5", "--layernorm-epsilon 1e-06 (this run: 1e-05)"),
    ("--use-hash-layer", "--use-threshold (this run: --use-hash-layer)"),
])
def test_explicit_shape_flags_that_differ_are_refused_by_name(files, saved, extra, named):
    ckpt, _ = saved
    message = rejects(eval_argv(files, ckpt, extra), named, "--use-checkpoint-args")
    assert "\n" not in message


def test_bad_inputs_are_one_line(files, saved):
    ckpt, _ = saved
    argv = eval_argv(files, ckpt)
    no_load = argv[:1] + argv[3:]
    rejects(no_load, "--use-checkpoint-args needs --load")
    missing = files["dir"] / "nowhere"
    rejects(eval_argv(files, str(missing)), f"--load {missing}", "does not exist")
    (files["dir"] / "empty").mkdir()
    rejects(eval_argv(files, str(files["dir"] / "empty")), "holds no checkpoint",
            "latest_checkpointed_iteration.txt")
    rejects(eval_argv(files, ckpt, "--threshold 1.5"), "--threshold must be in (0, 1], got 1.5")


def test_older_checkpoints_keep_the_flags_in_the_model_file(files):
    model = configs(small_argv(files, SAVED_FLAGS)).model
    ckpt = save_model_flags(files, None, model_file_args={"model": dataclasses.asdict(model)})
    assert configs(eval_argv(files, ckpt)).model == model


def test_a_checkpoint_without_saved_model_flags_is_refused(files):
    ckpt = save_model_flags(files, None, model_file_args={})
    rejects(eval_argv(files, ckpt), "holds no saved model flags", "--use-checkpoint-args")


def test_without_the_flag_the_command_line_decides(files, saved):
    """Today's behaviour: the model flags are required; nothing is read from --load."""
    ckpt, _ = saved
    argv = [a for a in eval_argv(files, ckpt) if a != "--use-checkpoint-args"]
    rejects(argv, "--num-layers is required")
    args = parse_args(small_argv(files, "--threshold 0.3 --use-threshold --num-experts 4 "
                                        f"--load {ckpt}"))
    validated = validate_args(args, 1)
    assert build_configs(validated, PADDED_VOCAB).model.moe.threshold == 0.3


# ----------------------------------------------------------------------------------------------
# which routing settings may differ (megatron/checkpoint_args.py)


def test_overridable_routing_settings_are_reported_not_refused(files, saved):
    _, model = saved
    base = json.loads(json.dumps(dataclasses.asdict(model)))
    assert set(OVERRIDABLE_ROUTING) <= {f.name for f in dataclasses.fields(MoEConfig)}
    run = dataclasses.replace(model, moe=dataclasses.replace(
        model.moe, threshold=0.5, eval_capacity_factor=4.0, min_capacity=0, drop_tokens=False,
        threshold_max_experts=3))
    shape, routing = model_differences(base, json.loads(json.dumps(dataclasses.asdict(run))))
    assert shape == []
    assert routing == ["--threshold 0.7 (this run: 0.5)",
                       "--threshold-max-experts none (this run: 3)",
                       "--moe-eval-capacity-factor 2.0 (this run: 4.0)",
                       "--moe-min-capacity 2 (this run: 0)",
                       "token dropping (this run: --disable-moe-token-dropping)"]
    epsilon = dataclasses.replace(model, layernorm_epsilon=1e-5)
    assert model_differences(base, dataclasses.asdict(epsilon))[0] == [
        "--layernorm-epsilon 1e-06 (this run: 1e-05)"]
