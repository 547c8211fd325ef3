"""Evaluation with MoE statistics (megatron/evaluation.py), their log lines and TensorBoard
scalars (megatron/training_log.py), expert-load balance scalars in training, and changing the
routing of a built model (GPTModel.set_routing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron.config import GPTConfig, MoEConfig
from megatron.evaluation import EvalResult, MoELayerEval, evaluate
from megatron.model import GPTModel
from megatron.training_log import (IntervalStats, StepReport, TensorBoardWriter, eval_moe_lines,
                                   load_balance)
from tests.test_pretrain_gpt import tensorboard_scalars

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")

F_DENSE, F_EXPERT = 24, 8


def moe_model(**moe_changes) -> GPTModel:
    """Layers 2 and 4 are MoE (4 and 3 experts); threshold 0.9 at eval capacity 0.5, so that
    capacity drops pairs (the statistics must tell wanted from used)."""
    moe = MoEConfig(**{**dict(router="threshold", threshold=0.9, ffn_hidden_size=F_EXPERT,
                              eval_capacity_factor=0.5, min_capacity=1), **moe_changes})
    config = GPTConfig(num_layers=4, hidden_size=16, num_attention_heads=2,
                       padded_vocab_size=40, max_position_embeddings=8, ffn_hidden_size=F_DENSE,
                       num_experts=(4, 3), expert_interval=2, hidden_dropout=0.1,
                       attention_dropout=0.1, init_method_std=0.3, moe=moe)
    torch.manual_seed(0)
    return GPTModel(config)


def batches(n: int = 6, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"text": torch.randint(0, 40, (2, 9), generator=g)} for _ in range(n)]


def reference(model: GPTModel, data: list[dict]) -> dict:
    """Per batch straight from the model's MoEStats, then averaged: experts/token wanted and
    used (every batch has the same tokens, so the mean of the per-batch means is the mean over
    all tokens), dropped = 1 - used / wanted over all pairs, loads summed over batches."""
    model.eval()
    losses, per_layer = [], {}
    with torch.no_grad():
        for b in data:
            out = model(b["text"][:, :-1], labels=b["text"][:, 1:])
            losses.append(out.loss.mean().item())
            for s in out.moe_stats:
                d = per_layer.setdefault(s.layer_number, {"E": s.num_experts, "wanted": [],
                                                          "used": [], "load": 0})
                d["wanted"].append(s.wanted_per_token.item())
                d["used"].append(s.used_per_token.item())
                d["load"] = d["load"] + s.expert_load_E.double().numpy()
    return {"loss": float(np.mean(losses)), "layers": per_layer}


def test_evaluate_reports_loss_and_moe_statistics_of_the_batches():
    model, data = moe_model(), batches()
    expected = reference(model, data)
    model.train()
    result = evaluate(model, iter(data), num_iters=3, micro_batches_per_iter=2,
                      device=torch.device("cpu"))
    assert isinstance(result, EvalResult) and model.training
    assert result.lm_loss == pytest.approx(expected["loss"], rel=1e-6)
    assert result.ppl == pytest.approx(np.exp(expected["loss"]), rel=1e-6)
    assert result.tokens == 6 * 2 * 8
    assert [layer.layer_number for layer in result.moe_layers] == [2, 4]
    for layer in result.moe_layers:
        ref = expected["layers"][layer.layer_number]
        wanted, used = np.mean(ref["wanted"]), np.mean(ref["used"])
        assert layer.num_experts == ref["E"]
        assert layer.wanted_per_token == pytest.approx(wanted, rel=1e-6)
        assert layer.used_per_token == pytest.approx(used, rel=1e-6)
        assert layer.dropped_fraction == pytest.approx(1.0 - used / wanted, rel=1e-5)
        assert layer.flops_vs_all == pytest.approx(used / ref["E"], rel=1e-6)
        assert layer.flops_vs_dense == pytest.approx(used * F_EXPERT / F_DENSE, rel=1e-6)
        np.testing.assert_allclose(layer.load_fractions, ref["load"] / ref["load"].sum(),
                                   rtol=1e-6)
    assert 0 < result.moe_layers[0].dropped_fraction < 1          # capacity did drop pairs
    mean = result.moe_mean
    assert mean["used_per_token"] == pytest.approx(
        np.mean([layer.used_per_token for layer in result.moe_layers]))


def test_evaluate_of_a_dense_model_has_no_moe_layers():
    model = moe_model()
    dense = GPTModel(dataclasses.replace(model.config, num_experts=(1,)))
    result = evaluate(dense, iter(batches(2)), 1, 2, torch.device("cpu"))
    assert result.moe_layers == [] and result.moe_mean is None and result.lm_loss > 0


def _result() -> EvalResult:
    loads = np.array([0.1, 0.2, 0.3, 0.4])
    layer = MoELayerEval(layer_number=2, num_experts=4, wanted_per_token=2.91,
                         used_per_token=2.85, dropped_fraction=0.021, flops_vs_all=0.7125,
                         flops_vs_dense=0.95, load_fractions=loads)
    other = dataclasses.replace(layer, layer_number=4, num_experts=3, wanted_per_token=1.09,
                                used_per_token=1.05, dropped_fraction=0.041, flops_vs_all=0.35,
                                flops_vs_dense=0.35, load_fractions=np.array([0.5, 0.25, 0.25]))
    return EvalResult(lm_loss=5.123, tokens=1024, moe_layers=[layer, other])


def test_eval_moe_lines():
    assert eval_moe_lines("validation", _result()) == [
        "   validation MoE layer 2: wanted 2.91 used 2.85 experts/token | dropped 2.1% | expert "
        "FLOPs vs all experts 0.71, vs dense FFN 0.95 | load vs mean min 0.40 max 1.60 std 0.45",
        "   validation MoE layer 4: wanted 1.09 used 1.05 experts/token | dropped 4.1% | expert "
        "FLOPs vs all experts 0.35, vs dense FFN 0.35 | load vs mean min 0.75 max 1.50 std 0.35",
        "   validation MoE mean:    wanted 2.00 used 1.95 experts/token | dropped 3.1% | expert "
        "FLOPs vs all experts 0.53, vs dense FFN 0.65"]


def test_load_balance_is_relative_to_the_mean():
    assert load_balance(np.array([0.25, 0.25, 0.25, 0.25])) == pytest.approx((1.0, 1.0, 0.0))
    lo, hi, std = load_balance(np.array([0.1, 0.2, 0.3, 0.4]))
    assert (lo, hi) == pytest.approx((0.4, 1.6)) and std == pytest.approx(np.sqrt(0.2))
    assert load_balance(np.zeros(3)) is None


def test_tensorboard_gets_eval_and_training_load_scalars(tmp_path):
    writer = TensorBoardWriter(str(tmp_path), 1)
    writer.write_eval("validation", 7, _result())
    stats = IntervalStats([2], [4])
    stats.add(StepReport(iteration=5, lm_loss=torch.tensor(3.0), aux_loss=torch.tensor(0.1),
                         grad_norm=1.0, learning_rate=1e-3, loss_scale=1.0, skipped=False,
                         moe_fields=torch.zeros(1, 6), moe_loads=torch.tensor([1., 2., 3., 4.])))
    writer.write_interval(stats.reduce(), 100.0)
    writer.close()
    tag = "validation/moe-layer-2/"
    expected = {"validation/lm-loss": 5.123, "validation/lm-loss-ppl": np.exp(5.123),
                tag + "experts-per-token-wanted": 2.91, tag + "experts-per-token-used": 2.85,
                tag + "dropped-fraction": 0.021, tag + "expert-flops-vs-all": 0.7125,
                tag + "expert-flops-vs-dense": 0.95, tag + "load-min-over-mean": 0.4,
                tag + "load-max-over-mean": 1.6, tag + "load-std-over-mean": np.sqrt(0.2),
                "validation/moe-layer-4/experts-per-token-used": 1.05,
                "validation/moe-mean/experts-per-token-used": 1.95,
                "validation/moe-mean/expert-flops-vs-dense": 0.65}
    for name, value in expected.items():
        assert tensorboard_scalars(tmp_path, name) == {7: pytest.approx(value, rel=1e-6)}, name
    for name, value in (("load-min-over-mean", 0.4), ("load-max-over-mean", 1.6),
                        ("load-std-over-mean", np.sqrt(0.2))):
        assert tensorboard_scalars(tmp_path, f"moe/layer2/{name}") == {
            5: pytest.approx(value, rel=1e-6)}, name


# ----------------------------------------------------------------------------------------------
# GPTModel.set_routing


def test_set_routing_equals_a_model_built_with_that_routing():
    model, data = moe_model(), batches(2)
    state = model.state_dict()
    moe = model.set_routing(threshold=0.5, eval_capacity_factor=2.0)
    assert moe.threshold == 0.5 and model.config.moe == moe
    assert all(layer.mlp.config == moe for layer in model.transformer.layers if layer.is_moe)
    fresh = GPTModel(dataclasses.replace(model.config, moe=moe))
    fresh.load_state_dict(state)
    got = evaluate(model, iter(data), 1, 2, torch.device("cpu"))
    want = evaluate(fresh, iter(data), 1, 2, torch.device("cpu"))
    assert got == want
    before = evaluate(moe_model(), iter(data), 1, 2, torch.device("cpu"))
    assert got.moe_layers[0].wanted_per_token < before.moe_layers[0].wanted_per_token


def test_set_routing_switches_between_gated_routers():
    model = moe_model()
    assert model.set_routing(router="topk", topk=2).router == "topk"
    out = model.eval()(torch.randint(0, 40, (2, 8)))
    assert all(s.wanted_per_token.item() == 2.0 for s in out.moe_stats)


@pytest.mark.parametrize("changes, message", [
    (dict(threshold=1.5), "--threshold must be in (0, 1], got 1.5"),
    (dict(ffn_hidden_size=16), "ffn_hidden_size"),
    (dict(router="hash"), "hash"),
])
def test_set_routing_refuses_what_changes_the_parameters_or_is_invalid(changes, message):
    model = moe_model()
    before = model.config
    with pytest.raises(ValueError) as info:
        model.set_routing(**changes)
    assert message in str(info.value)
    assert model.config == before
