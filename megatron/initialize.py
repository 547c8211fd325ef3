"""Process setup for training: the launcher's environment, the process group, the device, seeds.

Works under the `deepspeed` launcher and `torchrun` (both export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT) and under plain `python pretrain_gpt.py`, where those default to a
one-process job on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_env(local_rank_flag: Optional[int] = None) -> DistributedEnv:
    """Rank, world size and local rank from the launcher's environment (default: one process).

    Reads only; `initialize_distributed` fills the defaults into the environment.
    local_rank_flag is --local_rank, which the deepspeed launcher passes besides LOCAL_RANK.
    """
    local_default = 0 if local_rank_flag is None else local_rank_flag
    env = DistributedEnv(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                         local_rank=_env_int("LOCAL_RANK", local_default))
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK={env.rank} / WORLD_SIZE={env.world_size} from the environment "
                         "are inconsistent")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disable_deepspeed_shm_op() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shared-memory collective op.

    On the CPU accelerator, creating DeepSpeed's torch communication backend calls
    `deepspeed.comm.torch.build_shm_op`, which compiles a C++ extension (about two minutes, and
    a compiler must be installed) used only as a faster intra-node all-reduce. Returning None
    makes DeepSpeed use plain torch.distributed (gloo) collectives, which is all we need.
    `import deepspeed.comm.torch as m` would bind the name `torch` that deepspeed.comm exports,
    hence importlib.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def initialize_distributed(backend: str, local_rank_flag: Optional[int] = None
                           ) -> tuple[DistributedEnv, torch.device]:
    """Initialise torch.distributed through DeepSpeed; returns the env and this rank's device
    (cuda:LOCAL_RANK when CUDA is available, else cpu)."""
    import deepspeed  # heavy import, only once we really train

    env = distributed_env(local_rank_flag)
    defaults = {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size),
                "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": "127.0.0.1"}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise ValueError("MASTER_PORT is not set for a multi-process job; use the "
                             "deepspeed launcher or torchrun")
        os.environ["MASTER_PORT"] = str(_free_port())
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        _disable_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return env, device


def set_random_seed(seed: int) -> None:
    """Megatron's seeding: the same seed for python, numpy, torch and CUDA on every rank (no
    tensor or pipeline parallelism here, so no per-rank offsets)."""
    if seed <= 0:
        raise ValueError(f"--seed must be > 0, got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def is_rank_0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def print_rank_0(message: str) -> None:
    if is_rank_0():
        print(message, flush=True)
