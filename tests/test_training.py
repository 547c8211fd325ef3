"""Pieces of the training loop in process: run length and sample counts, FLOPs, interval
statistics, Megatron's log lines, batches, evaluation, the error line, the launcher environment,
what DeepSpeed's bf16 engine does to the fp32 router weight, and the engine set-up's policies and
workarounds (CPU, gloo, one rank)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import helpers
import torch

from megatron.arguments import RunConfig
from megatron.config import (CheckpointConfig, DataConfig, GPTConfig, LoggingConfig, MoEConfig,
                             OptimizerConfig, TrainingConfig)
from megatron.engine import setup_model_and_optimizer
from megatron.evaluation import evaluate
from megatron.initialize import distributed_env
from megatron.learning_rates import LRScheduler
from megatron.lm_forward import get_batch
from megatron.mixed_precision import MasterWeightAdamW
from megatron.model import GPTModel
from megatron.model.moe.expert_parallel import shard_experts
from megatron.optimizer import build_optimizer
from megatron.training import Trainer, sample_counts, total_train_iters
from megatron.training_log import (FlopsModel, IntervalStats, StepReport, eval_block,
                                   iteration_line, moe_lines, moe_stats_tensors)
from pretrain_gpt import error_message

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


def training_config(**kw) -> TrainingConfig:
    base = dict(micro_batch_size=2, global_batch_size=16, seq_length=64, train_iters=100,
                train_tokens=None, eval_interval=10, eval_iters=3, data_parallel_size=2)
    base.update(kw)
    return TrainingConfig(**base)


def tiny_moe_config(**kw) -> GPTConfig:
    moe = MoEConfig(router="threshold", threshold=0.6, ffn_hidden_size=8, drop_tokens=False)
    base = dict(num_layers=4, hidden_size=16, num_attention_heads=2, padded_vocab_size=40,
                max_position_embeddings=8, ffn_hidden_size=24, num_experts=(4, 3),
                expert_interval=2, hidden_dropout=0.0, attention_dropout=0.0, moe=moe)
    base.update(kw)
    return GPTConfig(**base)


# ----------------------------------------------------------------------------------------------
# run length and sample counts (Megatron's formulas)


def test_train_iters_from_iters_or_tokens():
    assert total_train_iters(training_config()) == 100
    tokens_per_step = 16 * 64
    assert total_train_iters(training_config(train_iters=None,
                                             train_tokens=10 * tokens_per_step)) == 10
    # a partial last step still runs; with both limits, whichever comes first
    assert total_train_iters(training_config(train_iters=None,
                                             train_tokens=10 * tokens_per_step + 1)) == 11
    assert total_train_iters(training_config(train_iters=7,
                                             train_tokens=10 * tokens_per_step)) == 7


def test_sample_counts_follow_megatron():
    t = training_config()
    # train = iters * gbs; valid = (iters // eval_interval + 1) * eval_iters * gbs;
    # test = test_iters (default eval_iters) * gbs
    assert sample_counts(t, 100) == (1600, 11 * 3 * 16, 3 * 16)
    assert sample_counts(training_config(test_iters=5), 100)[2] == 5 * 16


# ----------------------------------------------------------------------------------------------
# FLOPs


def test_flops_model_counts_active_parameters_by_hand():
    cfg = tiny_moe_config()
    model = GPTModel(cfg)
    h, V, L, F, Fe, s = 16, 40, 4, 24, 8, 8
    attention = 3 * h * h + 3 * h + h * h + h
    dense_mlp = 2 * h * F + F + h
    layernorms = 2 * 2 * h
    routers = 4 * h + 3 * h
    dense_params = V * h + L * (attention + layernorms) + 2 * dense_mlp + routers + 2 * h
    per_expert = 2 * h * Fe + Fe + h
    flops = FlopsModel.of_model(model, seq_length=s, recompute=False)
    assert flops.dense_params == dense_params
    assert flops.expert_params == (per_expert, per_expert)
    B, used = 3, [1.5, 2.25]
    expected = (6 * (dense_params + (1.5 + 2.25) * per_expert) * B * s
                + 12 * L * h * s * s * B)
    assert flops.per_iteration(B, used) == pytest.approx(expected)
    recompute = FlopsModel.of_model(model, seq_length=s, recompute=True)
    assert recompute.per_iteration(B, used) == pytest.approx(expected * 8 / 6)


def test_flops_model_under_expert_parallelism_counts_every_ranks_experts():
    """Each rank of an EP=2 run holds half of every MoE layer's experts (as shard_experts_
    leaves it); its FLOPs per iteration are still the whole model's, as with EP=1."""
    model = GPTModel(tiny_moe_config(num_experts=(4, 2)))
    whole = FlopsModel.of_model(model, seq_length=8, recompute=False)
    for layer in model.transformer.layers:
        if layer.is_moe:
            layer.mlp.experts = shard_experts(layer.mlp.experts, rank=1, world_size=2)
            layer.mlp.expert_parallel_size = 2
    assert model.transformer.layers[1].mlp.num_local_experts * 2 == \
        model.transformer.layers[1].num_experts
    sharded = FlopsModel.of_model(model, seq_length=8, recompute=False)
    assert sharded == whole
    assert sharded.per_iteration(3, [1.5, 2.25]) == whole.per_iteration(3, [1.5, 2.25])


