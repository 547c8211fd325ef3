"""Checkpoints around a real DeepSpeed engine (CPU, gloo, world size 1, ZeRO 0 and 1).

Save -> load into a fresh engine must restore the model, Adam moments, LR schedule, RNGs,
iteration and consumed samples exactly: the next steps' losses are bitwise equal. Crashes are
simulated by making one step of the save raise; the last complete checkpoint must still load.
"""

from __future__ import annotations

import importlib
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron import checkpointing
from megatron.checkpointing import TRACKER_FILENAME, load_checkpoint, save_checkpoint
from megatron.config import GPTConfig, MoEConfig, OptimizerConfig
from megatron.learning_rates import LRScheduler
from megatron.model import GPTModel
from megatron.optimizer import build_optimizer
from megatron.random_state import get_rng_state

MBS = 4
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed():
    """deepspeed with a gloo process group of one rank; the environment is restored after."""
    ds = pytest.importorskip("deepspeed")
    mp = pytest.MonkeyPatch()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    for key, value in env.items():
        mp.setenv(key, value)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it creates its
    # communication backend; we use plain gloo and must not build DeepSpeed ops.
    mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    ds.init_distributed(dist_backend="gloo")
    yield ds
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    mp.undo()


class Small(nn.Module):
    """Linear -> ReLU -> dropout (draws on the torch RNG) -> LayerNorm -> Linear, MSE loss."""

    def __init__(self):
        super().__init__()
        self.l1, self.drop = nn.Linear(8, 16), nn.Dropout(0.3)
        self.norm, self.l2 = nn.LayerNorm(16), nn.Linear(16, 1)

    def forward(self, x, y):
        return F.mse_loss(self.l2(self.norm(self.drop(F.relu(self.l1(x))))).squeeze(-1), y)


def small_batch():
    """Draws on all three RNGs, so a wrongly restored one changes the data."""
    x = torch.randn(MBS, 8) + float(np.random.rand()) + random.random()
    return (x, x.sum(-1))


def tiny_gpt() -> GPTModel:
    moe = MoEConfig(router="threshold", threshold=0.6, ffn_hidden_size=8, drop_tokens=False)
    cfg = GPTConfig(num_layers=2, hidden_size=16, num_attention_heads=2, padded_vocab_size=32,
                    max_position_embeddings=8, ffn_hidden_size=24, num_experts=(4,),
                    expert_interval=1, hidden_dropout=0.1, attention_dropout=0.1, moe=moe)
    return GPTModel(cfg)


def gpt_batch():
    ids = torch.randint(0, 32, (MBS, 8))
    return (ids, torch.roll(ids, -1, dims=1))


def gpt_loss(engine, ids, labels):
    out = engine(ids, labels=labels)
    return out.loss.mean() + out.moe_aux_loss


class Run:
    """A DeepSpeed engine with our AdamW groups and LR scheduler, and a training step."""

    def __init__(self, deepspeed, kind: str, stage: int, seed: int):
        torch.manual_seed(seed)
        self.kind = kind
        model = Small() if kind == "small" else tiny_gpt()
        opt_cfg = OptimizerConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, lr_warmup_iters=2,
                                  lr_decay_style="cosine", create_moe_param_group=kind == "gpt")
        self.opt = build_optimizer(model, opt_cfg)
        ds_config = {"train_micro_batch_size_per_gpu": MBS, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                     "steps_per_print": 10 ** 9}
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.opt, config=ds_config)
        # The base optimizer's param groups are the ones stepped, with or without ZeRO.
        self.sched = LRScheduler(self.opt, opt_cfg, train_iters=20, global_batch_size=MBS,
                                 seq_length=8)

    def step(self) -> float:
        if self.kind == "small":
            loss = self.engine(*small_batch())
        else:
            loss = gpt_loss(self.engine, *gpt_batch())
        self.engine.backward(loss)
        self.engine.step()
        self.sched.step()
        return loss.item()

    def params(self):
        return {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}

    def adam_state(self):
        """Per optimizer parameter (flat fp32 partitions under ZeRO): step and both moments."""
        return [{k: torch.as_tensor(v).clone() for k, v in self.opt.state[p].items()}
                for g in self.opt.param_groups for p in g["params"]]


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    else:
        assert a == b


