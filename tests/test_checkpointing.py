"""Checkpoints around a real DeepSpeed engine (CPU, gloo, world size 1, ZeRO 0 and 1).

Save -> load into a fresh engine must restore the model, Adam moments, LR schedule, RNGs,
iteration and consumed samples exactly: the next steps' losses are bitwise equal. Crashes are
simulated by making one step of the save raise; the last complete checkpoint must still load.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import random

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
from tests.helpers import free_port

MBS = 4
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


@pytest.fixture(scope="module")
def deepspeed():
    """deepspeed with a gloo process group of one rank; the environment is restored after."""
    ds = pytest.importorskip("deepspeed")
    mp = pytest.MonkeyPatch()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    for key, value in env.items():
        mp.setenv(key, value)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it creates its
    # communication backend; we use plain gloo and must not build DeepSpeed ops.
    mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    ds.init_distributed(dist_backend="gloo")
    yield ds
    if torch.distributed.is_initialized():
        # DeepSpeed's destroy also drops the groups it cached (a clone of the world group);
        # torch's alone leaves them stale, and the next module's engine fails on them.
        ds.comm.destroy_process_group()
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


def tiny_gpt_config(**moe_changes) -> GPTConfig:
    moe = MoEConfig(**{**dict(router="threshold", threshold=0.6, ffn_hidden_size=8,
                              drop_tokens=False), **moe_changes})
    return GPTConfig(num_layers=2, hidden_size=16, num_attention_heads=2, padded_vocab_size=32,
                     max_position_embeddings=8, ffn_hidden_size=24, num_experts=(4,),
                     expert_interval=1, hidden_dropout=0.1, attention_dropout=0.1, moe=moe)


def tiny_gpt() -> GPTModel:
    return GPTModel(tiny_gpt_config())


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
            _crash_when(m, os, "replace",
                        lambda src, *rest: TRACKER_FILENAME in os.path.basename(src))
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


@pytest.mark.slow
def test_two_ranks_zero1(tmp_path):
    pytest.importorskip("deepspeed")
    torch.multiprocessing.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    # DeepSpeed also copies its ZeRO recovery scripts next to the checkpoints.
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", TRACKER_FILENAME, "zero_to_fp32.py",
                                            "zero_to_torch.py"]
    assert sorted(os.listdir(tmp_path / "iter_0000002")) == [
        "mp_rank_00_model_states.pt", "xmoe_checkpoint.json",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


# ----------------------------------------------------------------------------------------------
# refusing what cannot be loaded, and saves that fail (megatron/checkpoint_check.py)

MODEL_FILE = "mp_rank_00_model_states.pt"


def _two_checkpoints(deepspeed, tmp_path, kind="small", args=None):
    """A run with checkpoints at iterations 1 and 2 in tmp_path (the pointer names 2)."""
    run = Run(deepspeed, kind, 0, seed=0)
    for iteration in (1, 2):
        run.step()
        save_checkpoint(run.engine, iteration, 4 * iteration, run.sched, args or {}, tmp_path)
    return run


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_checkpoints_without_pointer_are_refused(deepspeed, tmp_path):
    """iter_* copied without latest_checkpointed_iteration.txt: one line naming the newest
    complete checkpoint and the command that resumes it, instead of training from scratch."""
    _two_checkpoints(deepspeed, tmp_path)
    (tmp_path / TRACKER_FILENAME).unlink()
    fresh = Run(deepspeed, "small", 0, seed=1)
    before = fresh.params()
    pointer = tmp_path / TRACKER_FILENAME
    with pytest.raises(ValueError) as e:
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path))
    assert str(e.value) == (
        f"--load {tmp_path} holds 2 checkpoints (iter_0000001 ... iter_0000002) but no "
        f"{TRACKER_FILENAME}: to resume from the newest complete one, iter_0000002, run "
        f"`echo 2 > {pointer}`; to start afresh, move them out of {tmp_path}")
    assert_same(fresh.params(), before)
    # the newest is incomplete: the one before it is named
    _truncate(tmp_path / "iter_0000002" / MODEL_FILE, 100)
    with pytest.raises(ValueError, match=r"newest complete one, iter_0000001, run `echo 1 > "):
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path))
    _truncate(tmp_path / "iter_0000001" / MODEL_FILE, 0)
    with pytest.raises(ValueError, match=r"none is complete .*iter_0000002.*is incomplete"):
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path))
    assert not pointer.exists()


@pytest.mark.parametrize("size", [0, 1000])
def test_truncated_model_file_is_named_with_the_newest_intact(deepspeed, tmp_path, size):
    """A model file cut short (a kill during a save by another tool): the file is named before
    DeepSpeed's torch.load throws, with the newest intact checkpoint and how to use it."""
    _two_checkpoints(deepspeed, tmp_path)
    path = tmp_path / "iter_0000002" / MODEL_FILE
    _truncate(path, size)
    fresh = Run(deepspeed, "small", 0, seed=1)
    with pytest.raises(ValueError) as e:
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path))
    message = str(e.value)
    assert message.startswith(f"{path} is incomplete ("), message
    assert message.endswith(f"the newest intact checkpoint in {tmp_path} is iter_0000001: to "
                            f"resume from it, run `echo 1 > {tmp_path / TRACKER_FILENAME}`")
    _truncate(tmp_path / "iter_0000001" / MODEL_FILE, 10)
    with pytest.raises(ValueError, match=f"no intact checkpoint in {tmp_path}$"):
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path))


