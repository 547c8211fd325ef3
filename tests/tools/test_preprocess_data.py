"""tools/preprocess_data.py end to end, against outputs assembled here from the pure-Python
GPT-2 reference: each document with at least one id contributes its ids (+ EOD) as one sequence
and one document; documents without ids are skipped; bad lines stop the run or are skipped."""

from __future__ import annotations

import io
import json
import os
import random
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.preprocess.config import PreprocessConfig
from megatron.data.preprocess.inputs import _file_chunks
from megatron.data.preprocess import piece_cache
from megatron.data.preprocess.piece_cache import PieceCachedTokenizer, split_segments
from tests.tokenizer.gpt2_reference import ReferenceGPT2Tokenizer, train_tiny_bpe

REPO = Path(__file__).resolve().parents[2]
TOOL = str(REPO / "tools" / "preprocess_data.py")

TRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Experts route tokens; each token may use a different number of experts.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9, \u00fcber 42 emojis \U0001F600 and \u4e2d\u6587 text.",
]
DOCS = [
    "The quick brown fox.\nIt jumps over the lazy dog.",
    "",                                              # empty text: skipped, counted
    "Caf\u00e9 \U0001F600 r\u00e9sum\u00e9 \u4e2d\u6587",
    "   leading and trailing spaces   ",
    "tokens route to experts, 123 456.",
]


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    vocab, merges = train_tiny_bpe(TRAIN_TEXTS, 80, tmp_path_factory.mktemp("bpe"))
    return vocab, merges, ReferenceGPT2Tokenizer(vocab, merges)


def run_tool(cwd, *args, env=None, timeout=60):
    """Run the tool from `cwd` (not the repo root: the script must find its package itself)."""
    return subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tool_args(vocab, merges, inp, prefix, *extra):
    return ["--input", inp, "--output-prefix", prefix, "--vocab-file", vocab,
            "--merge-file", merges, "--tokenizer-type", "GPT2BPETokenizer", *extra]


