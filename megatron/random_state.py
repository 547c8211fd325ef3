"""Capture and restore every RNG a training step draws from, for exact resume.

Python `random`, numpy's global generator, torch's CPU generator and, when CUDA is available,
the current CUDA device's generator (one device per rank, as Megatron saves it). States are plain
picklable objects (torch ByteTensors, tuples).
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def get_rng_state() -> Dict[str, Any]:
    """{"python", "numpy", "torch", "cuda" (the current device's, or None without CUDA)}."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a `get_rng_state()` dict; a missing or None CUDA entry leaves CUDA as it is."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
