"""The expert-parallel part of a checkpoint: every rank's expert shard, and the checkpoint's layout.

DeepSpeed's model file (`mp_rank_00_model_states.pt`, written by rank 0) holds the whole model
with expert parallelism N = 1, but with N > 1 only rank 0's experts (the engine's own per-expert
files exist only for its own MoE class). So with N > 1 the first rank of each expert-data-
parallel group also writes

    iter_0000100/expert_parallel_rank_001_of_004.pt   {"expert_parallel_size": 4, "rank": 1,
                                                        "tensors": {name: [E / N, ...] tensor}}

and rank 0 writes `iter_0000100/xmoe_checkpoint.json` ({"expert_parallel_size": N,
"weights_only": false, "model": {the run's model flags}}), read before loading to refuse a
layout that does not fit the run (a checkpoint without it is an N = 1 checkpoint) and model
flags that differ (megatron/checkpoint_check.py, which also reads it and names the files).
tools/convert_expert_parallel_checkpoint.py changes N, writing a weights-only checkpoint (the
optimizer state is partitioned by world size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, Optional

import torch
from torch import nn

from megatron.checkpoint_check import (  # noqa: F401  (re-exported: the file names, the reader)
    LAYOUT_FILENAME, LAYOUT_VERSION, MODEL_FILENAME, read_layout, shard_filename)
from megatron.fileio import atomic_write
from megatron.model.moe import named_expert_parameters


def write_layout(tag_dir: str, expert_parallel_size: int, weights_only: bool = False,
                 model: Optional[Dict[str, Any]] = None) -> None:
    """Write the layout file; `model`: the run's model flags (RunConfig.model as a dict), read
    back to name the flags a later run changed (megatron/checkpoint_check.check_model_args)."""
    layout: Dict[str, Any] = {"version": LAYOUT_VERSION,
                              "expert_parallel_size": expert_parallel_size,
                              "weights_only": weights_only}
    if model is not None:
        layout["model"] = model
    with atomic_write(os.path.join(tag_dir, LAYOUT_FILENAME), "w") as f:
        json.dump(layout, f, default=str)     # a value JSON cannot hold is kept as text
        f.write("\n")


def check_layout(tag_dir: str, expert_parallel_size: int) -> dict:
    """The layout, or ValueError if it was saved under another expert-parallel size."""
    layout = read_layout(tag_dir)
    saved = int(layout["expert_parallel_size"])
    if saved != expert_parallel_size:
        raise ValueError(
            f"{tag_dir} was saved with --moe-expert-parallel-size {saved}; this run uses "
            f"{expert_parallel_size}. Convert it first: python "
            f"tools/convert_expert_parallel_checkpoint.py --load {os.path.dirname(tag_dir)} "
            f"--save NEW_DIR --target-expert-parallel-size {expert_parallel_size}")
    return layout


def write_shard(tag_dir: str, rank: int, size: int, tensors: Dict[str, torch.Tensor]) -> str:
    """Write one shard file atomically; returns its path."""
    path = os.path.join(tag_dir, shard_filename(rank, size))
    with atomic_write(path) as f:
        torch.save({"expert_parallel_size": size, "rank": rank, "tensors": tensors}, f)
    return path


def read_shard(tag_dir: str, rank: int, size: int) -> Dict[str, torch.Tensor]:
    """The tensors of one shard file; FileNotFoundError naming it if absent."""
    path = os.path.join(tag_dir, shard_filename(rank, size))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint lacks expert-parallel rank "
                                f"{rank}'s experts")
    return torch.load(path, map_location="cpu", weights_only=True)["tensors"]


def save_expert_shard(model: nn.Module, tag_dir: str, rank: int, size: int) -> str:
    """Write this rank's expert tensors (CPU copies); returns the path."""
    tensors = {name: p.detach().cpu().clone() for name, p in named_expert_parameters(model).items()}
    return write_shard(tag_dir, rank, size, tensors)


