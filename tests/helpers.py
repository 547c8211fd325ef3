"""What several test modules share: a free TCP port, the environment of a child process, and
whether torch's grouped GEMM runs on this CPU."""

from __future__ import annotations

import os
import socket

# Set by torchrun / the deepspeed launcher; a child that inherited them would join our group.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT / --master-port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**overrides: str) -> dict[str, str]:
    """os.environ for a child process: OMP_NUM_THREADS=1 (torch's OpenMP threads busy-wait and
    on two shared cores a step gets many times slower), no distributed variables of ours, then
    `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env.update(overrides)
    return env


def grouped_mm_cpu_ok() -> bool:
    """torch._grouped_mm exists and runs on CPU tensors (newer torch builds only)."""
    import torch  # here, so that modules needing only a port do not load torch

    try:
        torch._grouped_mm(torch.randn(2, 16), torch.randn(1, 16, 8),
                          offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def deepspeed_one_rank():
    """Generator for a module fixture: deepspeed with a gloo group of one rank (no shm op
    build), yielding deepspeed; the environment and DeepSpeed's cached world group restored."""
    import importlib

    import pytest
    import torch

    ds = pytest.importorskip("deepspeed")
    mp = pytest.MonkeyPatch()
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                           WORLD_SIZE="1", LOCAL_RANK="0").items():
        mp.setenv(key, value)
    mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    # DeepSpeed caches a clone of the world group; drop one left by an earlier test module
    # whose process group has been destroyed since.
    mp.setattr(importlib.import_module("deepspeed.utils.groups"), "_WORLD_GROUP", None)
    ds.init_distributed(dist_backend="gloo")
    yield ds
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    mp.undo()
