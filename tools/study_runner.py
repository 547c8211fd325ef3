"""The router study's processes and files: runs with a log, checkpoints, atomic results, a lock.

- `run_logged`: one child process (pretrain_gpt.py, tools/threshold_sweep.py), its output
  appended to a log and echoed; the child is stopped when the study is (Ctrl-C, SIGTERM).
- `KeepLastCheckpoint`: after each "saved checkpoint at iteration N to DIR" line, removes the
  run's older iter_* directories (a checkpoint of XMoE-small with its optimizer is ~5 GB; the
  study resumes from and evaluates the newest only).
- `repair_pointer`: a study killed between a checkpoint's rename and its pointer update leaves a
  complete iter_* newer than the pointer; pretrain_gpt.py refuses to save over it (rightly, for a
  directory it does not know). The study owns the directory, so it points at it and resumes.
- `write_json_atomic`, `StudyLock` (one study per output directory at a time).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.checkpoint_check import (  # noqa: E402  (torch-free)
    TRACKER_FILENAME, checkpoint_iterations, checkpoint_tag, newest_intact)

SAVED_RE = re.compile(r"saved checkpoint at iteration +(\d+) to (.+)$")
# Set by a launcher for its children; a plain child must not inherit a parent's.
DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                   "MASTER_PORT")


def child_env(environ: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, str], str]:
    """(environment of the study's runs, a line saying which thread count they use).

    OMP_NUM_THREADS=1 unless set: on CPU, torch's OpenMP threads busy-wait and a step on cores
    shared with other work gets several times slower (README, "Set up")."""
    env = dict(os.environ if environ is None else environ)
    for key in DISTRIBUTED_ENV:
        env.pop(key, None)
    if env.get("OMP_NUM_THREADS"):
        return env, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (yours)"
    env["OMP_NUM_THREADS"] = "1"
    return env, "OMP_NUM_THREADS=1 (the study's default; set OMP_NUM_THREADS to choose)"


def run_logged(cmd: List[str], log_path: str, env: Dict[str, str], header: str,
               echo: bool = True, on_line: Optional[Callable[[str], None]] = None
               ) -> Tuple[int, str, float]:
    """Run `cmd` in the repository, appending `header` and its output to `log_path` (and
    echoing it). Returns (exit code, this run's output, seconds). If the study is interrupted,
    the child is terminated (then killed) before the interruption goes on."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    lines: List[str] = []
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(header + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=env, errors="replace",
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
    return proc.returncode, "".join(lines), time.time() - start


def _die_with_parent() -> None:
    """In the child, Linux only: SIGTERM when the study's process dies, however it dies (even
    SIGKILL), so that no orphaned run goes on writing into the study's checkpoints."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)    # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class KeepLastCheckpoint:
    """on_line callback of a training run: keeps only the newest checkpoint of `directory`."""

    def __init__(self, directory: str, enabled: bool = True) -> None:
        self.directory = os.path.realpath(directory)
        self.enabled = enabled

    def __call__(self, line: str) -> None:
        m = SAVED_RE.search(line)
        if not (self.enabled and m and os.path.realpath(m.group(2).strip()) == self.directory):
            return
        saved = int(m.group(1))
        if read_pointer(self.directory) != saved:      # only once the pointer names it
            return
        for iteration in checkpoint_iterations(self.directory):
            if iteration < saved:
                shutil.rmtree(os.path.join(self.directory, checkpoint_tag(iteration)),
                              ignore_errors=True)


def read_pointer(directory: str) -> Optional[int]:
    """The iteration latest_checkpointed_iteration.txt names, or None."""
    try:
        with open(os.path.join(directory, TRACKER_FILENAME)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def repair_pointer(directory: str) -> Optional[str]:
    """Point at the newest complete checkpoint when it is newer than the pointer (or there is
    none); returns a line saying so, or None when nothing changed."""
    newest = newest_intact(directory)
    pointer = read_pointer(directory)
    if newest is None or (pointer is not None and pointer >= newest):
        return None
    with open(os.path.join(directory, TRACKER_FILENAME), "w") as f:
        f.write(f"{newest}\n")
    was = "no pointer" if pointer is None else f"the pointer named iteration {pointer}"
    return (f"{directory}: {checkpoint_tag(newest)} is complete but {was} (the study stopped "
            f"between its save and the pointer update): resuming from it")


def write_json_atomic(path: str, obj: object) -> None:
    """Write JSON under a temporary name in the same directory, then rename: a reader sees the
    old file or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Optional[dict]:
    """The JSON object at `path`; None when the file does not exist. ValueError naming the
    file when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


class StudyLock:
    """An exclusive lock on OUT/.router_study.lock while a study runs there (released by the
    OS when the process ends, however it ends)."""

    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, ".router_study.lock")
        self.file = None

    def __enter__(self) -> "StudyLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"--out-dir {os.path.dirname(self.path)} is in use by another "
                             f"router_study.py ({holder}): wait for it, or use another "
                             "--out-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"PID {os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