@pytest.mark.parametrize("kind, stage", [("small", 0), ("small", 1), ("gpt", 0), ("gpt", 1)])
def test_save_load_resumes_exactly(deepspeed, tmp_path, kind, stage):
    a = Run(deepspeed, kind, stage, seed=0)
    for _ in range(3):
        a.step()
    saved = dict(params=a.params(), adam=a.adam_state(), sched=a.sched.state_dict(),
                 rng=get_rng_state(), lr=[g["lr"] for g in a.opt.param_groups])
    save_checkpoint(a.engine, 3, 3 * MBS, a.sched, {"lr": 1e-2, "zero_stage": stage}, tmp_path)
    assert_same(get_rng_state(), saved["rng"])          # saving draws no random numbers
    continued = [a.step() for _ in range(2)]
    final = a.params()

    b = Run(deepspeed, kind, stage, seed=1)
    assert not torch.equal(*(next(iter(p.values())) for p in (b.params(), saved["params"])))
    assert load_checkpoint(b.engine, b.sched, tmp_path) == (3, 3 * MBS)
    assert_same(b.params(), saved["params"])
    assert_same(b.adam_state(), saved["adam"])
    assert b.sched.state_dict() == saved["sched"]
    assert [g["lr"] for g in b.opt.param_groups] == saved["lr"]
    assert_same(get_rng_state(), saved["rng"])
    assert [b.step() for _ in range(2)] == continued    # bitwise: same data, masks and updates
    assert_same(b.params(), final)


def test_layout_and_pointer_file(deepspeed, tmp_path):
    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    run.step()
    path = save_checkpoint(run.engine, 100, 8, run.sched, {"seed": 1234}, tmp_path)
    assert path == os.path.join(tmp_path, "iter_0000100")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000100", TRACKER_FILENAME]
    assert (tmp_path / TRACKER_FILENAME).read_text() == "100\n"       # Megatron: one integer
    assert "mp_rank_00_model_states.pt" in os.listdir(path)
    state = torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), weights_only=False)
    assert state["iteration"] == 100 and state["consumed_samples"] == 8
    assert state["args"] == {"seed": 1234} and state["checkpoint_version"] == 1
    assert len(state["rng_state"]) == 1                  # one entry per rank


def _crash_when(monkeypatch, target, name, predicate=lambda *args: True):
    """Make target.name raise when predicate(*args) holds, like a process dying right there."""
    real = getattr(target, name)

    def dying(*args, **kwargs):
        if predicate(*args):
            raise KeyboardInterrupt(f"simulated crash in {name}{args}")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


def _source_startswith(prefix):
    return lambda src, *rest: os.path.basename(src).startswith(prefix)


