"""With the real GPT-2 vocab/merges: known ids and id-for-id equality with the reference."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.bpe_engine import python_bpe, merges_are_rank_monotone
from megatron.tokenizer.files import load_merges, load_vocab
from tests.tokenizer.gpt2_reference import ReferenceGPT2Tokenizer
from tests.tokenizer.unicode_samples import ADVERSARIAL, random_texts


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    """(tokenizer, reference) built from the real GPT-2 files."""
    vocab, merges = gpt2_files
    return build_tokenizer("GPT2BPETokenizer", vocab, merges), ReferenceGPT2Tokenizer(vocab, merges)


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Docstrings of the Python standard library, in file order, up to `max_chars` in all."""
    docs, total = [], 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    return docs


def test_gpt2_constants(gpt2):
    tok, _ = gpt2
    assert tok.vocab_size == 50257
    assert tok.padded_vocab_size == 50304
    assert tok.eod == 50256 == tok.vocab["<|endoftext|>"]
    assert tok.inv_vocab[50256] == "<|endoftext|>"
    assert tok.engine == "hf-tokenizers"


def test_gpt2_merges_are_rank_monotone(gpt2_files):
    """The condition under which the compiled engine is exact holds for GPT-2's own files."""
    vocab = load_vocab(gpt2_files[0])
    merges = load_merges(gpt2_files[1], vocab)
    assert len(merges) == 50000
    assert merges_are_rank_monotone(merges)
    assert len({a + b for a, b in merges}) == len(merges)  # every token has a single merge


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        (" Hello world", [18435, 995]),
        ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),
        ("", []),
    ],
)
def test_known_ids(gpt2, text, ids):
    tok, ref = gpt2
    assert ref.encode(text) == ids
    assert tok.tokenize(text) == ids


def test_literal_endoftext_is_ordinary_text(gpt2):
    tok, ref = gpt2
    for text in ["<|endoftext|>", "a<|endoftext|>b", " <|endoftext|><|endoftext|>\n"]:
        ids = tok.tokenize(text)
        assert tok.eod not in ids
        assert ids == ref.encode(text)
        assert tok.detokenize(ids) == text
    assert tok.eod not in tok.tokenize_batch(["<|endoftext|>"])[0]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_strings(gpt2, text):
    tok, ref = gpt2
    ids = tok.tokenize(text)
    assert ids == ref.encode(text)
    assert tok.detokenize(ids) == text


def test_varied_text_matches_reference(gpt2):
    """~300 KB of English prose/code docstrings plus random Unicode, id for id."""
    tok, ref = gpt2
    texts = stdlib_docstrings(250_000) + random_texts(seed=10, n=500, max_parts=60)
    assert sum(map(len, texts)) > 250_000
    expected = [ref.encode(t) for t in texts]
    assert tok.tokenize_batch(texts) == expected
    assert [tok.tokenize(t) for t in texts[::7]] == expected[::7]
    assert [tok.detokenize(ids) for ids in expected] == texts


def test_python_engine_matches_reference(gpt2, gpt2_files):
    """The fallback engine is exact on GPT-2 too (on a smaller sample: it is slow)."""
    tok, ref = gpt2
    engine = python_bpe(tok.vocab, load_merges(gpt2_files[1], tok.vocab))
    texts = ADVERSARIAL + random_texts(seed=11, n=100) + stdlib_docstrings(20_000)
    assert [engine.encode(t) for t in texts] == [ref.encode(t) for t in texts]


def test_detokenize_split_multibyte_characters(gpt2):
    """Ids that cut a UTF-8 sequence decode with replacement characters, as GPT-2 does."""
    tok, ref = gpt2
    ids = tok.tokenize("🤗")  # 4 bytes, no single token
    assert len(ids) > 1
    for cut in range(1, len(ids)):
        head, tail = ids[:cut], ids[cut:]
        head_bytes = b"".join(bytes(ref.byte_decoder[c] for c in ref.decoder[i]) for i in head)
        assert tok.detokenize(head) == ref.decode(head) == head_bytes.decode("utf-8", "replace")
        assert "\ufffd" in tok.detokenize(head) and "\ufffd" in tok.detokenize(tail)
        assert tok.detokenize(tail) == ref.decode(tail)
    assert tok.detokenize(ids) == "🤗"