# ----------------------------------------------------------------------------------------------
# interval statistics


def step(it, lm, aux=0.1, grad_norm=1.0, skipped=False, fields=None, loads=None):
    return StepReport(iteration=it, lm_loss=torch.tensor(lm), aux_loss=torch.tensor(aux),
                      grad_norm=grad_norm, learning_rate=1e-3 * it, loss_scale=1.0,
                      skipped=skipped, moe_fields=fields, moe_loads=loads)


def test_interval_stats_average_finite_iterations():
    stats = IntervalStats([2, 4], [4, 2])
    f1 = torch.tensor([[2.0, 1.5, 0.25, 0.6, 0.75, 0.2], [1.0, 1.0, 0.0, 0.9, 1.0, 0.5]])
    l1 = torch.tensor([1.0, 1.0, 2.0, 0.0, 3.0, 1.0])
    stats.add(step(1, 4.0, grad_norm=torch.tensor(2.0), fields=f1, loads=l1))
    stats.add(step(2, 6.0, grad_norm=0.5, fields=f1 * 3, loads=l1 * 3))
    stats.add(step(3, 100.0, grad_norm=None, skipped=True, fields=f1, loads=l1))
    stats.add(step(4, float("nan"), fields=f1, loads=l1))
    summary = stats.reduce()
    assert len(stats) == 0                                  # the interval starts afresh
    assert summary.iterations == [1, 2, 3, 4]
    assert summary.grad_norms[:3] == [2.0, 0.5, None]      # device tensor, host float, none
    assert summary.mean(summary.lm_losses) == 110.0 / 3     # nan left out, skipped kept
    assert summary.num_nan == 1 and summary.skipped == [False, False, True, False]
    layer2, layer4 = summary.moe_layers
    assert layer2.layer_number == 2 and layer4.layer_number == 4
    np.testing.assert_allclose(list(layer2.values.values()), (f1[0] * 1.5).tolist(), rtol=1e-6)
    np.testing.assert_allclose(layer2.load_fractions, [0.25, 0.25, 0.5, 0.0])
    np.testing.assert_allclose(layer4.load_fractions, [0.75, 0.25])


def test_moe_stats_tensors_match_the_model_stats():
    model = GPTModel(tiny_moe_config())
    ids = torch.randint(0, 40, (2, 8))
    out = model(ids, labels=ids)
    fields, loads = moe_stats_tensors(out.moe_stats)
    assert fields.shape == (2, 6) and loads.shape == (4 + 3,)
    for row, s in zip(fields, out.moe_stats):
        assert row[0] == s.wanted_per_token and row[1] == s.used_per_token
        assert row[3] == s.top1_prob_median and row[5] == s.flops_vs_dense
    assert loads.sum() == sum(int(s.expert_load_E.sum()) for s in out.moe_stats)


# ----------------------------------------------------------------------------------------------
# log lines