@pytest.mark.parametrize("crash", ["writing", "fsync", "rename", "pointer"])
def test_crash_leaves_last_complete_checkpoint(deepspeed, tmp_path, monkeypatch, crash):
    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    good = run.params()
    run.step()
    with monkeypatch.context() as m:
        if crash == "writing":          # DeepSpeed dies after writing part of the files
            real_save = run.engine.save_checkpoint

            def partial(*args, **kwargs):
                real_save(*args, **kwargs)
                raise KeyboardInterrupt("simulated crash after the model file")
            m.setattr(run.engine, "save_checkpoint", partial)
        elif crash == "fsync":          # files written, not yet flushed or renamed
            _crash_when(m, checkpointing, "_fsync_tree")
        elif crash == "rename":
            _crash_when(m, os, "rename", _source_startswith("tmp_iter_0000002"))
        else:                           # renamed, the pointer's temp file written, not moved
            _crash_when(m, os, "replace", _source_startswith(TRACKER_FILENAME))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(run.engine, 2, 8, run.sched, {}, tmp_path)
    assert (tmp_path / TRACKER_FILENAME).read_text() == "1\n"
    fresh = Run(deepspeed, "small", 0, seed=1)
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(fresh.params(), good)
    # The next save of that iteration succeeds over the debris.
    save_checkpoint(run.engine, 2, 8, run.sched, {}, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002", TRACKER_FILENAME]
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (2, 8)


def test_crash_while_replacing_the_same_iteration(deepspeed, tmp_path, monkeypatch):
    """Re-saving the iteration the pointer names: a crash between moving the old copy aside and
    renaming the new one in leaves no iter_ directory; load puts the old copy back."""
    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    good = run.params()
    run.step()
    with monkeypatch.context() as m:
        _crash_when(m, os, "rename", _source_startswith("tmp_iter_0000001"))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    assert not (tmp_path / "iter_0000001").exists()
    fresh = Run(deepspeed, "small", 0, seed=1)
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(fresh.params(), good)
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)        # a clean re-save replaces it
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER_FILENAME]
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(fresh.params(), run.params())


def test_missing_checkpoints(deepspeed, tmp_path):
    run = Run(deepspeed, "small", 0, seed=0)
    assert load_checkpoint(run.engine, run.sched, None) is None
    assert load_checkpoint(run.engine, run.sched, str(tmp_path / "nowhere")) is None
    assert load_checkpoint(run.engine, run.sched, tmp_path) is None        # no pointer file
    (tmp_path / TRACKER_FILENAME).write_text("7\n")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
        load_checkpoint(run.engine, run.sched, tmp_path)
    (tmp_path / TRACKER_FILENAME).write_text("seven\n")
    with pytest.raises(ValueError, match="one integer"):
        load_checkpoint(run.engine, run.sched, tmp_path)


def test_no_rng_and_finetune(deepspeed, tmp_path):
    """--no-save-rng leaves the RNGs alone on load; --finetune loads weights only, iteration 0."""
    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path, save_rng=False)
    weights = run.params()
    fresh = Run(deepspeed, "small", 0, seed=1)
    rng = get_rng_state()
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(get_rng_state(), rng)
    tuned = Run(deepspeed, "small", 0, seed=2)
    sched_before = tuned.sched.state_dict()
    assert load_checkpoint(tuned.engine, tuned.sched, tmp_path, finetune=True) == (0, 0)
    assert_same(tuned.params(), weights)
    assert tuned.sched.state_dict() == sched_before
    assert not any(tuned.adam_state())                 # no optimizer state loaded


def _two_rank_worker(rank: int, port: int, ckpt_dir: str) -> None:
    """ZeRO-1 over 2 gloo ranks whose RNGs differ: each rank gets its own RNG state back."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import datetime

    import deepspeed
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    a = Run(deepspeed, "small", 1, seed=0)
    random.seed(rank), np.random.seed(rank), torch.manual_seed(100 + rank)
    a.step(), a.step()
    rng, params = get_rng_state(), a.params()
    save_checkpoint(a.engine, 2, 16, a.sched, {}, ckpt_dir)
    continued = [a.step() for _ in range(2)]
    b = Run(deepspeed, "small", 1, seed=5)
    assert load_checkpoint(b.engine, b.sched, ckpt_dir) == (2, 16)
    assert_same(get_rng_state(), rng)
    assert_same(b.params(), params)
    assert [b.step() for _ in range(2)] == continued
    torch.distributed.destroy_process_group()


def test_two_ranks_zero1(tmp_path):
    pytest.importorskip("deepspeed")
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    # DeepSpeed also copies its ZeRO recovery scripts next to the checkpoints.
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", TRACKER_FILENAME, "zero_to_fp32.py",
                                            "zero_to_torch.py"]
    assert sorted(os.listdir(tmp_path / "iter_0000002")) == [
        "mp_rank_00_model_states.pt", "xmoe_checkpoint.json",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
