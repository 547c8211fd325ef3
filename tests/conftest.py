"""Shared test fixtures and hooks: single-threaded child processes, the `gpu` marker's skip, and
paths to the real GPT-2 vocabulary when `../shared/data` has it."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def single_threaded_children():
    """OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 (unless the caller set them) in os.environ, which
    every child process a test starts inherits: on a small shared CPU machine torch's OpenMP
    threads busy-wait against each other and a child's step gets several times slower. (This
    process's own torch already chose its thread count at import; the variables reach only
    children.)"""
    mp = pytest.MonkeyPatch()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if not os.environ.get(var):
            mp.setenv(var, "1")
    yield
    mp.undo()


def pytest_configure(config):
    """Under pytest-xdist (pyproject's addopts run one worker per core) each worker is a
    process of its own: one torch thread each, or the workers' OpenMP threads busy-wait against
    each other on the shared cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Files holding `slow` tests run first (their order within a file kept): the xdist workers
    take whole files in this order, so the long files start at once and the short ones fill
    the gaps at the end, instead of one worker finishing a long file alone. Tests marked `gpu`
    are skipped on a machine without CUDA."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)     # stable: False first
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
        for item in gpu_items:
            item.add_marker(skip)


def _gpt2_dir() -> Path:
    env = os.environ.get("XMOE_GPT2_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_files():
    """(vocab_json, merges_txt) of the real GPT-2 tokenizer; skips the test when absent."""
    d = _gpt2_dir()
    vocab, merges = d / "gpt2-vocab.json", d / "gpt2-merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"real GPT-2 vocab/merges not found in {d}")
    return str(vocab), str(merges)
