#!/usr/bin/env python3
"""The main job on an embedded default, offline: corpus -> vocabulary -> dataset -> tiny XMoE GPT.

1. builds a small English corpus (loose JSON) from the Python standard library's docstrings;
2. trains a GPT-2-format byte-level BPE vocabulary on it (`tools/train_bpe_vocab.py`);
3. preprocesses it with `tools/preprocess_data.py --append-eod --workers 2`;
4. checks the dataset (`tools/inspect_dataset.py --check`) and decodes a document;
5. trains a tiny XMoE GPT on it with `pretrain_gpt.py` (`MODEL_NAME` below), evaluating on the
   validation and test splits (on CPU here; on a machine with a GPU the same command runs there);
6. prints a summary parsed from the training log: first and last lm loss, validation and test
   loss and perplexity, and per MoE layer how many experts a token wanted and used, how many
   token-expert pairs capacity dropped and how confident the router was, as training went on.
Every step is a tool users run themselves; the commands are printed in full.
`--quick` shortens everything (the test suite runs it).

Routing. XMoE's threshold router gives each token the fewest experts whose probabilities sum to
at least the threshold, so a token's expert count follows the router's confidence. A new router
is near uniform (each of 8 experts ~1/8), and a tiny model trained for minutes stays far from the
sharp routers of long runs: at XMoE's threshold 0.9, tokens still wanted 5.6-7 of 8 experts
after 400 iterations (lr 1e-3 or 3e-3) and 4.2-5.5 after 800, and capacity factor 4 dropped
13-43% of those pairs. The demo therefore uses threshold 0.5 (a token whose top expert holds half
the probability wants that one alone) and lr 3e-3 (the best final loss of 1e-3, 3e-3 and 6e-3):
in 400 iterations the experts a token wants fall from ~4 to ~2.3-3.1, differently per layer, and
the capacity drops of the first iterations fall with them. Long runs use XMoE's 0.9
(`examples_deepspeed/MoE/ds_pretrain_gpt_xmoe_small.sh`).

Threads. On CPU, torch's OpenMP threads busy-wait for each other, and on a machine whose cores
are shared with other processes a step gets several times slower. The demo runs its steps with
OMP_NUM_THREADS=1 unless you set OMP_NUM_THREADS yourself (then yours is used); it prints which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron.data.demo_corpus import build_docstring_corpus  # noqa: E402
from train_bpe_vocab import train_bpe_vocab  # noqa: E402

# The tiny model: XMoE's shape in miniature (small experts in every 2nd layer); routing: see the
# module docstring.
NUM_EXPERTS = 8
THRESHOLD = 0.5
CAPACITY_FACTOR = 4.0
LR = 3e-3
MODEL_NAME = (f"tiny XMoE GPT (4 layers, hidden 128, {NUM_EXPERTS} experts of 128 in layers 2 and "
              f"4, threshold {THRESHOLD}, capacity factor {CAPACITY_FACTOR})")
TINY_MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
              "--seq-length", "128", "--max-position-embeddings", "128",
              "--num-experts", str(NUM_EXPERTS), "--expert-interval", "2",
              "--moe-ffn-hidden-size", "128", "--use-threshold", "--threshold", str(THRESHOLD),
              "--moe-loss-coeff", "0.01", "--moe-train-capacity-factor", str(CAPACITY_FACTOR),
              "--moe-eval-capacity-factor", str(CAPACITY_FACTOR),
              "--hidden-dropout", "0.0", "--attention-dropout", "0.0"]
FULL = {"corpus_mb": 4.0, "vocab_size": 4096, "train_iters": 400}
QUICK = {"corpus_mb": 0.3, "vocab_size": 600, "train_iters": 60}


def child_env(environ: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, str], str]:
    """(environment of the demo's steps, a line saying which thread count they use).

    OMP_NUM_THREADS=1 unless the caller set it: torch's OpenMP threads busy-wait, so on cores
    shared with other work more threads make each step slower, not faster (module docstring).
    """
    env = dict(os.environ if environ is None else environ)
    if env.get("OMP_NUM_THREADS"):
        return env, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (yours)"
    env["OMP_NUM_THREADS"] = "1"
    return env, ("OMP_NUM_THREADS=1 (the demo's default on shared cores; set OMP_NUM_THREADS "
                 "to choose)")


def _run(step: str, cmd: list, env: Dict[str, str]) -> None:
    print(f"\n== {step}: {_shown(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo.py: {step} failed with exit code {result.returncode}")


def _shown(cmd: list) -> str:
    return " ".join(["python"] + [os.path.relpath(c) if os.path.isabs(c) else c
                                  for c in cmd[1:]])


def _show_first_tokens(dataset: str, vocab: str, merges: str, n: int = 40) -> None:
    from megatron.data.indexed_dataset import MMapIndexedDataset
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_type="GPT2BPETokenizer", vocab_file=vocab,
                                merge_file=merges)
    ids = MMapIndexedDataset(dataset).get(0, length=n).tolist()
    pieces = [tokenizer.detokenize([i]) for i in ids]
    print(f"\n== first {n} tokens of document 0: {ids}\n   as text pieces: {pieces}")


def build_dataset(args: argparse.Namespace, env: Dict[str, str]) -> Tuple[str, str, str]:
    """Steps 1-4: corpus, vocabulary, mmap dataset, checks. Returns (dataset, vocab, merges)."""
    docs = build_docstring_corpus(max_bytes=int(args.corpus_mb * 1e6), seed=args.seed)
    corpus = os.path.join(args.out_dir, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"== corpus: {len(docs)} documents, {os.path.getsize(corpus) / 1e6:.1f} MB -> {corpus}")

    vocab, merges = train_bpe_vocab(docs, args.vocab_size, os.path.join(args.out_dir, "vocab"))
    print(f"== vocabulary: {args.vocab_size} entries -> {vocab}, {merges}")

    prefix = os.path.join(args.out_dir, "demo")
    _run("preprocess", [sys.executable, os.path.join(TOOLS, "preprocess_data.py"),
                        "--input", corpus, "--output-prefix", prefix,
                        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                        "--merge-file", merges, "--append-eod", "--workers", str(args.workers)],
         env)
    dataset = f"{prefix}_text_document"
    _run("inspect", [sys.executable, os.path.join(TOOLS, "inspect_dataset.py"), dataset], env)
    _run("check", [sys.executable, os.path.join(TOOLS, "inspect_dataset.py"), dataset, "--check"],
         env)
    _show_first_tokens(dataset, vocab, merges)
    return dataset, vocab, merges


def training_command(args: argparse.Namespace, dataset: str, vocab: str, merges: str) -> list:
    """pretrain_gpt.py on one process: Megatron's flags, no DeepSpeed JSON (built from them)."""
    iters = args.train_iters
    log_interval = max(1, iters // 20)
    eval_interval = max(1, iters // 4)
    return [sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *TINY_MODEL,
            "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", str(LR), "--min-lr", "1e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(max(1, iters // 20)), "--weight-decay", "0.1",
            "--adam-beta2", "0.95", "--clip-grad", "1.0", "--seed", str(args.seed),
            "--data-path", dataset, "--vocab-file", vocab, "--merge-file", merges,
            "--split", "80,10,10", "--num-workers", "0",
            "--log-interval", str(log_interval), "--eval-interval", str(eval_interval),
            "--eval-iters", "10", "--test-iters", "20",
            "--save", os.path.join(args.out_dir, "checkpoint"), "--save-interval", str(iters)]


def run_training(cmd: list, log_path: str, env: Dict[str, str]) -> List[str]:
    """Run pretrain_gpt.py, echoing and saving its output; its lines, or SystemExit on failure."""
    print(f"\n== train: {_shown(cmd)}", flush=True)
    lines = []
    with open(log_path, "w", encoding="utf-8") as log, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=env) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise SystemExit(f"demo.py: training failed with exit code {proc.returncode} "
                         f"(log: {log_path})")
    return lines


# ----------------------------------------------------------------------------------------------
# reading Megatron's log lines

ITERATION_RE = re.compile(r"\biteration\s+(\d+)/\s*(\d+)\s*\|.*?\blm loss: ([-+0-9.eEnaif]+)")
MOE_RE = re.compile(r"moe layer (\d+): experts/token wanted ([0-9.]+) used ([0-9.]+) \| "
                    r"dropped ([0-9.]+)% \| top1 p50 ([0-9.]+)")
EVAL_RE = re.compile(r"\b(validation|test) loss at (?:iteration \d+|[^|]*?)\s*\| "
                     r"lm loss value: ([-+0-9.eEnaif]+) \| lm loss PPL: ([-+0-9.eEnaif]+)")


class Routing(NamedTuple):
    """One MoE layer over one log interval (means): experts per token the router wanted, those
    used after capacity, % of wanted pairs dropped, median top-1 probability."""

    wanted: float
    used: float
    dropped: float
    top1_p50: float


@dataclass
class TrainingLog:
    """What the summary needs from the log: per logged iteration the lm loss and each MoE layer's
    Routing; the evaluations in order."""

    losses: Dict[int, float] = field(default_factory=dict)
    moe: Dict[int, Dict[int, Routing]] = field(default_factory=dict)
    evals: List[Tuple[str, float, float]] = field(default_factory=list)

    def last_eval(self, what: str) -> Optional[Tuple[float, float]]:
        found = [(loss, ppl) for w, loss, ppl in self.evals if w == what]
        return found[-1] if found else None


def parse_log(lines: List[str]) -> TrainingLog:
    log, iteration = TrainingLog(), None
    for line in lines:
        if m := ITERATION_RE.search(line):
            iteration = int(m.group(1))
            log.losses[iteration] = float(m.group(3))
        elif (m := MOE_RE.search(line)) and iteration is not None:
            log.moe.setdefault(iteration, {})[int(m.group(1))] = \
                Routing(*(float(g) for g in m.groups()[1:]))
        elif m := EVAL_RE.search(line):
            log.evals.append((m.group(1), float(m.group(2)), float(m.group(3))))
    return log


def summary_lines(log: TrainingLog, seconds: float) -> List[str]:
    """The demo's closing summary (raises SystemExit if the log lacks the lines it needs)."""
    if not log.losses:
        raise SystemExit("demo.py: no 'iteration ... | lm loss: X |' line in the training log")
    its = sorted(log.losses)
    first, last = its[0], its[-1]
    out = [f"training: {last} iterations in {seconds:.0f} s",
           f"lm loss: {log.losses[first]:.3f} (iteration {first}) -> {log.losses[last]:.3f} "
           f"(iteration {last})"]
    for what in ("validation", "test"):
        found = log.last_eval(what)
        out.append(f"{what}: lm loss {found[0]:.3f}, PPL {found[1]:.1f}" if found
                   else f"{what}: not in the log")
    return out + (routing_lines(log) if log.moe else [])


def routing_lines(log: TrainingLog) -> List[str]:
    """Experts per token at five points of training, what the columns mean, and per layer how
    the wanted count moved from the first logged interval to the last."""
    logged = sorted(log.moe)
    picks = sorted({logged[round(k * (len(logged) - 1) / 4)] for k in range(5)})
    out = ["experts per token, per MoE layer: wanted -> used (dropped %), p50 of top-1 probability"]
    for it in picks:
        layers = "  ".join(f"layer {L}: {r.wanted:.2f} -> {r.used:.2f} ({r.dropped:.1f}%) "
                           f"p50 {r.top1_p50:.2f}" for L, r in sorted(log.moe[it].items()))
        out.append(f"  iteration {it:5d}  {layers}")
    out += [f"  wanted:  experts the router chose per token, in probability order until they sum "
            f"to >= {THRESHOLD}",
            f"  used:    those computed, after capacity (an expert takes <= {CAPACITY_FACTOR} x "
            f"tokens / {NUM_EXPERTS} per batch)",
            "  dropped: wanted token-expert pairs that capacity cut",
            f"  p50:     median top-1 probability (a token whose top expert has >= {THRESHOLD} "
            "wants only it)"]
    start, end = log.moe[logged[0]], log.moe[logged[-1]]
    for layer in sorted(end):
        a, b = start.get(layer, end[layer]), end[layer]
        moved = ("fell" if b.wanted < a.wanted - 0.05 else
                 "rose" if b.wanted > a.wanted + 0.05 else "stayed")
        out.append(f"  layer {layer}: wanted {a.wanted:.2f} -> {b.wanted:.2f} from iteration "
                   f"{logged[0]} to {logged[-1]} ({moved}); p50 {a.top1_p50:.2f} -> "
                   f"{b.top1_p50:.2f}; dropped {a.dropped:.1f}% -> {b.dropped:.1f}%")
    return out


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="demo_output")
    parser.add_argument("--quick", action="store_true",
                        help=f"shortened run: {QUICK} unless given explicitly")
    parser.add_argument("--corpus-mb", type=float, default=None,
                        help=f"corpus size (default {FULL['corpus_mb']})")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size (default {FULL['vocab_size']})")
    parser.add_argument("--train-iters", type=int, default=None,
                        help=f"training iterations (default {FULL['train_iters']}); 0 skips "
                             "training")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_iters < 0:
        parser.error(f"--train-iters must be >= 0, got {args.train_iters}")
    # Against the caller's directory: training runs with the repository as its directory.
    args.out_dir = os.path.abspath(args.out_dir)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    env, threads = child_env()
    print(f"== threads: {threads}")
    t0 = time.time()
    dataset, vocab, merges = build_dataset(args, env)
    print(f"\ndataset ready in {time.time() - t0:.1f} s; prefix: {dataset}")
    if args.train_iters == 0:
        return 0

    t1 = time.time()
    # A previous demo's checkpoints: pretrain_gpt.py refuses to --save over a run's it did not load.
    shutil.rmtree(os.path.join(args.out_dir, "checkpoint"), ignore_errors=True)
    lines = run_training(training_command(args, dataset, vocab, merges),
                         os.path.join(args.out_dir, "train.log"), env)
    summary = summary_lines(parse_log(lines), time.time() - t1)
    print(f"\n== summary: {MODEL_NAME}")
    for line in summary:
        print(f"   {line}")
    print(f"\ndemo finished in {time.time() - t0:.1f} s; log: "
          f"{os.path.join(args.out_dir, 'train.log')}, checkpoint: "
          f"{os.path.join(args.out_dir, 'checkpoint')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