def write_jsonl(path: Path, lines) -> Path:
    """`lines`: dicts (json.dumps), str (written as is) or bytes; joined with b"\\n"."""
    raw = [json.dumps(x).encode() if isinstance(x, dict) else
           x.encode() if isinstance(x, str) else x for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def expected(ref: ReferenceGPT2Tokenizer, texts, append_eod=True):
    """(.bin bytes, sizes, doc_idx) as the original Megatron-DeepSpeed tool writes them."""
    eod = ref.encoder["<|endoftext|>"]
    seqs = [ref.encode(t) + ([eod] if append_eod else []) for t in texts if ref.encode(t)]
    flat = np.array([i for s in seqs for i in s], dtype=np.uint16)
    return flat.tobytes(), [len(s) for s in seqs], list(range(len(seqs) + 1))


def assert_dataset(prefix: str, want) -> None:
    data, sizes, doc_idx = want
    assert Path(prefix + ".bin").read_bytes() == data
    ds = MMapIndexedDataset(prefix)
    assert list(ds.sizes) == sizes
    assert list(ds.doc_idx) == doc_idx


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tool_main():
    """The tool's main(argv) -> exit code, called in this process (cheaper than a subprocess)."""
    return runpy.run_path(TOOL, run_name="preprocess_data_under_test")["main"]


def call_main(main, capsys, *args) -> subprocess.CompletedProcess:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


# --------------------------------------------------------------------------- correctness

def test_bin_matches_reference_and_workers_agree(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    lines = [{"text": DOCS[0]}, "", {"text": DOCS[1]}, {"text": DOCS[2], "other": 1},
             json.dumps({"text": DOCS[3]}, ensure_ascii=False).encode() + b"\r",   # CRLF
             json.dumps({"text": DOCS[4]}, ensure_ascii=False)]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    want = expected(ref, DOCS)
    outputs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, prefix, "--append-eod",
                                             "--workers", workers, "--log-interval", 1))
        assert proc.returncode == 0, proc.stderr
        assert_dataset(f"{prefix}_text_document", want)
        assert "processed 6 lines" in proc.stderr            # a progress line
        assert "4 documents written" in proc.stderr
        assert "(empty text: 1)" in proc.stderr and "(blank line: 1)" in proc.stderr
        outputs.append([Path(f"{prefix}_text_document{ext}").read_bytes()
                        for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


def test_without_append_eod(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert_dataset(f"{tmp_path}/o_text_document", expected(ref, DOCS, append_eod=False))


def test_many_chunks_in_order_across_workers(tmp_path, tiny_vocab):
    """Tiny chunks force many tasks through the pool; results must come back in input order."""
    from megatron.data.preprocess.pipeline import run
    vocab, merges, ref = tiny_vocab
    rng = random.Random(0)
    texts = [" ".join(rng.choice(TRAIN_TEXTS[:2]).split()[:rng.randint(0, 9)])
             for _ in range(120)]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    want = expected(ref, texts)
    for workers in (1, 2):
        cfg = PreprocessConfig(input=str(inp), output_prefix=str(tmp_path / f"w{workers}"),
                               vocab_file=vocab, merge_file=merges, append_eod=True,
                               workers=workers, chunk_bytes=200, log_interval=10**9)
        stats = run(cfg, log=io.StringIO())
        assert stats.keys["text"].documents == len(want[1])
        assert_dataset(f"{tmp_path}/w{workers}_text_document", want)


def test_multiple_json_keys(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    rows = [{"text": DOCS[0], "title": "Fox"}, {"text": DOCS[2], "title": ""},
            {"text": "", "title": "Only a title"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o", "--append-eod",
                                         "--json-key", "text", "title", "--workers", 2))
    assert proc.returncode == 0, proc.stderr
    for key in ("text", "title"):
        assert_dataset(f"{tmp_path}/o_{key}_document", expected(ref, [r[key] for r in rows]))


def test_key_without_documents_still_gets_both_files(tmp_path, tiny_vocab):
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "", "t2": "x"}, ""])
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o",
                                         "--json-keys", "text", "t2"))
    assert proc.returncode == 0, proc.stderr
    assert Path(f"{tmp_path}/o_text_document.bin").read_bytes() == b""
    ds = MMapIndexedDataset(f"{tmp_path}/o_text_document")
    assert len(ds) == 0 and list(ds.doc_idx) == [0]
    assert len(MMapIndexedDataset(f"{tmp_path}/o_t2_document")) == 1


def test_directory_and_glob_inputs(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"text": DOCS[2]}])
    write_jsonl(d / "a.jsonl", [{"text": DOCS[0]}, {"text": DOCS[4]}])
    write_jsonl(d / ".hidden.jsonl", [{"text": "never read"}])
    (d / "sub").mkdir()
    write_jsonl(d / "sub" / "c.jsonl", [{"text": "never read"}])
    want = expected(ref, [DOCS[0], DOCS[4], DOCS[2]])
    for name, spec in (("dir", d), ("glob", f"{d}/*.jsonl")):
        proc = run_tool(tmp_path, *tool_args(vocab, merges, spec, tmp_path / name,
                                             "--append-eod"))
        assert proc.returncode == 0, proc.stderr
        assert_dataset(f"{tmp_path}/{name}_text_document", want)
        assert "read 2 file(s)" in proc.stderr


def test_file_chunks_keep_whole_lines_and_numbers():
    rng = random.Random(1)
    for _ in range(500):
        lines = [b"x" * rng.randint(0, 7) for _ in range(rng.randint(0, 8))]
        data = b"\n".join(lines) + (b"\n" if lines and rng.random() < 0.5 else b"")
        want = data.split(b"\n") if data else []
        if data.endswith(b"\n"):
            want = want[:-1]
        got, next_line = [], 1
        for chunk in _file_chunks(io.BytesIO(data), 0, rng.randint(1, 10)):
            assert chunk.first_line == next_line
            got += chunk.data.split(b"\n")
            next_line += chunk.data.count(b"\n") + 1
        assert got == want


ADVERSARIAL = (list("ab Z9\u00bd's\n\t\r .,-\u00e9\U0001F600\u00a0\u2028\x1c\u0085")
               + ["'s", "'ll", "'re", "'d", "   ", " x ", "\n\n", "Caf\u00e9"])


