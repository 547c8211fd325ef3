"""Shared test fixtures: paths to the real GPT-2 vocabulary when `../shared/data` has it."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