def test_iteration_and_moe_lines_in_megatron_format():
    stats = IntervalStats([2], [2])
    fields = torch.tensor([[2.91, 2.85, 0.021, 0.62, 0.36, 0.71]])
    for it in (9, 10):
        stats.add(step(it, 9.5, aux=0.0125, grad_norm=1.234, fields=fields,
                       loads=torch.tensor([1.0, 3.0])))
    summary = stats.reduce()
    line = iteration_line(summary, total_iters=100, consumed_samples=160, elapsed_s=0.2468,
                          global_batch_size=16, seq_length=1024, tflops=0.123)
    assert line == (
        " iteration       10/     100 | consumed samples:          160 | elapsed time per "
        "iteration (ms): 123.4 | learning rate: 1.000E-02 | global batch size:    16 | lm loss: "
        "9.500000E+00 | moe aux loss: 1.250000E-02 | loss scale: 1.0 | grad norm: 1.234 | "
        "number of skipped iterations:   0 | number of nan iterations:   0 | samples per "
        "second: 129.7 | tokens per second: 132771 | TFLOPs: 0.12 |")
    assert moe_lines(summary) == [
        "   moe layer 2: experts/token wanted 2.91 used 2.85 | dropped 2.1% | top1 p50 0.62 | "
        "expert FLOPs vs top-k 0.36, vs dense 0.71"]


def test_eval_block():
    block = eval_block("validation", 100, 5.123).splitlines()
    assert block[1] == (" validation loss at iteration 100 | lm loss value: 5.123000E+00 | "
                        "lm loss PPL: 1.678381E+02 | ")
    assert block[0] == block[2] == "-" * len(block[1])
    assert "PPL: 4.851652E+08" in eval_block("test", 1, 50.0)   # exp capped at 20, as Megatron


# ----------------------------------------------------------------------------------------------
# batches and evaluation


def test_get_batch_shifts_labels():
    text = torch.arange(12).view(2, 6)
    inputs, labels = get_batch({"text": text}, torch.device("cpu"))
    assert torch.equal(inputs, text[:, :-1]) and torch.equal(labels, text[:, 1:])


def test_evaluate_is_the_mean_lm_loss_without_grad_and_restores_train_mode():
    torch.manual_seed(0)
    model = GPTModel(tiny_moe_config(hidden_dropout=0.1))
    batches = [{"text": torch.randint(0, 40, (2, 9))} for _ in range(6)]
    model.eval()
    with torch.no_grad():
        expected = np.mean([model(b["text"][:, :-1], labels=b["text"][:, 1:]).loss.mean().item()
                            for b in batches])
    model.train()
    loss = evaluate(model, iter(batches), num_iters=3, micro_batches_per_iter=2,
                    device=torch.device("cpu")).lm_loss
    assert loss == pytest.approx(expected, rel=1e-6)
    assert model.training and all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# errors and the environment


class _Raises(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, idx):
        raise ValueError("corpus (train, sample 0): token id 999 is outside the vocabulary")


def test_error_message_unwraps_a_dataloader_worker_error():
    loader = torch.utils.data.DataLoader(_Raises(), num_workers=1)
    with pytest.raises(ValueError) as info:
        next(iter(loader))
    assert "Traceback" in str(info.value)          # what DataLoader re-raises
    assert error_message(info.value) == ("corpus (train, sample 0): token id 999 is outside "
                                         "the vocabulary")
    assert error_message(ValueError("--threshold must be in (0, 1]")) == (
        "--threshold must be in (0, 1]")


def test_distributed_env_defaults_and_launcher_values(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = distributed_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    env = distributed_env(local_rank_flag=3)
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 3)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed_env(local_rank_flag=3)        # the environment wins over the flag
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="RANK=8 / WORLD_SIZE=8"):
        distributed_env()


# ----------------------------------------------------------------------------------------------
# DeepSpeed's bf16 engine and the fp32 router


@pytest.fixture(scope="module")
def deepspeed_one_rank():
    """deepspeed with a gloo group of one rank (tests/helpers.py)."""
    yield from helpers.deepspeed_one_rank()


def test_bf16_engine_casts_the_router_weight_but_routing_stays_fp32(deepspeed_one_rank):
    """DeepSpeed 0.19.8 casts every parameter to bf16, gate_weight included (the optimizer keeps
    fp32 masters); the router logits are still fp32 and the router still trains."""
    torch.manual_seed(0)
    model = GPTModel(tiny_moe_config(params_dtype="bf16"))
    gate = model.transformer.layers[1].mlp.gate_weight
    assert gate.dtype == torch.float32
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "steps_per_print": 10 ** 9, "bf16": {"enabled": True}}
    engine, *_ = deepspeed_one_rank.initialize(model=model, optimizer=optimizer, config=config)
    gate = engine.module.transformer.layers[1].mlp.gate_weight
    assert gate.dtype == torch.bfloat16
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert engine.module.transformer.layers[1].mlp.router_logits(x).dtype == torch.float32
    before = gate.detach().float().clone()
    ids = torch.randint(0, 40, (2, 8))
    out = engine(ids, labels=ids)
    engine.backward(out.loss.mean() + out.moe_aux_loss)
    engine.step()
    assert gate.dtype == torch.bfloat16 and not torch.equal(gate.detach().float(), before)
    assert math.isfinite(engine.get_global_grad_norm())


