"""Crash-safe training checkpoints around a DeepSpeed engine, in Megatron-DeepSpeed's layout.

    save_dir/iter_0000100/mp_rank_00_model_states.pt     (DeepSpeed: model, optimizer if not ZeRO,
    save_dir/iter_0000100/zero_pp_rank_*_optim_states.pt  our client state; ZeRO partitions)
    save_dir/latest_checkpointed_iteration.txt            (Megatron's pointer: "100\\n")

A save writes everything under a temporary tag `tmp_iter_0000100`; after all ranks finished
(barrier) rank 0 fsyncs it and renames it to `iter_0000100`, and only then moves the pointer
(temporary file + os.replace). A crash at any point therefore leaves the pointer naming the last
complete checkpoint. DeepSpeed stores no paths or tag names inside its files, so the renamed tag
loads like any other. Assumes `save_dir` is one filesystem shared by all ranks (as Megatron does).

Our state travels in DeepSpeed's client_state: iteration, consumed samples, the LR scheduler (kept
outside the engine: DeepSpeed would step it without the token count), the RNG states of every
rank (gathered to rank 0, which writes the file), the arguments and a format version.

With expert parallelism the experts of ranks other than 0 are not in DeepSpeed's model file: the
tag directory also holds one shard file per expert-parallel rank and a layout file
(megatron/expert_checkpoint.py); a load under another expert-parallel size is refused with the
conversion command.

Before DeepSpeed loads anything, rank 0 checks the directory and tells every rank the verdict
(megatron/checkpoint_check.py): iter_* without the pointer, a file cut short, model flags that
differ from the saved ones are each one ValueError line. Before a run saves, `prepare_save_dir`
refuses a --save directory whose checkpoints the run did not load. A save that fails (a full
disk) removes its tmp_iter_* and raises CheckpointWriteError ("no space left on device while
saving iteration N to DIR"); the pointer and the checkpoint it names are untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as dist

from megatron.checkpoint_check import (  # noqa: F401  (some names re-exported)
    TMP_PREFIX, TRACKER_FILENAME, CheckpointWriteError, check_loadable, check_save_dir,
    check_unpointed, checkpoint_tag, read_tracker, remove_stale_saves, tracker_path,
    write_failure)
from megatron.expert_checkpoint import (check_layout, load_expert_shard, save_expert_shard,
                                        write_layout)
from megatron.fileio import atomic_write
from megatron.random_state import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_OLD_PREFIX = "old_"        # a complete checkpoint being replaced by a new save of its iteration


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _checked_on_rank_0(check: Callable[[], None]) -> None:
    """Run `check` on rank 0 and raise its error (as ValueError) on every rank, so that all
    ranks stop together instead of the others waiting in DeepSpeed's next collective."""
    error = None
    if _rank() == 0:
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
    if _world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flush every file and directory under root (files first, then their directories)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's RNG state, indexed by global rank (all ranks must call)."""
    state = get_rng_state()
    if _world_size() == 1:
        return [state]
    states: List[Any] = [None] * _world_size()
    dist.all_gather_object(states, state)
    return states


def publish_checkpoint_dir(save_dir: str, tmp_tag: str, tag: str, iteration: int) -> None:
    """Rank 0: make tmp_tag durable, rename it to tag, then move the pointer to iteration.

    An error (no space for the pointer) puts the directories back as they were: tmp_tag (for
    the caller to remove) and the previous copy of tag, if this was a re-save.
    """
    tmp_dir, final_dir = os.path.join(save_dir, tmp_tag), os.path.join(save_dir, tag)
    _fsync_tree(tmp_dir)
    old_dir = None
    if os.path.exists(final_dir):       # saving the same iteration again: keep the old one aside
        old_dir = os.path.join(save_dir, _OLD_PREFIX + tag)
        shutil.rmtree(old_dir, ignore_errors=True)
        os.rename(final_dir, old_dir)
    renamed = False
    try:
        os.rename(tmp_dir, final_dir)
        renamed = True
        _fsync_path(save_dir)
        _write_pointer(save_dir, iteration)
    except Exception:
        if renamed:
            os.rename(final_dir, tmp_dir)
        if old_dir is not None:
            os.rename(old_dir, final_dir)
        raise
    _fsync_path(save_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir)