def test_model_flags_that_differ_from_the_checkpoint_are_named(deepspeed, tmp_path, caplog):
    """Every model-shaping flag that differs is named with both values, in one line, before
    DeepSpeed's load (which would print one `size mismatch` per tensor); routing settings that
    do not change the parameters (--threshold) may differ."""
    saved = dataclasses.asdict(tiny_gpt_config())
    _two_checkpoints(deepspeed, tmp_path, "gpt", {"model": saved, "seed": 1})
    other = dataclasses.replace(tiny_gpt_config(ffn_hidden_size=16), num_experts=(8,),
                                num_layers=3)
    fresh = Run(deepspeed, "gpt", 0, seed=1)
    before = fresh.params()
    with pytest.raises(ValueError) as e:
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path),
                        model_args=dataclasses.asdict(other))
    assert str(e.value) == (
        f"--load {tmp_path / 'iter_0000002'} was saved with other model flags: --num-layers 2 "
        "(this run: 3), --num-experts 4 (this run: 8), --moe-ffn-hidden-size 8 (this run: 16); "
        "pass the checkpoint's values")
    assert_same(fresh.params(), before)
    changed_routing = dataclasses.asdict(tiny_gpt_config(threshold=0.3, router="topk"))
    with caplog.at_level("WARNING", logger="megatron.checkpoint_check"):
        assert load_checkpoint(fresh.engine, fresh.sched, str(tmp_path),
                               model_args=changed_routing) == (2, 8)
    assert f"{tmp_path / 'iter_0000002'} was trained with --use-threshold (this run: " \
           "--use-topk)" in caplog.text
    # a checkpoint whose layout file predates the saved model flags: read from the model file
    layout = tmp_path / "iter_0000002" / "xmoe_checkpoint.json"
    layout.write_text('{"version": 1, "expert_parallel_size": 1, "weights_only": false}\n')
    with pytest.raises(ValueError, match=r"--num-experts 4 \(this run: 8\)"):
        load_checkpoint(fresh.engine, fresh.sched, str(tmp_path),
                        model_args=dataclasses.asdict(other))


def test_model_differences_follow_the_parameters():
    """Placement (--num-experts 4 == 4 4 on two MoE layers), dense-only flags on MoE-only
    models, the hash router's table, routing settings reported apart."""
    from megatron.checkpoint_args import model_differences

    def model(**changes):
        moe = changes.pop("moe", {})
        cfg = dataclasses.replace(tiny_gpt_config(**moe), **changes)
        return json.loads(json.dumps(dataclasses.asdict(cfg)))    # as read from the layout file

    base = model()
    assert model_differences(base, model(num_experts=(4, 4))) == ([], [])
    assert model_differences(base, model(ffn_hidden_size=48)) == ([], [])   # no dense layer
    assert model_differences(base, model(expert_interval=2)) == (
        ["--expert-interval 1 (this run: 2)"], [])
    assert model_differences(base, model(moe={"router": "hash", "vocab_size": 32}))[0] == [
        "--use-threshold (this run: --use-hash-layer)"]
    assert model_differences(base, model(moe={"threshold": 0.9})) == (
        [], ["--threshold 0.6 (this run: 0.9)"])
    assert model_differences(base, model(max_position_embeddings=16, padded_vocab_size=64))[0] \
        == ["--max-position-embeddings 8 (this run: 16; it defaults to --seq-length)",
            "padded vocabulary size 32 (this run: 64; set by --vocab-file and "
            "--make-vocab-size-divisible-by)"]
    dense = model(num_experts=(1,))
    assert model_differences(dense, model(num_experts=(1,), expert_interval=2,
                                          moe={"ffn_hidden_size": 99})) == ([], [])
    assert model_differences(dense, base)[0] == ["--num-experts 1 (this run: 4)"]
    older = {k: v for k, v in base.items() if k != "num_attention_heads"}
    assert model_differences(older, model(num_attention_heads=4)) == ([], [])
    # The GeLU form computes another function with the same tensors: refused. A saved model
    # without the field predates it and used exact erf (--no-bias-gelu-fusion).
    assert base["activation"] == "gelu_tanh"
    assert model_differences(base, model(activation="gelu"))[0] == [
        "the default GeLU (tanh, bias-gelu fusion) (this run: --no-bias-gelu-fusion (exact erf "
        "GeLU))"]
    pre_gelu_field = {k: v for k, v in base.items() if k != "activation"}
    assert model_differences(pre_gelu_field, model(activation="gelu")) == ([], [])
    assert model_differences(pre_gelu_field, base)[0] == [
        "--no-bias-gelu-fusion (exact erf GeLU) (this run: the default GeLU (tanh, bias-gelu "
        "fusion))"]