def test_segment_cuts_are_pre_token_boundaries():
    """Each segment pre-tokenizes alone exactly as in context (both split paths)."""
    import regex
    gpt2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    rng = random.Random(5)
    alphabet = ADVERSARIAL + ["\uffff"]
    for _ in range(4000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        segments = split_segments(text)
        assert "".join(segments) == text
        assert [p for s in segments for p in gpt2.findall(s)] == gpt2.findall(text), repr(text)


def test_stdlib_whitespace_class_is_str_isspace():
    """The cut rule relies on re's \\s being exactly str.isspace (a superset of GPT-2's \\s)."""
    import re
    import sys
    space = re.compile(r"\s")
    assert all(bool(space.match(chr(c))) == chr(c).isspace()
               for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)


def test_piece_cache_equals_reference_on_adversarial_text(tiny_vocab):
    """Segment cuts, joined misses and the cache (tiny: clears often) give the reference's ids."""
    _, _, ref = tiny_vocab

    class ReferenceTokenizer:     # what PieceCachedTokenizer uses of a tokenizer
        inv_vocab = {i: s for s, i in ref.encoder.items()}

        def tokenize(self, text):
            return ref.encode(text)

    rng = random.Random(2)
    texts = ["".join(rng.choice(ADVERSARIAL) for _ in range(rng.randint(0, 25)))
             for _ in range(3000)] + [" " * 50, "x" + " " * 7 + "y", ""]
    cached = PieceCachedTokenizer(ReferenceTokenizer(), max_cached=40)
    texts += ["a\uffff b", " \uffff", "x \uffff  y"]   # the stand-in character: fallback path
    for _ in range(2):                       # cold, then warm
        assert cached.tokenize_batch(texts) == [ref.encode(t) for t in texts]
    assert all("".join(split_segments(t)) == t for t in texts)


class ReferenceTokenizer:
    """What the segment caches use of a tokenizer (`inv_vocab`, `tokenize`), from the reference;
    records every string it is asked to tokenize."""

    def __init__(self, ref: ReferenceGPT2Tokenizer):
        self.ref = ref
        self.inv_vocab = {i: s for s, i in ref.encoder.items()}
        self.calls = []

    def tokenize(self, text):
        self.calls.append(text)
        return self.ref.encode(text)


def compiled_module():
    module = piece_cache.compiled_segment_cache()
    if module is None:
        pytest.skip("C++ segment cache not built (pip install -e .) or XMOE_NO_CPP=1")
    return module


def adversarial_texts(seed: int, n: int):
    rng = random.Random(seed)
    return ["".join(rng.choice(ADVERSARIAL) for _ in range(rng.randint(0, 25)))
            for _ in range(n)] + [" " * 50, "x" + " " * 7 + "y", "", " ", "  x", " x", "x "]


def test_compiled_is_space_is_str_isspace():
    module = compiled_module()
    assert all(module.is_space(c) == chr(c).isspace() for c in range(sys.maxunicode + 1))


def test_compiled_cuts_equal_python_cuts():
    module = compiled_module()
    texts = adversarial_texts(7, 4000) + ["a\uffff b", " \uffff", "x \uffff  y"]
    assert [module.split_segments(t) for t in texts] == [split_segments(t) for t in texts]


def test_compiled_cache_equals_reference_and_python_path(tiny_vocab):
    """Cold and warm, in batches of 1 to 60 texts, with a tiny cache (cleared between batches):
    the C++ path's ids equal the reference's and the Python path's, array for array."""
    _, _, ref = tiny_vocab
    module = compiled_module()
    texts = adversarial_texts(3, 3000) + ["a\uffff b", " \uffff", "x \uffff  y"]
    want = [ref.encode(t) for t in texts]
    rng = random.Random(4)
    for max_cached in (40, piece_cache.MAX_CACHED):
        compiled = piece_cache.CompiledSegmentTokenizer(ReferenceTokenizer(ref), module,
                                                        max_cached=max_cached)
        python = PieceCachedTokenizer(ReferenceTokenizer(ref), max_cached=max_cached)
        for _ in range(2):                   # cold, then warm
            start = 0
            while start < len(texts):
                batch = texts[start:start + rng.randint(1, 60)]
                ids, lengths = compiled.encode_batch(batch)
                assert ids.dtype == np.int32 and lengths.dtype == np.int64
                py_ids, py_lengths = python.encode_batch(batch)
                assert np.array_equal(ids, py_ids) and np.array_equal(lengths, py_lengths)
                assert compiled.tokenize_batch(batch) == want[start:start + len(batch)]
                start += len(batch)
        # cleared before a batch once past max_cached: never more than one batch beyond it
        most_per_batch = 60 * max(len(split_segments(t)) for t in texts)
        assert 0 < len(compiled._cache) <= max_cached + most_per_batch


def test_compiled_cache_tokenizes_first_segments_alone(tiny_vocab):
    """A text's first segment may start with whitespace; joined after another segment it would
    pre-tokenize differently, so it gets its own call; every later segment is joined."""
    _, _, ref = tiny_vocab
    tok = ReferenceTokenizer(ref)
    compiled = piece_cache.CompiledSegmentTokenizer(tok, compiled_module())
    texts = [" ", "  x", "\n y", "a b", " c"]
    assert compiled.tokenize_batch(texts) == [ref.encode(t) for t in texts]
    assert tok.calls == [" ", "\n", "a", " x y b c"]   # " " twice a first segment: once
    tok.calls.clear()
    assert compiled.tokenize_batch(texts) == [ref.encode(t) for t in texts]
    assert tok.calls == []                   # warm: no call at all


def test_compiled_cache_rejects_what_it_cannot_encode(tiny_vocab):
    _, _, ref = tiny_vocab
    compiled = piece_cache.CompiledSegmentTokenizer(ReferenceTokenizer(ref), compiled_module())
    with pytest.raises(ValueError, match="text 1 is not valid Unicode"):
        compiled.encode_batch(["ok", "half \ud800 pair"])
    with pytest.raises(TypeError, match="text 0 is not a str"):
        compiled.encode_batch([b"bytes"])
    assert compiled.tokenize_batch(["ok now"]) == [ref.encode("ok now")]


def test_no_cpp_env_selects_python_path(tiny_vocab, monkeypatch):
    _, _, ref = tiny_vocab
    monkeypatch.setenv("XMOE_NO_CPP", "1")
    assert piece_cache.compiled_segment_cache() is None
    assert isinstance(piece_cache.segment_cached_tokenizer(ReferenceTokenizer(ref)),
                      PieceCachedTokenizer)


@pytest.mark.parametrize("append_eod", [True, False])
def test_encode_texts_matches_per_document_lists(tiny_vocab, append_eod):
    """ChunkEncoder's array bookkeeping against the per-document loop it replaced: empty
    sentences dropped, documents without ids skipped (by reason), EOD after the last sequence."""
    from megatron.data.preprocess.encode import (EMPTY_TEXT, NO_TOKENS, ChunkEncoder,
                                                 EncoderSettings)
    vocab, merges, ref = tiny_vocab
    encoder = ChunkEncoder(EncoderSettings(("text",), "GPT2BPETokenizer", vocab, merges, 128,
                                           append_eod, False, False))
    encoder.splitter = lambda text: text.split("|") if text != "-" else []
    texts = ["One|two", "", "|", "-", "a||b|", "Caf\u00e9 \U0001F600", "x"]
    eod = ref.encoder["<|endoftext|>"]
    seqs, counts = [], []
    for text in texts:
        doc = [ref.encode(s) for s in encoder.splitter(text) if ref.encode(s)]
        if doc:
            doc[-1] += [eod] if append_eod else []
            seqs += doc
            counts.append(len(doc))
    out = encoder._encode_texts(texts)
    assert out.tokens.dtype == np.uint16
    assert out.tokens.tolist() == [i for s in seqs for i in s]
    assert out.seq_lengths.tolist() == [len(s) for s in seqs]
    assert out.doc_seq_counts.tolist() == counts
    assert out.skipped == {EMPTY_TEXT: 1, NO_TOKENS: 2}
    empty = encoder._encode_texts([])
    assert len(empty.tokens) == len(empty.seq_lengths) == len(empty.doc_seq_counts) == 0


def test_tool_output_same_with_and_without_compiled_cache(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    texts = DOCS + adversarial_texts(9, 300)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    for name, no_cpp in (("cpp", "0"), ("python", "1")):
        env = dict(os.environ, XMOE_NO_CPP=no_cpp)
        proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / name, "--append-eod",
                                             "--workers", 2), env=env)
        assert proc.returncode == 0, proc.stderr
        assert_dataset(f"{tmp_path}/{name}_text_document", expected(ref, texts))


