"""A checkpoint directory checked before it is loaded from or saved into, without torch.

    DIR/latest_checkpointed_iteration.txt       the pointer (Megatron's): "10\\n"
    DIR/iter_0000010/mp_rank_00_model_states.pt  DeepSpeed's model file (a torch zip archive)
    DIR/iter_0000010/xmoe_checkpoint.json        our layout file, with the run's model flags
    DIR/tmp_iter_0000012/                        a save in progress, or one that failed

Each check raises ValueError with one line that names the file or flag and says what to do,
before DeepSpeed would fail with a traceback or a run would overwrite what it did not write:

- `check_unpointed`: iter_* directories without the pointer (copied without it) are refused,
  naming the newest complete one and the `echo N > pointer` that resumes it. Resuming from it
  silently was the alternative; refusing was chosen because nothing proves the copies belong to
  this run, and the fix is one command.
- `check_intact`: the checkpoint the pointer names must be complete: every `.pt` file non-empty
  and a whole torch zip archive (its directory is written last, so a cut-short file has none),
  the layout file valid JSON, every expert shard it lists present.
- `check_model_args`: the flags that shape the parameters must equal the checkpoint's (read from
  the layout file; from the model file's saved arguments for checkpoints older than that).
- `saved_model_config`: the model flags of the checkpoint --load's pointer names, for
  --use-checkpoint-args (megatron/run_config.py) and tools/threshold_sweep.py; torch is
  imported only for checkpoints whose layout file predates the flags.
- `check_save_dir`: --save must not hold checkpoints this run did not load, nor ones newer than
  the iteration it starts from (a later save of that iteration would replace them). Then
  `remove_stale_saves` deletes its tmp_iter_* (saves that never finished: not checkpoints).

`write_failure` names why a save failed ("no space left on device": torch's writer reports it
without the errno) for CheckpointWriteError, the one error of a save pretrain_gpt.py prints as
one line.

"Complete" is what a save of ours guarantees once renamed from tmp_iter_*; a checkpoint written
by another tool, or cut short while copied, is checked file by file as above. A torch file in
the legacy (non-zip) format cannot be checked cheaply and passes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from typing import Any, Dict, List, Optional, Tuple

from megatron.checkpoint_args import model_differences

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"     # Megatron's pointer file
MODEL_FILENAME = "mp_rank_00_model_states.pt"      # DeepSpeed's model file (no tensor parallel)
LAYOUT_FILENAME = "xmoe_checkpoint.json"
LAYOUT_VERSION = 1
TMP_PREFIX = "tmp_"         # a save in progress (or one a crash or a failure interrupted)
_TAG_RE = re.compile(r"^iter_(\d{7,})$")
_FULL_BYTES = 16 << 20      # less free space than this after a failed write: the disk is full


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions): one line for the user,
    raised after the partial save was removed."""


def checkpoint_tag(iteration: int) -> str:
    """Megatron's directory name: iter_0000100."""
    return f"iter_{iteration:07d}"


def tracker_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, TRACKER_FILENAME)


def shard_filename(rank: int, size: int) -> str:
    """The expert shard of one expert-parallel rank (megatron/expert_checkpoint.py)."""
    return f"expert_parallel_rank_{rank:03d}_of_{size:03d}.pt"


