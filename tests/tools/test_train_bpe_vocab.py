"""tools/train_bpe_vocab.py and tools/demo.py: a trained vocabulary loads and round-trips."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
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


def test_demo_runs_end_to_end(tmp_path):
    """The shortened main job: corpus -> vocabulary -> preprocess -> check -> tiny XMoE training
    through pretrain_gpt.py -> validation and test evaluation -> summary."""
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), "--out-dir", str(out),
                        "--quick"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    assert "is consistent" in r.stdout
    ds = MMapIndexedDataset(str(out / "demo_text_document"))
    assert len(ds) >= 5 and ds.num_tokens > 10_000
    eod = json.loads((out / "vocab" / "vocab.json").read_text(encoding="utf-8"))["<|endoftext|>"]
    assert all(int(ds.get(i)[-1]) == eod for i in range(len(ds)))

    summary = r.stdout[r.stdout.index("== summary"):]
    first, last = map(float, re.search(r"lm loss: ([0-9.]+) \(iteration \d+\) -> ([0-9.]+)",
                                       summary).groups())
    assert last < first - 0.5, summary
    for what in ("validation", "test"):
        loss, ppl = map(float, re.search(rf"{what}: lm loss ([0-9.]+), PPL ([0-9.]+)",
                                         summary).groups())
        assert 0 < loss < first and ppl == pytest.approx(math.exp(loss), rel=0.01), summary
    assert re.search(r"iteration +\d+ +layer 2: [0-9.]+ -> [0-9.]+ \([0-9.]+%\)", summary)
    assert (out / "train.log").is_file()