# --------------------------------------------------------------------------- bad input

BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated',
    "not a JSON object": b'["text"]',
    "missing key": b'{"body": "no text key"}',
    "text not a string": b'{"text": 5}',
    "invalid UTF-8": b'{"text": "caf\xe9"}',
    "lone surrogate": b'{"text": "half \\ud800 pair"}',
    "byte-order mark": b'\xef\xbb\xbf{"text": "bom"}',
}


def no_outputs(directory: Path, stem: str) -> bool:
    return not [p for p in os.listdir(directory) if p.startswith((stem, "." + stem))]


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_stops_with_one_line_naming_file_and_line(tmp_path, tiny_vocab, tool_main,
                                                           capsys, reason):
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0]}, "", BAD_LINES[reason],
                                              {"text": DOCS[2]}])
    args = tool_args(vocab, merges, inp, tmp_path / "out", "--append-eod")
    if reason == "malformed JSON":   # one case as a real process: exit code, no traceback
        proc = run_tool(tmp_path, *args, "--workers", 2)
    else:
        proc = call_main(tool_main, capsys, *args)
    msg = one_line_error(proc)
    assert f"{inp}:3: {reason}" in msg and "--skip-bad-lines" in msg
    assert no_outputs(tmp_path, "out")


def test_skip_bad_lines_counts_every_reason(tmp_path, tiny_vocab):
    vocab, merges, ref = tiny_vocab
    good = [DOCS[0], DOCS[2], DOCS[4]]
    lines = [{"text": good[0]}]
    for reason in sorted(BAD_LINES):
        lines += [BAD_LINES[reason], {"text": good[1]}]
    lines += ["", {"text": ""}, {"text": good[2]}]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o", "--append-eod",
                                         "--skip-bad-lines", "--workers", 2))
    assert proc.returncode == 0, proc.stderr
    assert_dataset(f"{tmp_path}/o_text_document",
                   expected(ref, [good[0]] + [good[1]] * len(BAD_LINES) + [good[2]]))
    for reason in BAD_LINES:
        assert f"{reason}: 1" in proc.stderr
    assert "blank line: 1" in proc.stderr and "(empty text: 1)" in proc.stderr
    assert f"{len(BAD_LINES) + 1} lines skipped" in proc.stderr


