"""Benchmark tools/preprocess_data.py against the original tool's pure-Python approach.

    python benchmarks/preprocess.py [--mb 25] [--workers 2]

Writes ~--mb MB of English-like loose JSON (stdlib docstrings, fixed seed), runs both tools as
subprocesses on it with the same --workers and --append-eod, checks that their .bin/.idx are
byte-identical, and prints wall time, MB/s, docs/s and the speedup of ours over the baseline.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron.data.demo_corpus import build_docstring_corpus  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=25.0, help="input size in MB (default 25)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for both tools")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-file", default=os.path.join(SHARED_DATA, "gpt2-vocab.json"))
    p.add_argument("--merge-file", default=os.path.join(SHARED_DATA, "gpt2-merges.txt"))
    p.add_argument("--work-dir", default=None, help="keep input and outputs here")
    args = p.parse_args()
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if not os.path.isfile(path):
            p.error(f"GPT-2 {flag} {path!r} not found; pass {flag} (GPT-2's gpt2-vocab.json / "
                    "gpt2-merges.txt) or put them in ../shared/data next to the repo")
    return args


def write_corpus(path: str, mb: float, seed: int) -> tuple[int, int]:
    """Loose JSON, one {"text": ...} per line; returns (bytes, documents)."""
    docs = build_docstring_corpus(int(mb * 1e6), seed)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return os.path.getsize(path), len(docs)


def timed_run(script: str, args, work_dir: str, prefix: str,
              input_path: str) -> tuple[float, float]:
    """(wall s, CPU s of the tool and its workers): CPU time is the steadier number on a
    shared machine."""
    cmd = [sys.executable, os.path.join(REPO, script), "--input", input_path,
           "--output-prefix", os.path.join(work_dir, prefix), "--vocab-file", args.vocab_file,
           "--merge-file", args.merge_file, "--append-eod", "--workers", str(args.workers),
           "--log-interval", "1000000"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}):\n{proc.stderr}")
    return wall, cpu


def same_outputs(work_dir: str) -> tuple[bool, int]:
    """Whether ours and the baseline's .bin and .idx match byte for byte; size of our .bin."""
    same = True
    for ext in (".bin", ".idx"):
        with open(os.path.join(work_dir, f"ours_text_document{ext}"), "rb") as a, \
                open(os.path.join(work_dir, f"baseline_text_document{ext}"), "rb") as b:
            same &= a.read() == b.read()
    return same, os.path.getsize(os.path.join(work_dir, "ours_text_document.bin"))


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="xmoe-preprocess-bench-") as tmp:
        work_dir = args.work_dir or tmp
        os.makedirs(work_dir, exist_ok=True)
        input_path = os.path.join(work_dir, "corpus.jsonl")
        n_bytes, n_docs = write_corpus(input_path, args.mb, args.seed)
        mb = n_bytes / 1e6
        print(f"input: {mb:.2f} MB, {n_docs:,} documents, --workers {args.workers}, --append-eod",
              flush=True)
        results = {}
        for name, script, prefix in (
                ("xmoe tools/preprocess_data.py", "tools/preprocess_data.py", "ours"),
                ("pure-Python baseline (Megatron-DeepSpeed approach)",
                 "benchmarks/_baseline_preprocess.py", "baseline")):
            wall, cpu = timed_run(script, args, work_dir, prefix, input_path)
            results[prefix] = wall, cpu
            print(f"{name}: {wall:.2f} s, {mb / wall:.2f} MB/s, {n_docs / wall:,.1f} docs/s "
                  f"(CPU {cpu:.2f} s)", flush=True)
        same, bin_bytes = same_outputs(work_dir)
        print(f"outputs byte-identical (.bin {bin_bytes:,} bytes and .idx): "
              f"{'yes' if same else 'NO'}")
        if not same:
            sys.exit("outputs differ: the speedup below would be meaningless")
        (wall_b, cpu_b), (wall_o, cpu_o) = results["baseline"], results["ours"]
        print(f"speedup vs pure-Python baseline: {wall_b / wall_o:.2f}x "
              f"(CPU time: {cpu_b / cpu_o:.2f}x)")


if __name__ == "__main__":
    main()
