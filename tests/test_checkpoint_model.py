"""megatron/checkpoint_model.py: a model's config and weights out of a checkpoint, no DeepSpeed."""

import dataclasses
import json

import pytest
import torch

from megatron.checkpoint_model import load_model, model_config_from_saved
from megatron.checkpointing import save_checkpoint
from tests.test_checkpointing import Run, deepspeed, tiny_gpt_config  # noqa: F401 (fixture)


def _saved(config):
    """RunConfig.model as the layout file holds it (JSON: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def test_config_round_trips_with_run_settings_reset_and_routing_overrides():
    trained = dataclasses.replace(
        tiny_gpt_config(sync_free=True, compile_routing=True, backend="torch"),
        params_dtype="bf16", checkpoint_activations=True, activation="gelu_erf_onnx")
    config = model_config_from_saved(_saved(trained))
    assert config == dataclasses.replace(
        trained, params_dtype="fp32", checkpoint_activations=False,
        moe=dataclasses.replace(trained.moe, sync_free=False, compile_routing=False,
                                backend="auto"))
    swept = model_config_from_saved(_saved(trained), threshold=0.3, drop_tokens=True)
    assert (swept.moe.threshold, swept.moe.drop_tokens) == (0.3, True)
    assert model_config_from_saved(_saved(trained), router="topk", topk=2).moe.router == "topk"


def test_older_checkpoints_used_exact_erf_and_bad_overrides_are_named():
    saved = _saved(tiny_gpt_config())
    del saved["activation"]
    assert model_config_from_saved(saved).activation == "gelu"
    with pytest.raises(ValueError, match=r"cannot override \['hidden_size'\]"):
        model_config_from_saved(saved, hidden_size=8)
    with pytest.raises(ValueError, match="--threshold must be in"):
        model_config_from_saved(saved, threshold=1.5)


def test_loaded_model_computes_what_the_trained_one_did(deepspeed, tmp_path):
    """Weights from DeepSpeed's model file give the trained model's logits (eval mode, fp32)."""
    run = Run(deepspeed, "gpt", 0, seed=0)
    run.step()
    config = run.engine.module.config
    save_checkpoint(run.engine, 1, 4, run.sched, {"model": dataclasses.asdict(config)},
                    str(tmp_path))
    model, iteration = load_model(str(tmp_path), model_config_from_saved(_saved(config)), "cpu")
    assert iteration == 1
    trained = run.engine.module.eval()
    ids = torch.randint(0, config.padded_vocab_size, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trained(ids).logits, rtol=0, atol=0)
