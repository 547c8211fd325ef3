"""LRScheduler against Megatron's closed-form schedule, written out here for each style and mode."""

from __future__ import annotations

import copy
import math
import types
from dataclasses import asdict

import pytest
import torch

from megatron.config import OptimizerConfig
from megatron.learning_rates import LRScheduler

LR, MIN_LR = 3e-4, 3e-5
GBS, SEQ = 4, 8                     # 32 tokens per iteration by default


def optimizer(groups: int = 2) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.AdamW(params, lr=123.0)


def expected(style: str, done: float, warmup: float, decay_start: float, decay_end: float) -> float:
    """Megatron: linear warmup from 0, decay from LR to MIN_LR over [decay_start, decay_end]."""
    if warmup > 0 and done <= warmup:
        return LR * done / warmup
    if style == "constant":
        return LR
    if done > decay_end:
        return MIN_LR
    ratio = (done - decay_start) / (decay_end - decay_start)
    coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
    return MIN_LR + coeff * (LR - MIN_LR)


STEPS = [0, 1, 5, 9, 10, 11, 37, 55, 99, 100, 101, 150]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", ["iters", "fraction", "none"])
def test_iteration_schedule(style, warmup):
    kw = {"iters": dict(lr_warmup_iters=10), "fraction": dict(lr_warmup_fraction=0.1),
          "none": {}}[warmup]
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_decay_style=style, **kw)
    opt = optimizer()
    sched = LRScheduler(opt, cfg, train_iters=100, global_batch_size=GBS, seq_length=SEQ)
    W = 0 if warmup == "none" else 10
    done = 0
    for n in STEPS:
        sched.step(n - done)
        done = n
        want = expected(style, n, W, W, 100)
        assert sched.get_lr() == pytest.approx(want, rel=1e-12, abs=1e-15), n
        assert [g["lr"] for g in opt.param_groups] == [sched.get_lr()] * 2


def test_lr_decay_iters_overrides_train_iters():
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_warmup_iters=10, lr_decay_iters=50)
    sched = LRScheduler(optimizer(), cfg, train_iters=1000, global_batch_size=GBS, seq_length=SEQ)
    for n in range(1, 80):
        sched.step()
        assert sched.get_lr() == pytest.approx(expected("linear", n, 10, 10, 50), rel=1e-12)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_token_warmup_and_decay(style):
    """--lr-warmup-tokens / --lr-decay-tokens: progress in tokens, with uneven token counts."""
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_decay_style=style, lr_warmup_tokens=300,
                          lr_decay_tokens=3000)
    sched = LRScheduler(optimizer(), cfg, train_iters=None, global_batch_size=GBS, seq_length=SEQ)
    tokens = 0
    for i in range(140):
        t = None if i % 3 else 17 + i          # default GBS * SEQ = 32, or an explicit count
        sched.step(tokens=t)
        tokens += GBS * SEQ if t is None else t
        assert sched.num_tokens == tokens
        assert sched.get_lr() == pytest.approx(expected(style, tokens, 300, 300, 3000),
                                               rel=1e-12, abs=1e-15), i


def test_token_decay_after_iteration_warmup():
    """Megatron-DeepSpeed: iteration warmup, then token decay from the tokens seen at its end."""
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_decay_style="cosine", lr_warmup_iters=5,
                          lr_decay_tokens=2000)
    sched = LRScheduler(optimizer(), cfg, train_iters=None, global_batch_size=GBS, seq_length=SEQ)
    tokens, start = 0, None
    for n in range(1, 60):
        t = 10 * n
        sched.step(tokens=t)
        tokens += t
        if n == 5:
            start = tokens
        want = LR * n / 5 if n <= 5 else expected("cosine", tokens, 0, start, 2000)
        assert sched.get_lr() == pytest.approx(want, rel=1e-12, abs=1e-15), n


def test_token_fraction_warmup_is_a_fraction_of_decay_tokens():
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_warmup_fraction=0.25, lr_decay_tokens=1280)
    sched = LRScheduler(optimizer(), cfg, train_iters=7, global_batch_size=GBS, seq_length=SEQ)
    for n in range(1, 50):
        sched.step()
        assert sched.get_lr() == pytest.approx(expected("linear", 32 * n, 320, 320, 1280),
                                               rel=1e-12, abs=1e-15)


def test_lr_mult_and_every_group():
    opt = optimizer(3)
    opt.param_groups[1]["lr_mult"] = 0.5
    sched = LRScheduler(opt, OptimizerConfig(lr=LR), train_iters=10, global_batch_size=1,
                        seq_length=1)
    sched.step(3)
    lr = sched.get_lr()
    assert [g["lr"] for g in opt.param_groups] == [lr, 0.5 * lr, lr]


def test_state_round_trip_resumes_exactly():
    cfg = OptimizerConfig(lr=LR, min_lr=MIN_LR, lr_decay_style="cosine", lr_warmup_iters=4,
                          lr_decay_tokens=5000)
    a = LRScheduler(optimizer(), cfg, train_iters=None, global_batch_size=GBS, seq_length=SEQ)
    for n in range(9):
        a.step(tokens=50 + 7 * n)
    state = copy.deepcopy(a.state_dict())
    opt_b = optimizer()
    b = LRScheduler(opt_b, cfg, train_iters=None, global_batch_size=GBS, seq_length=SEQ)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    assert [g["lr"] for g in opt_b.param_groups] == [a.get_lr()] * 2
    for n in range(40):
        assert a.step(tokens=60 + n) == b.step(tokens=60 + n)
    assert b.state_dict() == a.state_dict()


def _namespace(**overrides):
    return types.SimpleNamespace(**{**asdict(OptimizerConfig(lr=LR)), **overrides})


@pytest.mark.parametrize("overrides, train_iters, flag", [
    (dict(lr_decay_style="exponential"), 100, "--lr-decay-style"),
    (dict(lr_warmup_iters=100), 100, "--lr-warmup-iters"),
    (dict(lr_warmup_iters=150), 100, "--lr-warmup-iters"),
    (dict(lr_warmup_iters=20, lr_decay_iters=10), 100, "--lr-warmup-iters"),
    (dict(lr_warmup_tokens=5000, lr_decay_tokens=4000), 100, "--lr-warmup-tokens"),
    (dict(lr_warmup_fraction=1.0), 100, "--lr-warmup-fraction"),
    (dict(lr_warmup_tokens=10), 100, "--lr-decay-tokens"),
    (dict(), None, "--train-iters"),
    (dict(min_lr=1.0), 100, "--min-lr"),
])
def test_errors_name_the_flag(overrides, train_iters, flag):
    with pytest.raises(ValueError, match=flag):
        LRScheduler(optimizer(), _namespace(**overrides), train_iters, GBS, SEQ)


def test_constant_allows_warmup_over_the_whole_run():
    cfg = OptimizerConfig(lr=LR, lr_decay_style="constant", lr_warmup_iters=10)
    sched = LRScheduler(optimizer(), cfg, train_iters=10, global_batch_size=GBS, seq_length=SEQ)
    sched.step(10)
    assert sched.get_lr() == LR