def load_expert_shard(model: nn.Module, tag_dir: str, rank: int, size: int) -> None:
    """Copy this rank's expert tensors from the checkpoint into the model's parameters."""
    where = os.path.join(tag_dir, shard_filename(rank, size))
    tensors = read_shard(tag_dir, rank, size)
    params = named_expert_parameters(model)
    if set(tensors) != set(params):
        raise ValueError(f"{where}: expert tensors {sorted(set(tensors) ^ set(params))} do not "
                         "match the model")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ValueError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the "
                                 f"model's is {tuple(p.shape)}")
            p.copy_(tensors[name])


# ----------------------------------------------------------------------------------------------
# conversion between expert-parallel sizes

_EXPERT_KEY = re.compile(r"(^|\.)experts\.(w1|w2|b1|b2)$")


def full_expert_tensors(tag_dir: str, module_state: Dict[str, torch.Tensor], size: int
                        ) -> Dict[str, torch.Tensor]:
    """{name: tensor over all E experts}: from the model file (size 1) or the shard files."""
    names = [k for k in module_state if _EXPERT_KEY.search(k)]
    if size == 1:
        return {k: module_state[k] for k in names}
    shards = [read_shard(tag_dir, r, size) for r in range(size)]
    for r, shard in enumerate(shards):
        if set(shard) != set(names):
            raise ValueError(f"{os.path.join(tag_dir, shard_filename(r, size))}: expert tensors "
                             f"{sorted(set(shard) ^ set(names))} do not match {MODEL_FILENAME}")
    return {k: torch.cat([shard[k] for shard in shards]) for k in names}


def convert_checkpoint(load_dir: str, tag: str, save_dir: str, target_size: int) -> str:
    """Write `save_dir`/`tag` (weights only) holding checkpoint `load_dir`/`tag` re-split for
    expert-parallel size `target_size`; returns the new tag directory.

    The optimizer state is left behind: DeepSpeed partitions it by world size and ZeRO stage,
    so a converted checkpoint resumes with fresh optimizer state (meant for evaluation or
    fine-tuning). Iteration, LR schedule and arguments are kept.
    """
    from megatron.checkpointing import publish_checkpoint_dir  # circular at import time

    tag_dir = os.path.join(load_dir, tag)
    model_path = os.path.join(tag_dir, MODEL_FILENAME)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path} not found: not a checkpoint directory")
    size = int(read_layout(tag_dir)["expert_parallel_size"])
    # DeepSpeed's model file holds plain Python objects (its config) besides tensors.
    state = torch.load(model_path, map_location="cpu", weights_only=False)
    module = dict(state["module"])
    full = full_expert_tensors(tag_dir, module, size)
    if not full:
        raise ValueError(f"{model_path} holds no MoE expert tensors: nothing to convert")
    for name, tensor in full.items():
        if tensor.shape[0] % target_size:
            raise ValueError(f"{name} has {tensor.shape[0]} experts, not divisible by "
                             f"--target-expert-parallel-size {target_size}")
    shards = [{k: t.chunk(target_size)[r].clone() for k, t in full.items()}
              for r in range(target_size)]
    module.update(shards[0])
    num_experts = max(t.shape[0] for t in full.values())
    state.update(module=module, optimizer=None, num_experts=[num_experts])
    _set_expert_parallel_arg(state, target_size)

    tmp_tag = "tmp_" + tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    with atomic_write(os.path.join(tmp_dir, MODEL_FILENAME)) as f:
        torch.save(state, f)
    if target_size > 1:
        for r, tensors in enumerate(shards):
            write_shard(tmp_dir, r, target_size, tensors)
    write_layout(tmp_dir, target_size, weights_only=True, model=_saved_model_flags(state))
    iteration = int(state.get("iteration", 0))
    publish_checkpoint_dir(save_dir, tmp_tag, tag, iteration)
    return os.path.join(save_dir, tag)


def _saved_model_flags(state: dict) -> Optional[Dict[str, Any]]:
    """The model flags in the saved arguments (client state "args", as RunConfig dicts)."""
    model = state.get("args", {}).get("model")
    return model if isinstance(model, dict) else None


def _set_expert_parallel_arg(state: dict, size: int) -> None:
    """Record the new size in the saved arguments (client state "args", as RunConfig dicts)."""
    moe = state.get("args", {}).get("model", {}).get("moe")
    if isinstance(moe, dict) and "expert_parallel_size" in moe:
        moe["expert_parallel_size"] = size
