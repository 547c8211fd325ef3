"""tools/train_bpe_vocab.py: a trained vocabulary loads and round-trips (the demo that uses it:
tests/tools/test_demo.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.tokenizer import build_tokenizer
from tests.tokenizer.gpt2_reference import ReferenceGPT2Tokenizer

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "Mixture-of-experts layers route each token to a few experts.",
         "Threshold routing: take experts until their probability reaches 0.9!",
         "naïve café — 東京 🤗 tabs\tand\nnewlines"] * 20


def _train(tmp_path, vocab_size=400):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from train_bpe_vocab import train_bpe_vocab
    finally:
        sys.path.pop(0)
    return train_bpe_vocab(TEXTS, vocab_size, str(tmp_path / "vocab"), min_frequency=1)


def test_trained_vocab_is_gpt2_format_and_exact(tmp_path):
    vocab_path, merges_path = _train(tmp_path)
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    assert 300 < len(vocab) <= 400            # fewer when the tiny corpus runs out of pairs
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and sorted(vocab.values()) == list(range(len(vocab)))
    assert Path(merges_path).read_text(encoding="utf-8").startswith("#version")
    tok = build_tokenizer(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab_path,
                          merge_file=merges_path)
    ref = ReferenceGPT2Tokenizer(vocab_path, merges_path)
    for text in set(TEXTS) | {"unseen wörds 123", "<|endoftext|>"}:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text)
        assert tok.detokenize(ids) == text
        assert tok.eod not in ids


def test_vocab_size_too_small_is_rejected(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from train_bpe_vocab import train_bpe_vocab
    finally:
        sys.path.pop(0)
    with pytest.raises(ValueError, match="--vocab-size"):
        train_bpe_vocab(TEXTS, 100, str(tmp_path))


def test_cli_names_bad_line(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_bpe_vocab.py"), "--input",
                        str(corpus), "--out-dir", str(tmp_path / "v")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and f"{corpus}:2" in r.stderr
