"""The offline demo corpus: prose paragraphs, documents of 2-20 KB, deterministic."""

from megatron.data.demo_corpus import build_docstring_corpus, stdlib_paragraphs


def test_paragraphs_are_prose_sized():
    paras = list(stdlib_paragraphs(max_bytes=2_000_000))
    assert len(paras) > 500
    assert max(len(p) for p in paras) <= 8_000      # no generated data blobs (pydoc_data)
    assert min(len(p) for p in paras) >= 40


def test_small_corpus_has_many_documents_and_is_deterministic():
    docs = build_docstring_corpus(max_bytes=300_000, seed=3)
    assert len(docs) >= 15                           # 2-20 KB documents, not one 250 KB blob
    assert all(len(d.encode("utf-8")) < 30_000 for d in docs)
    assert docs == build_docstring_corpus(max_bytes=300_000, seed=3)