_TORCH_WRITE_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("failure", ["torch_writer", "layout", "pointer"])
def test_save_without_space_is_one_line_and_keeps_the_last_checkpoint(
        deepspeed, tmp_path, monkeypatch, failure):
    """ENOSPC while saving: torch's writer (which reports it as `enforce fail at
    inline_container.cc`), our layout file, or the pointer. One line names the iteration and
    the directory; the partial tmp_iter_* is removed; the last checkpoint and pointer stay."""
    from megatron import checkpoint_check, expert_checkpoint
    from megatron.checkpoint_check import CheckpointWriteError

    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    good = run.params()
    run.step()
    no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        if failure == "torch_writer":         # a file half written, then torch's RuntimeError
            real_save = run.engine.save_checkpoint

            def full_disk(save_dir, tag, **kwargs):
                real_save(save_dir, tag=tag, **kwargs)
                _truncate(os.path.join(save_dir, tag, MODEL_FILE), 300)
                raise RuntimeError(_TORCH_WRITE_ERROR)
            m.setattr(run.engine, "save_checkpoint", full_disk)
            m.setattr(checkpoint_check, "free_bytes", lambda path: 0)
        elif failure == "layout":
            def no_layout(*args, **kwargs):
                raise no_space
            m.setattr(checkpointing, "write_layout", no_layout)
            m.setattr(expert_checkpoint, "write_layout", no_layout)
        else:
            real_replace = os.replace

            def pointer_fails(src, dst, *args, **kwargs):
                if TRACKER_FILENAME in os.path.basename(src):
                    raise no_space
                return real_replace(src, dst, *args, **kwargs)
            m.setattr(os, "replace", pointer_fails)
        with pytest.raises(CheckpointWriteError) as e:
            save_checkpoint(run.engine, 2, 8, run.sched, {}, str(tmp_path))
    assert str(e.value) == f"no space left on device while saving iteration 2 to {tmp_path}"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER_FILENAME]
    assert (tmp_path / TRACKER_FILENAME).read_text() == "1\n"
    fresh = Run(deepspeed, "small", 0, seed=1)
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(fresh.params(), good)


