"""Ids of `GPT2BPETokenizer` equal the pure-Python GPT-2 reference on small vocabularies.

Small vocabularies are trained here (several merge counts) or generated at random so that some
tokens are reachable by two merge paths, the case where BPE implementations can disagree.
"""

from __future__ import annotations

import random

import pytest

from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.bpe_engine import compiled_bpe, python_bpe, merges_are_rank_monotone
from megatron.tokenizer.files import load_merges, load_vocab
from tests.tokenizer.gpt2_reference import ReferenceGPT2Tokenizer, train_tiny_bpe, write_gpt2_files
from tests.tokenizer.unicode_samples import ADVERSARIAL, random_texts

ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It's the dog's bone, isn't it? "
    "We'll see: they're here, you've won, I'm done, he'd go. Numbers 1234 and 2024-05-01.\n"
    "    indented code(x) -> return x + 1\n\n"
) * 3


def _build(vocab: str, merges: str):
    return build_tokenizer("GPT2BPETokenizer", vocab, merges)


@pytest.fixture(scope="module", params=[0, 1, 30, 300])
def tiny_pair(request, tmp_path_factory):
    """(tokenizer, reference) for a BPE trained with `param` merges."""
    corpus = [ENGLISH] + ADVERSARIAL + random_texts(seed=1, n=60)
    out = tmp_path_factory.mktemp(f"bpe{request.param}")
    vocab, merges = train_tiny_bpe(corpus, request.param, out)
    return _build(vocab, merges), ReferenceGPT2Tokenizer(vocab, merges)


def test_trained_vocab_is_gpt2_format(tiny_pair):
    tok, ref = tiny_pair
    assert tok.vocab_size == len(ref.encoder)
    assert tok.eod == tok.vocab_size - 1 == ref.encoder["<|endoftext|>"]
    assert tok.engine == "hf-tokenizers"


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_strings_match_reference(tiny_pair, text):
    tok, ref = tiny_pair
    assert tok.tokenize(text) == ref.encode(text)


def test_random_unicode_matches_reference(tiny_pair):
    tok, ref = tiny_pair
    texts = random_texts(seed=2, n=300)
    expected = [ref.encode(t) for t in texts]
    assert [tok.tokenize(t) for t in texts] == expected
    assert tok.tokenize_batch(texts) == expected


def test_detokenize_round_trips(tiny_pair):
    tok, ref = tiny_pair
    for text in ADVERSARIAL + random_texts(seed=3, n=100):
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text == ref.decode(ids)


# --- vocabularies with tokens reachable by two merge paths --------------------------------

def _random_merges(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Random merges over {a, b, c}; concatenations often repeat, giving multi-path tokens."""
    tokens, merges = ["a", "b", "c"], []
    while len(merges) < n:
        pair = (rng.choice(tokens), rng.choice(tokens))
        if pair in merges or len(pair[0] + pair[1]) > 6:
            continue
        merges.append(pair)
        if pair[0] + pair[1] not in tokens:
            tokens.append(pair[0] + pair[1])
    return merges


def _abc_texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("aaabbbccc  ") for _ in range(rng.randrange(1, 25))) for _ in range(n)]


def _token_rank_bpe(word: str, vocab: dict[str, int]) -> list[str]:
    """tiktoken-style BPE: merge the adjacent pair whose *result* has the lowest id."""
    parts = list(word)
    while True:
        ranked = [(vocab[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in vocab]
        if not ranked:
            return parts
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def test_merged_token_rank_semantics_differ_from_gpt2(tmp_path):
    """Why not tiktoken: it ranks a pair by its result's id, GPT-2 by the pair's merge rank.

    "abc" is first made by (a, bc) and again by (ab, c), ranked after (c, d): GPT-2 turns
    "abcd" into ab|cd, merged-token-rank BPE into abc|d. The merge order is rank-monotone, so
    the compiled HF engine is used and agrees with GPT-2.
    """
    merges = [("a", "b"), ("b", "c"), ("a", "bc"), ("c", "d"), ("ab", "c")]
    vocab_path, merges_path = write_gpt2_files(merges, tmp_path)
    ref = ReferenceGPT2Tokenizer(vocab_path, merges_path)
    vocab = load_vocab(vocab_path)
    assert ref.bpe("abcd") == ["ab", "cd"]
    assert _token_rank_bpe("abcd", vocab) == ["abc", "d"]
    tok = _build(vocab_path, merges_path)
    assert tok.engine == "hf-tokenizers"
    assert tok.tokenize("abcd") == ref.encode("abcd") == [vocab["ab"], vocab["cd"]]


def test_heap_order_differs_from_gpt2_when_a_token_is_used_before_its_last_merge(tmp_path):
    """Why the Python fallback: HF's heap can jump ahead of pending same-rank merges.

    "abc" is made by (ab, c), used by (abc, a), then made again by (a, bc). GPT-2 merges both
    (a, bc) in "a bc a bc" (abc|abc); HF merges the first, then the new lower-ranked
    (abc, a) (abca|bc). `build_tokenizer` sees the merge order and uses the exact engine.
    """
    merges = [("b", "c"), ("a", "b"), ("ab", "c"), ("abc", "a"), ("a", "bc")]
    vocab_path, merges_path = write_gpt2_files(merges, tmp_path)
    ref = ReferenceGPT2Tokenizer(vocab_path, merges_path)
    vocab = load_vocab(vocab_path)
    assert ref.bpe("abcabc") == ["abc", "abc"]
    assert not merges_are_rank_monotone(merges)
    assert compiled_bpe(vocab, merges).encode("abcabc") == [vocab["abca"], vocab["bc"]]
    tok = _build(vocab_path, merges_path)
    assert tok.engine == "python"
    assert tok.tokenize("abcabc") == ref.encode("abcabc") == [vocab["abc"]] * 2


def test_random_multi_path_vocabs_match_reference(tmp_path):
    """Both engines: the compiled one whenever it is chosen, the Python one always."""
    rng = random.Random(0)
    seen_engines, multi_path_monotone = set(), 0
    for trial in range(40):
        merges = _random_merges(rng, rng.randrange(5, 40))
        vocab_path, merges_path = write_gpt2_files(merges, tmp_path / str(trial))
        ref = ReferenceGPT2Tokenizer(vocab_path, merges_path)
        tok = _build(vocab_path, merges_path)
        vocab = load_vocab(vocab_path)
        python_engine = python_bpe(vocab, load_merges(merges_path, vocab))
        texts = _abc_texts(rng, 40)
        expected = [ref.encode(t) for t in texts]
        assert tok.tokenize_batch(texts) == expected
        assert [python_engine.encode(t) for t in texts] == expected
        seen_engines.add(tok.engine)
        results = [a + b for a, b in merges]
        if tok.engine == "hf-tokenizers" and len(set(results)) < len(results):
            multi_path_monotone += 1
    assert seen_engines == {"hf-tokenizers", "python"}
    assert multi_path_monotone > 0  # the compiled engine was checked on multi-path vocabs too