def test_usage_errors_are_one_line(tmp_path, tiny_vocab, tool_main, capsys):
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tool_args(vocab, merges, tmp_path / "missing.jsonl", tmp_path / "o"), "not found"),
        (tool_args(vocab, merges, empty, tmp_path / "o"), "no regular non-hidden files"),
        (tool_args(vocab, merges, f"{tmp_path}/*.nothing", tmp_path / "o"), "matches no files"),
        (tool_args(tmp_path / "nope.json", merges, inp, tmp_path / "o"), "--vocab-file"),
        (tool_args(vocab, merges, inp, tmp_path / "o", "--dataset-impl", "lazy"),
         "not supported"),
        (tool_args(vocab, merges, inp, tmp_path / "o", "--workers", 0), "--workers"),
    ]
    for args, needle in cases:
        assert needle in one_line_error(call_main(tool_main, capsys, *args))
    assert no_outputs(tmp_path, "o")


def test_concurrent_writer_of_an_output_prefix_is_refused(tmp_path, tiny_vocab):
    """Another live writer holds the second key's prefix: one line naming it and its PID,
    nothing left for the first key, and the other writer's output intact."""
    from tests.data.test_indexed_dataset import finish_writer, start_writer
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0], "title": DOCS[2]}])
    held = f"{tmp_path}/o_title_document"
    other = start_writer(held, [[[5, 6, 7]]])
    try:
        proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o",
                                             "--json-keys", "text", "title"))
        msg = one_line_error(proc)
        assert held in msg and f"PID {other.pid}" in msg, msg
        assert no_outputs(tmp_path, "o_text_document")
    finally:
        finish_writer(other)
    assert MMapIndexedDataset(held)[0].tolist() == [5, 6, 7]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "o_title_document.bin",
                                            "o_title_document.idx"]