def test_a_failed_re_save_of_the_pointed_iteration_keeps_the_old_copy(deepspeed, tmp_path,
                                                                      monkeypatch):
    from megatron.checkpoint_check import CheckpointWriteError

    run = Run(deepspeed, "small", 0, seed=0)
    run.step()
    save_checkpoint(run.engine, 1, 4, run.sched, {}, tmp_path)
    good = run.params()
    run.step()
    real_replace = os.replace

    def pointer_fails(src, dst, *args, **kwargs):
        if TRACKER_FILENAME in os.path.basename(src):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", pointer_fails)
    with pytest.raises(CheckpointWriteError, match="^disk quota exceeded while saving "
                                                   "iteration 1 to "):
        save_checkpoint(run.engine, 1, 4, run.sched, {}, str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", TRACKER_FILENAME]
    fresh = Run(deepspeed, "small", 0, seed=1)
    assert load_checkpoint(fresh.engine, fresh.sched, tmp_path) == (1, 4)
    assert_same(fresh.params(), good)


def test_save_dir_of_another_run_is_refused(deepspeed, tmp_path):
    """--save DIR holding checkpoints this run did not load, or newer than the iteration it
    starts from, is refused before training (a save would overwrite them or move the pointer);
    a directory this run owns has its stale tmp_iter_* removed."""
    from megatron.checkpointing import prepare_save_dir

    ckpt = tmp_path / "ckpt"
    _two_checkpoints(deepspeed, ckpt)
    prepare_save_dir(str(tmp_path / "new"), load_dir=None, loaded_iteration=None)  # absent: fine
    with pytest.raises(ValueError) as e:
        prepare_save_dir(str(ckpt), load_dir=None, loaded_iteration=None)
    assert str(e.value) == (
        f"--save {ckpt} already holds checkpoints this run did not load (iter_0000001 ... "
        f"iter_0000002): pass --load {ckpt} to resume from them, or give --save an empty "
        "directory")
    with pytest.raises(ValueError, match="this run did not load"):
        prepare_save_dir(str(ckpt), load_dir=str(tmp_path / "elsewhere"), loaded_iteration=None)
    with pytest.raises(ValueError) as e:        # --finetune from the newest: starts at 0
        prepare_save_dir(str(ckpt), load_dir=str(ckpt), loaded_iteration=0)
    assert str(e.value) == (
        f"--save {ckpt} holds iter_0000001 ... iter_0000002, newer than iteration 0 this run "
        f"starts from: a save would overwrite them; move them out of {ckpt}")
    (ckpt / TRACKER_FILENAME).write_text("1\n")     # rolled back to 1 by hand
    with pytest.raises(ValueError) as e:
        prepare_save_dir(str(ckpt), load_dir=str(ckpt), loaded_iteration=1)
    assert str(e.value) == (
        f"--save {ckpt} holds iter_0000002, newer than iteration 1 this run starts from: a save "
        f"would overwrite it; move it out of {ckpt} (or resume from the newest with `echo 2 > "
        f"{ckpt / TRACKER_FILENAME}`)")
    (ckpt / TRACKER_FILENAME).write_text("2\n")
    (ckpt / "tmp_iter_0000003").mkdir()
    (ckpt / "tmp_iter_0000003" / MODEL_FILE).write_bytes(b"PK")
    prepare_save_dir(str(ckpt), load_dir=str(ckpt) + "/", loaded_iteration=2)
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "iter_0000002", TRACKER_FILENAME]
    (tmp_path / "debris" / "tmp_iter_0000001").mkdir(parents=True)   # no checkpoint: fresh
    prepare_save_dir(str(tmp_path / "debris"), load_dir=None, loaded_iteration=None)
    assert os.listdir(tmp_path / "debris") == []


def test_saved_layout_records_the_model_flags(deepspeed, tmp_path):
    model = dataclasses.asdict(tiny_gpt_config())
    run = Run(deepspeed, "gpt", 0, seed=0)
    run.step()
    path = save_checkpoint(run.engine, 1, 4, run.sched, {"model": model}, tmp_path)
    layout = json.loads((tmp_path / "iter_0000001" / "xmoe_checkpoint.json").read_text())
    assert layout["model"] == json.loads(json.dumps(model))
    assert path == str(tmp_path / "iter_0000001")


def _refusing_worker(rank: int, port: int, root: str) -> None:
    """Rank 0 looks at a directory of unpointed checkpoints, rank 1 at an empty one: both must
    raise rank 0's error (rank 1 would otherwise go on and wait in the next collective)."""
    import datetime

    from megatron.checkpointing import prepare_save_dir

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    directory = os.path.join(root, "ckpt" if rank == 0 else "empty")
    messages = []
    for call in (lambda: load_checkpoint(None, None, directory),
                 lambda: prepare_save_dir(directory, None, None)):
        try:
            call()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    with open(os.path.join(root, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(messages))
    torch.distributed.destroy_process_group()


def test_every_rank_raises_rank_0s_verdict(tmp_path):
    (tmp_path / "ckpt" / "iter_0000003").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    torch.save({}, tmp_path / "ckpt" / "iter_0000003" / MODEL_FILE)
    torch.multiprocessing.spawn(_refusing_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0 == rank1
    assert rank0[0].startswith(f"--load {tmp_path / 'ckpt'} holds 1 checkpoint (iter_0000003) "
                               "but no ")
    assert rank0[1].startswith(f"--save {tmp_path / 'ckpt'} already holds checkpoints")


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_sees_the_model_output_and_runs_its_backward_prologue(deepspeed, stage,
                                                                       monkeypatch):
    """engine.forward hooks DeepSpeed's backward prologue (ZeRO's gradient-accumulation
    bookkeeping, its timers) onto the output's tensors; with an output type it cannot look
    into, the prologue never ran (and wall_clock_breakdown crashed)."""
    run = Run(deepspeed, "gpt", stage, seed=0)
    calls = []
    real = run.engine._backward_prologue
    monkeypatch.setattr(run.engine, "_backward_prologue", lambda: (calls.append(1), real()))
    run.step()
    run.step()
    assert len(calls) == 2
