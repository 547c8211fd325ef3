"""The public surface: build_tokenizer, padding, errors that name the file, lean import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron.tokenizer import (
    GPT2BPETokenizer,
    TokenizerError,
    build_tokenizer,
    vocab_size_with_padding,
)
from tests.conftest import REPO_ROOT
from tests.tokenizer.gpt2_reference import train_tiny_bpe
from tests.tokenizer.unicode_samples import ADVERSARIAL, random_texts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(vocab, merges) paths of a 50-merge BPE."""
    out = tmp_path_factory.mktemp("api")
    return train_tiny_bpe(["the cat sat on the mat, the end. " * 5] + ADVERSARIAL, 50, out)


def test_build_tokenizer(files):
    tok = build_tokenizer("GPT2BPETokenizer", *files, make_vocab_size_divisible_by=8)
    assert isinstance(tok, GPT2BPETokenizer)
    assert tok.vocab_size == 256 + 50 + 1
    assert tok.padded_vocab_size == 312
    assert tok.eod == tok.vocab["<|endoftext|>"] and tok.inv_vocab[tok.eod] == "<|endoftext|>"
    assert tok.name == "GPT2BPETokenizer"


@pytest.mark.parametrize(
    "size, divisor, tp, padded",
    [(50257, 128, 1, 50304), (50257, 128, 2, 50432), (50257, 128, 8, 51200),
     (50257, 1, 1, 50257), (50304, 128, 1, 50304), (1, 128, 1, 128), (307, 8, 3, 312)],
)
def test_vocab_size_with_padding(size, divisor, tp, padded):
    assert vocab_size_with_padding(size, divisor, tp) == padded


@pytest.mark.parametrize("kwargs, flag", [
    ({"make_vocab_size_divisible_by": 0}, "--make-vocab-size-divisible-by"),
    ({"tensor_model_parallel_size": -1}, "--tensor-model-parallel-size"),
])
def test_padding_rejects_bad_flags(kwargs, flag):
    with pytest.raises(TokenizerError, match=flag):
        vocab_size_with_padding(50257, **kwargs)


def test_padding_follows_tensor_parallel_size(files):
    tok = build_tokenizer("GPT2BPETokenizer", *files, make_vocab_size_divisible_by=128,
                          tensor_model_parallel_size=2)
    assert tok.padded_vocab_size == 512


def test_tokenize_batch_equals_tokenize(files):
    tok = build_tokenizer("GPT2BPETokenizer", *files)
    texts = ADVERSARIAL + random_texts(seed=5, n=200)
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch([]) == []
    assert tok.tokenize_batch(("a", "")) == [tok.tokenize("a"), []]


def test_literal_endoftext_never_yields_eod(files):
    tok = build_tokenizer("GPT2BPETokenizer", *files)
    for text in ["<|endoftext|>", "x<|endoftext|>y", "\U00010940<|endoftext|>"]:
        assert tok.eod not in tok.tokenize(text)
        assert tok.detokenize(tok.tokenize(text)) == text


def test_detokenize_accepts_any_int_sequence_and_rejects_unknown_ids(files):
    tok = build_tokenizer("GPT2BPETokenizer", *files)
    ids = tok.tokenize("the cat")
    assert tok.detokenize(tuple(ids)) == tok.detokenize(iter(ids)) == "the cat"
    assert tok.detokenize([]) == ""
    assert tok.detokenize([tok.eod]) == "<|endoftext|>"
    for bad in (tok.vocab_size, -1):
        with pytest.raises(TokenizerError, match=str(bad)):
            tok.detokenize([bad])


def test_unknown_tokenizer_type_names_the_flag(files):
    with pytest.raises(TokenizerError, match="--tokenizer-type.*'BertWordPieceLowerCase'"):
        build_tokenizer("BertWordPieceLowerCase", *files)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _vocab_text(files, edit=None):
    vocab = json.loads(open(files[0], encoding="utf-8").read())
    if edit:
        edit(vocab)
    return json.dumps(vocab)