def read_layout(tag_dir: str) -> dict:
    """The checkpoint's layout; {"expert_parallel_size": 1, "weights_only": False} without one."""
    path = os.path.join(tag_dir, LAYOUT_FILENAME)
    if not os.path.isfile(path):
        return {"version": LAYOUT_VERSION, "expert_parallel_size": 1, "weights_only": False}
    try:
        with open(path) as f:
            layout = json.load(f)
        int(layout["expert_parallel_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid checkpoint layout file: {e}") from None
    return layout


# ----------------------------------------------------------------------------------------------
# is a checkpoint complete?


def file_problem(path: str) -> Optional[str]:
    """Why `path` is not a whole torch file ("0 bytes", "missing", ...), or None."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "missing"
    if size == 0:
        return "0 bytes"
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":             # torch's legacy format: a pickle stream, no end marker
        return None
    if head != b"PK":
        return f"{size} bytes, not a torch file"
    try:
        with zipfile.ZipFile(path):     # reads the zip directory, the last thing torch writes
            return None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return f"{size} bytes, cut short: no zip directory at its end"


def tag_problem(tag_dir: str) -> Optional[str]:
    """The first reason the checkpoint `tag_dir` is incomplete ("PATH is incomplete (...)")."""
    names = sorted(os.listdir(tag_dir))
    pt_files = [MODEL_FILENAME] + [n for n in names if n.endswith(".pt") and n != MODEL_FILENAME]
    for name in pt_files:
        path = os.path.join(tag_dir, name)
        detail = file_problem(path)
        if detail == "missing":
            return f"{path} is missing"
        if detail is not None:
            return f"{path} is incomplete ({detail})"
    try:
        size = int(read_layout(tag_dir)["expert_parallel_size"])
    except ValueError:
        return f"{os.path.join(tag_dir, LAYOUT_FILENAME)} is incomplete (not valid JSON)"
    shards = [shard_filename(rank, size) for rank in range(size)] if size > 1 else []
    missing = [name for name in shards if name not in names]
    return f"{os.path.join(tag_dir, missing[0])} is missing" if missing else None


def checkpoint_iterations(directory: str) -> List[int]:
    """Iterations of the iter_* directories in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = (_TAG_RE.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found
                  if m and os.path.isdir(os.path.join(directory, m.group(0))))


def newest_intact(directory: str, exclude: Optional[str] = None) -> Optional[int]:
    """The newest iteration whose iter_* directory is complete (other than tag `exclude`)."""
    for iteration in reversed(checkpoint_iterations(directory)):
        tag = checkpoint_tag(iteration)
        if tag != exclude and tag_problem(os.path.join(directory, tag)) is None:
            return iteration
    return None


def _listing(iterations: List[int]) -> str:
    """The tag of one iteration, or "iter_0000002 ... iter_0000010" (oldest ... newest)."""
    tags = [checkpoint_tag(i) for i in (iterations[0], iterations[-1])]
    return tags[0] if len(iterations) == 1 else f"{tags[0]} ... {tags[1]}"


def _resume_command(directory: str, iteration: int) -> str:
    return f"`echo {iteration} > {tracker_path(directory)}`"


def _pointer_iteration(directory: str) -> Optional[int]:
    try:
        with open(tracker_path(directory)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# before a load


def check_unpointed(load_dir: str) -> None:
    """--load DIR without the pointer: fine when DIR holds no iter_*, else refused (ValueError)."""
    iterations = checkpoint_iterations(load_dir)
    if not iterations:
        return
    plural = "s" if len(iterations) > 1 else ""
    held = f"--load {load_dir} holds {len(iterations)} checkpoint{plural} ({_listing(iterations)})"
    newest = newest_intact(load_dir)
    if newest is None:
        problem = tag_problem(os.path.join(load_dir, checkpoint_tag(iterations[-1])))
        raise ValueError(f"{held} but no {TRACKER_FILENAME}, and none is complete ({problem}): "
                         f"to start afresh, move them out of {load_dir}")
    raise ValueError(f"{held} but no {TRACKER_FILENAME}: to resume from the newest complete "
                     f"one, {checkpoint_tag(newest)}, run {_resume_command(load_dir, newest)}; "
                     f"to start afresh, move them out of {load_dir}")


def check_intact(load_dir: str, tag: str) -> None:
    """ValueError naming the first incomplete file of checkpoint `tag`, and the newest intact
    checkpoint in `load_dir` with the command that resumes it."""
    problem = tag_problem(os.path.join(load_dir, tag))
    if problem is None:
        return
    other = newest_intact(load_dir, exclude=tag)
    if other is None:
        raise ValueError(f"{problem}; there is no intact checkpoint in {load_dir}")
    raise ValueError(f"{problem}; the newest intact checkpoint in {load_dir} is "
                     f"{checkpoint_tag(other)}: to resume from it, run "
                     f"{_resume_command(load_dir, other)}")


def saved_model_args(tag_dir: str) -> Optional[Dict[str, Any]]:
    """The model flags the checkpoint was saved with (RunConfig.model as a dict), or None.

    From the layout file; for checkpoints older than the flags in it, from the saved arguments
    in the model file (memory-mapped: the tensors are not read).
    """
    model = read_layout(tag_dir).get("model")
    if model is not None:
        return model
    import torch     # only for checkpoints without the flags in their layout file

    path = os.path.join(tag_dir, MODEL_FILENAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:            # the legacy format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=False)
    args = state.get("args") if isinstance(state, dict) else None
    return args.get("model") if isinstance(args, dict) else None


def read_tracker(load_dir: str) -> Optional[str]:
    """The tag the pointer names ("iter_0000100" or "release"), or None without a pointer."""
    path = tracker_path(load_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return "release"
    try:
        iteration = int(text)
    except ValueError:
        raise ValueError(f"{path} must hold one integer iteration (or 'release'), got "
                         f"{text!r}") from None
    if iteration < 0:
        raise ValueError(f"{path} holds a negative iteration {iteration}")
    return checkpoint_tag(iteration)


def pointed_tag_dir(load_dir: str) -> str:
    """The checkpoint directory the pointer of `load_dir` names (torch-free); ValueError naming
    what is missing (the directory, the pointer, the checkpoint it names)."""
    if not os.path.isdir(load_dir):
        raise ValueError(f"--load {load_dir} does not exist")
    tag = read_tracker(load_dir)
    if tag is None:
        check_unpointed(load_dir)           # iter_* without the pointer: its own message
        raise ValueError(f"--load {load_dir} holds no checkpoint (no {TRACKER_FILENAME})")
    path = tracker_path(load_dir)
    tag_dir = os.path.join(load_dir, tag)
    if not os.path.isdir(tag_dir):
        raise ValueError(f"{path} names checkpoint {tag!r}, but {tag_dir} does not exist")
    return tag_dir


def saved_model_config(load_dir: str) -> Tuple[str, Dict[str, Any]]:
    """(checkpoint directory, its model flags: RunConfig.model as a dict) of the checkpoint the
    pointer of `load_dir` names; ValueError when it has none (another tool wrote it)."""
    tag_dir = pointed_tag_dir(load_dir)
    if "model" not in read_layout(tag_dir):         # older: the model file's saved arguments
        model_file = os.path.join(tag_dir, MODEL_FILENAME)
        problem = file_problem(model_file)
        if problem is not None:
            raise ValueError(f"{model_file} is {problem}: the checkpoint's model flags cannot "
                             "be read")
    model = saved_model_args(tag_dir)
    if not isinstance(model, dict):
        raise ValueError(f"{tag_dir} holds no saved model flags (written by another tool?): "
                         "give the model flags on the command line instead of "
                         "--use-checkpoint-args")
    return tag_dir, model


def check_model_args(tag_dir: str, run_model: Dict[str, Any]) -> None:
    """ValueError naming every model-shaping flag that differs from the checkpoint's, in one
    line; routing settings that keep the parameters' shapes are logged, not refused."""
    saved = saved_model_args(tag_dir)
    if saved is None:               # saved without arguments (tests, other tools): nothing to say
        return
    shape, routing = model_differences(saved, run_model)
    if routing:
        logger.warning("%s was trained with %s", tag_dir, ", ".join(routing))
    if shape:
        raise ValueError(f"--load {tag_dir} was saved with other model flags: "
                         f"{', '.join(shape)}; pass the checkpoint's values")


def check_loadable(load_dir: str, tag: str, run_model: Optional[Dict[str, Any]]) -> None:
    """Everything checked before DeepSpeed loads checkpoint `tag` (see the module docstring)."""
    check_intact(load_dir, tag)
    if run_model is not None:
        check_model_args(os.path.join(load_dir, tag), run_model)


# ----------------------------------------------------------------------------------------------
# before a run saves


def check_save_dir(save_dir: str, load_dir: Optional[str], loaded_iteration: Optional[int]
                   ) -> None:
    """ValueError if saves into `save_dir` could overwrite checkpoints this run did not write.

    loaded_iteration: the iteration the run starts from after loading from `load_dir` (0 with
    --finetune), None when it loaded nothing. Saves happen at iterations after it, so any
    iter_* newer than it would be replaced; iter_* of a directory the run did not load from
    would be mixed with its own, the pointer moved off them.
    """
    iterations = checkpoint_iterations(save_dir)
    if not iterations:
        return
    owned = (loaded_iteration is not None and load_dir is not None
             and os.path.realpath(load_dir) == os.path.realpath(save_dir))
    if not owned:
        raise ValueError(f"--save {save_dir} already holds checkpoints this run did not load "
                         f"({_listing(iterations)}): pass --load {save_dir} to resume from "
                         "them, or give --save an empty directory")
    newer = [i for i in iterations if i > loaded_iteration]
    if not newer:
        return
    them = "it" if len(newer) == 1 else "them"
    hint = ""
    newest = newest_intact(save_dir)
    if newest is not None and newest > loaded_iteration and newest != _pointer_iteration(save_dir):
        hint = f" (or resume from the newest with {_resume_command(save_dir, newest)})"
    raise ValueError(f"--save {save_dir} holds {_listing(newer)}, newer than iteration "
                     f"{loaded_iteration} this run starts from: a save would overwrite {them}; "
                     f"move {them} out of {save_dir}{hint}")


def remove_stale_saves(save_dir: str) -> List[str]:
    """Remove the tmp_iter_* directories (saves that never finished); returns their paths.
    Only for a directory this run owns (check_save_dir passed): no other run saves into it."""
    if not os.path.isdir(save_dir):
        return []
    stale = [os.path.join(save_dir, name) for name in sorted(os.listdir(save_dir))
             if name.startswith(TMP_PREFIX) and _TAG_RE.match(name[len(TMP_PREFIX):])]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


# ----------------------------------------------------------------------------------------------
# a save that failed


def free_bytes(path: str) -> Optional[int]:
    """Free space of the filesystem holding `path` (its nearest existing parent), or None."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_failure(error: BaseException, save_dir: str) -> Optional[str]:
    """What went wrong, for "... while saving iteration N to DIR", if `error` is a failed write.

    torch's zip writer reports a failed write (ENOSPC included) as RuntimeError
    `[enforce fail at inline_container.cc:NNN] . unexpected pos` without the errno, so a full
    disk is recognised by its free space right after the failure. None: not a write failure.
    """
    if isinstance(error, OSError) and error.errno is not None:
        text = error.strerror or os.strerror(error.errno)
        return text[:1].lower() + text[1:]
    message = str(error)
    if isinstance(error, RuntimeError) and ("inline_container.cc" in message
                                            or "PytorchStreamWriter" in message):
        free = free_bytes(save_dir)
        if free is not None and free < _FULL_BYTES:
            return "no space left on device"
        return f"a file write failed ({message.splitlines()[0]}; is the disk full?)"
    return None