def _write_pointer(save_dir: str, iteration: int) -> None:
    """Replace the pointer atomically (fileio.atomic_write: temporary file, fsync, os.replace;
    the temporary is removed when the write fails)."""
    with atomic_write(tracker_path(save_dir), "w") as f:
        f.write(f"{iteration}\n")


def save_checkpoint(engine: Any, iteration: int, consumed_samples: int, lr_scheduler: Any,
                    args_dict: Dict[str, Any], save_dir: str, save_rng: bool = True,
                    expert_parallel: Any = None) -> str:
    """Save a checkpoint of iteration `iteration`; all ranks call. Returns its directory.

    engine: a DeepSpeed engine (model and optimizer; its own lr_scheduler should be None).
    lr_scheduler: megatron.learning_rates.LRScheduler or None. args_dict: the run's arguments.
    expert_parallel: the run's megatron.expert_groups.ExpertParallelGroups (None: size 1).
    A failed write (OSError, or torch's writer error) raises CheckpointWriteError after this
    rank removed tmp_iter_*; other errors are re-raised after the same cleanup.
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    tag = checkpoint_tag(iteration)
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + tag)
    client_state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "opt_param_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng_state": _gather_rng_states() if save_rng else None,
        "args": dict(args_dict or {}),
    }
    try:
        _write_and_publish(engine, save_dir, tag, iteration, client_state, expert_parallel)
    except Exception as e:
        reason = write_failure(e, save_dir)         # before the removal frees space
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if reason is None:
            raise
        raise CheckpointWriteError(f"{reason} while saving iteration {iteration} to "
                                   f"{save_dir}") from e
    _barrier()              # nobody returns before the pointer names the new checkpoint
    return os.path.join(save_dir, tag)


def _write_and_publish(engine: Any, save_dir: str, tag: str, iteration: int,
                       client_state: Dict[str, Any], expert_parallel: Any) -> None:
    """Every rank writes its files under tmp_iter_*; then rank 0 publishes them."""
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    if _rank() == 0:        # a save of this iteration a crash interrupted leaves debris
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    ep_size = 1 if expert_parallel is None else expert_parallel.size
    if ep_size > 1 and expert_parallel.data_parallel_rank == 0:
        save_expert_shard(engine.module, tmp_dir, expert_parallel.rank, ep_size)
    if _rank() == 0:
        write_layout(tmp_dir, ep_size, model=client_state["args"].get("model"))
    _barrier()              # every rank's files are written (DeepSpeed's save ends with one too)
    if _rank() == 0:
        publish_checkpoint_dir(save_dir, tmp_tag, tag, iteration)
        logger.info("saved checkpoint %s", os.path.join(save_dir, tag))


def prepare_save_dir(save_dir: str, load_dir: Optional[str], loaded_iteration: Optional[int]
                     ) -> None:
    """Before a run's first save; all ranks call. Refuses (ValueError on every rank) a --save
    directory holding checkpoints the run did not load or newer than `loaded_iteration`
    (checkpoint_check.check_save_dir), then rank 0 removes saves that never finished."""
    _checked_on_rank_0(lambda: check_save_dir(save_dir, load_dir, loaded_iteration))
    if _rank() == 0:
        for path in remove_stale_saves(save_dir):
            logger.warning("removed %s: a save that did not finish", path)
    _barrier()


def _resolve_tag_dir(load_dir: str, tag: str) -> None:
    """Rank 0 puts back a complete checkpoint a crash left aside while replacing it."""
    final_dir, old_dir = os.path.join(load_dir, tag), os.path.join(load_dir, _OLD_PREFIX + tag)
    if _rank() == 0 and not os.path.isdir(final_dir) and os.path.isdir(old_dir):
        logger.warning("restoring %s from an interrupted re-save (%s)", final_dir, old_dir)
        os.rename(old_dir, final_dir)
    _barrier()
    if not os.path.isdir(final_dir):
        raise FileNotFoundError(f"{tracker_path(load_dir)} names checkpoint {tag!r}, but "
                                f"{final_dir} does not exist")


def load_checkpoint(engine: Any, lr_scheduler: Any, load_dir: Optional[str],
                    load_optimizer: bool = True, load_rng: bool = True,
                    finetune: bool = False, expert_parallel: Any = None,
                    model_args: Optional[Dict[str, Any]] = None) -> Optional[Tuple[int, int]]:
    """Restore the checkpoint the pointer names; all ranks call.

    Returns (iteration, consumed_samples), or None (start fresh) when load_dir does not exist or
    holds no checkpoint. iter_* without the pointer, an incomplete checkpoint, or `model_args`
    (the run's RunConfig.model as a dict) differing from the saved model flags raise ValueError
    before anything is loaded. finetune loads the model weights only and returns (0, 0). A
    weights-only checkpoint (written by the expert-parallel conversion tool) restores weights,
    iteration, schedule and RNG, and starts the optimizer state afresh.
    """
    if load_dir is None or not os.path.isdir(load_dir):
        logger.warning("no checkpoint directory %r: starting from scratch", load_dir)
        return None
    tag = read_tracker(load_dir)
    if tag is None:
        _checked_on_rank_0(lambda: check_unpointed(load_dir))
        logger.warning("no %s in %s: starting from scratch", TRACKER_FILENAME, load_dir)
        return None
    _resolve_tag_dir(load_dir, tag)
    tag_dir = os.path.join(load_dir, tag)
    _checked_on_rank_0(lambda: check_loadable(load_dir, tag, model_args))
    ep_size = 1 if expert_parallel is None else expert_parallel.size
    layout = check_layout(tag_dir, ep_size)
    module_only = finetune or bool(layout.get("weights_only"))
    if layout.get("weights_only") and not finetune and load_optimizer:
        logger.warning("%s holds weights only (converted): the optimizer state starts afresh",
                       tag_dir)
    load_states = load_optimizer and not module_only
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_states,
                                          load_lr_scheduler_states=False,
                                          load_module_only=module_only)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
    if ep_size > 1:     # DeepSpeed loaded rank 0's experts everywhere: put each rank's own back
        load_expert_shard(engine.module, tag_dir, expert_parallel.rank, ep_size)
    if not load_states:     # fp32 masters (ours, or DeepSpeed's) <- the loaded weights
        _refresh_master_weights(engine.optimizer)
    version = client.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{os.path.join(load_dir, tag)} has checkpoint format version "
                         f"{version!r}; this code reads version {CHECKPOINT_VERSION}")
    if finetune:
        return 0, 0
    if lr_scheduler is not None and client.get("opt_param_scheduler") is not None:
        lr_scheduler.load_state_dict(client["opt_param_scheduler"])
    if load_rng:
        _restore_rng(client.get("rng_state"), os.path.join(load_dir, tag))
    logger.info("loaded checkpoint %s", os.path.join(load_dir, tag))
    return int(client["iteration"]), int(client["consumed_samples"])


def _refresh_master_weights(optimizer: Any) -> None:
    """After weights were loaded into the model only: make the optimizer's fp32 master copies
    (if it keeps any: ours, ZeRO's, DeepSpeed's bf16/fp16 optimizers) equal to them again."""
    for method in ("_restore_from_bit16_weights", "refresh_fp32_params"):
        if hasattr(optimizer, method):
            getattr(optimizer, method)()
            return


def _restore_rng(states: Optional[List[Dict[str, Any]]], where: str) -> None:
    if not states:
        logger.warning("%s holds no RNG state (saved with --no-save-rng?): RNGs not restored",
                       where)
        return
    rank = _rank()
    if len(states) != _world_size():
        logger.warning("%s holds RNG states of %d ranks, the job has %d: every rank takes "
                       "rank 0's", where, len(states), _world_size())
        rank = 0
    set_rng_state(states[rank])