# ----------------------------------------------------------------------------------------------
# the engine set-up: what the Trainer is handed, and the DeepSpeed workarounds


def tiny_run(**training) -> RunConfig:
    """The tiny MoE model on one rank: micro-batch 2 = global batch 2 of 8 tokens."""
    base = dict(micro_batch_size=2, global_batch_size=2, seq_length=8, train_iters=2,
                train_tokens=None, data_parallel_size=1)
    base.update(training)
    t = TrainingConfig(**base)
    return RunConfig(model=tiny_moe_config(params_dtype=t.params_dtype),
                     optimizer=OptimizerConfig(lr=1e-3, clip_grad=0.5), training=t,
                     data=DataConfig(data_path=("unused",)), logging=LoggingConfig(),
                     checkpoint=CheckpointConfig())


@pytest.mark.parametrize("precision, zero, own_clipping", [
    ("fp32", 0, True), ("bf16", 0, True), ("fp32", 1, False), ("bf16", 1, False)])
def test_engine_setup_carries_the_policies_and_applies_the_workarounds(
        deepspeed_one_rank, precision, zero, own_clipping):
    """We clip at ZeRO 0 without fp16 (DeepSpeed's clipping then off), DeepSpeed clips at ZeRO
    1/2; one rank: no expert-parallel groups, and no backward all-reduce at ZeRO 0; bf16 at
    ZeRO 0 runs on our master-weight AdamW with DeepSpeed's bf16 off and the router fp32."""
    run = tiny_run(bf16=precision == "bf16", zero_stage=zero)
    torch.manual_seed(0)
    built = setup_model_and_optimizer(run, torch.device("cpu"), train_iters=2)
    engine = built.engine
    assert built.own_clipping is own_clipping
    assert built.expert_parallel is None
    assert built.model is engine.module
    assert isinstance(built.scheduler, LRScheduler)
    assert engine.gradient_clipping() == (0.0 if own_clipping else 0.5)
    assert engine.enable_backward_allreduce is (zero > 0)
    own_bf16 = precision == "bf16" and zero == 0
    assert isinstance(engine.optimizer, MasterWeightAdamW) is own_bf16
    assert engine.bfloat16_enabled() is (precision == "bf16" and zero > 0)
    assert not engine.tput_timer.config.enabled     # no device syncs of DeepSpeed's per step
    gate = built.model.transformer.layers[1].mlp.gate_weight
    embedding = next(built.model.parameters())
    if own_bf16:
        assert gate.dtype == torch.float32 and embedding.dtype == torch.bfloat16

    # The Trainer takes the result as it is: its step clips (own_clipping) or lets DeepSpeed.
    trainer = Trainer(run, built, torch.device("cpu"), 2, (None, None, None))
    trainer.train_iter = iter([{"text": torch.randint(0, 40, (2, 9))}])
    before = [p.detach().float().clone() for p in built.model.parameters()]
    report = trainer.train_step()
    assert math.isfinite(float(report.grad_norm)) and float(report.grad_norm) > 0
    assert not report.skipped and built.scheduler.num_iters == 1
    assert any(not torch.equal(p.detach().float(), b)
               for p, b in zip(built.model.parameters(), before))


def test_engine_setup_for_eval_only_has_no_scheduler(deepspeed_one_rank):
    run = tiny_run(train_iters=None, eval_only=True)
    built = setup_model_and_optimizer(run, torch.device("cpu"), train_iters=0)
    assert built.scheduler is None and built.own_clipping and built.expert_parallel is None


def test_engine_setup_refuses_fp16_at_zero_0_before_building(deepspeed_one_rank, monkeypatch):
    """DeepSpeed 0.19.8 never scales the loss there while its optimizer unscales the
    gradients; the refusal comes before the model is built."""
    import megatron.engine

    monkeypatch.setattr(megatron.engine, "GPTModel", None)     # building it would raise
    with pytest.raises(ValueError, match=r"--fp16 with ZeRO stage 0 .*DeepSpeed#8393"):
        setup_model_and_optimizer(tiny_run(fp16=True), torch.device("cpu"), train_iters=2)