def test_ctrl_c_releases_every_output_prefix(tmp_path, tiny_vocab, tool_main, capsys,
                                             monkeypatch):
    from megatron.data.preprocess import pipeline
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0], "title": DOCS[2]}])

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_documents", interrupted)
    proc = call_main(tool_main, capsys, *tool_args(vocab, merges, inp, tmp_path / "o",
                                                   "--json-keys", "text", "title"))
    assert proc.returncode == 130 and "interrupted" in proc.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no temporaries, no lock files


# --------------------------------------------------------------------------- environment

def test_does_not_import_torch(tmp_path, tiny_vocab):
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0]}])
    args = [str(a) for a in tool_args(vocab, merges, inp, tmp_path / "o", "--append-eod")]
    probe = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{TOOL!r}] + {args!r}
        try:
            runpy.run_path({TOOL!r}, run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch imported"
        print("no-torch-ok")
    """)
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "no-torch-ok" in proc.stdout, proc.stderr


def _nltk_available() -> bool:
    try:
        import nltk  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_nltk_available(), reason="nltk is installed here")
def test_split_sentences_without_nltk_says_how_to_install(tmp_path, tiny_vocab):
    vocab, merges, _ = tiny_vocab
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0]}])
    msg = one_line_error(run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o",
                                                       "--split-sentences")))
    assert "pip install nltk" in msg
    assert no_outputs(tmp_path, "o")


FAKE_PUNKT = '''
class PunktTokenizer:
    """Stands in for nltk's punkt: splits after '. ' (enough to test the tool's plumbing)."""
    def __init__(self, lang):
        assert lang == "english"
    def tokenize(self, text):
        parts = text.split(". ")
        return [p + "." for p in parts[:-1]] + [parts[-1]] if text else []
'''


def test_split_sentences_writes_one_sequence_per_sentence(tmp_path, tiny_vocab):
    """With a stand-in nltk: sentences are sequences, EOD ends the last, `_sentence` names."""
    vocab, merges, ref = tiny_vocab
    fake = tmp_path / "fake"
    (fake / "nltk" / "tokenize").mkdir(parents=True)
    (fake / "nltk" / "__init__.py").write_text("")
    (fake / "nltk" / "tokenize" / "__init__.py").write_text("")
    (fake / "nltk" / "tokenize" / "punkt.py").write_text(FAKE_PUNKT)
    texts = ["One. Two words. Three", "", "Single"]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(fake), os.environ.get("PYTHONPATH")) if p))
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o", "--append-eod",
                                         "--split-sentences", "--workers", 2), env=env)
    assert proc.returncode == 0, proc.stderr
    eod = ref.encoder["<|endoftext|>"]
    seqs = [ref.encode("One."), ref.encode("Two words."), ref.encode("Three") + [eod],
            ref.encode("Single") + [eod]]
    ds = MMapIndexedDataset(f"{tmp_path}/o_text_sentence")
    assert [list(ds.get(i)) for i in range(len(ds))] == seqs
    assert list(ds.doc_idx) == [0, 3, 4]


def test_real_gpt2_vocab(tmp_path, gpt2_files):
    vocab, merges = gpt2_files
    ref = ReferenceGPT2Tokenizer(vocab, merges)
    texts = DOCS + ["GPT-2's tokenizer: it's   spaced\ttabs\n\nand newlines, \u00e9t\u00e9."]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    proc = run_tool(tmp_path, *tool_args(vocab, merges, inp, tmp_path / "o", "--append-eod",
                                         "--workers", 2))
    assert proc.returncode == 0, proc.stderr
    want = expected(ref, texts)
    assert_dataset(f"{tmp_path}/o_text_document", want)
    assert want[0][-2:] == np.array([50256], dtype=np.uint16).tobytes()