def test_missing_files_are_named(files, tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="vocab file not found.*nope.json.*--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", missing, files[1])
    with pytest.raises(TokenizerError, match="merges file not found.*nope.txt.*--merge-file"):
        build_tokenizer("GPT2BPETokenizer", files[0], str(tmp_path / "nope.txt"))
    with pytest.raises(TokenizerError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", files[0], None)


@pytest.mark.parametrize("text, message", [
    ('{"a": 0,', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("\udcff", "cannot read"),
])
def test_malformed_vocab_json(files, tmp_path, text, message):
    path = tmp_path / "vocab.json"
    if text == "\udcff":
        path.write_bytes(b"\xff\xfe{}")  # not UTF-8
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as info:
        build_tokenizer("GPT2BPETokenizer", str(path), files[1])
    assert "vocab.json" in str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.pop("<|endoftext|>"), "<\\|endoftext\\|>"),
    (lambda v: v.update({"a": "0"}), "not an int"),
    (lambda v: v.update({"a": 10_000}), "ids must be"),
    (lambda v: v.update({"has space": len(v)}), "not a byte-level symbol"),
])
def test_bad_vocab_contents(files, tmp_path, edit, message):
    path = _write(tmp_path, "bad-vocab.json", _vocab_text(files, edit))
    with pytest.raises(TokenizerError, match=message) as info:
        build_tokenizer("GPT2BPETokenizer", path, files[1])
    assert "bad-vocab.json" in str(info.value)


def test_vocab_missing_a_byte_symbol(files, tmp_path):
    def drop_a(vocab):
        vocab.pop("a")
        for i, token in enumerate(sorted(vocab, key=vocab.get)):  # keep ids contiguous
            vocab[token] = i
    path = _write(tmp_path, "v.json", _vocab_text(files, drop_a))
    merges = _write(tmp_path, "m.txt", "#version: 0.2\n")
    with pytest.raises(TokenizerError, match="256 byte symbols"):
        build_tokenizer("GPT2BPETokenizer", path, merges)


@pytest.mark.parametrize("lines, lineno, message", [
    (["t h", "th e x"], 3, "expected two tokens"),
    (["t h", "justone"], 3, "expected two tokens"),
    (["t h", "q \u0100\u0101"], 3, "'Āā' is not in the vocab"),
    (["t h", "t h"], 3, "duplicate of the merge on line 2"),
])
def test_bad_merges_line_is_named(files, tmp_path, lines, lineno, message):
    vocab = json.loads(open(files[0], encoding="utf-8").read())
    vocab = {t: i for t, i in vocab.items() if len(t) == 1}
    vocab["th"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_path = _write(tmp_path, "v.json", json.dumps(vocab))
    merges = _write(tmp_path, "bad-merges.txt", "\n".join(["#version: 0.2", *lines]) + "\n")
    with pytest.raises(TokenizerError, match=f"bad-merges.txt, line {lineno}: {message}"):
        build_tokenizer("GPT2BPETokenizer", vocab_path, merges)


def test_merges_header_and_blank_lines_are_optional(files, tmp_path):
    merges = open(files[1], encoding="utf-8").read().split("\n")
    assert merges[0].startswith("#version")
    without_header = _write(tmp_path, "m1.txt", "\n".join(merges[1:]))
    trailing_blanks = _write(tmp_path, "m2.txt", "\n".join(merges) + "\n\n\r\n")
    texts = random_texts(seed=6, n=50)
    expected = build_tokenizer("GPT2BPETokenizer", *files).tokenize_batch(texts)
    for merges_path in (without_header, trailing_blanks):
        tok = build_tokenizer("GPT2BPETokenizer", files[0], merges_path)
        assert tok.tokenize_batch(texts) == expected


def test_import_does_not_load_torch():
    code = (
        "import sys, megatron.tokenizer; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'tokenizers' not in sys.modules, 'compiled engine imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
