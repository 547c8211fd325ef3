"""Issue 7's multi-GPU experiments on one host, each one command: EP=N correctness, weak scaling.

    python benchmarks/multi_gpu_runs.py correctness --gpus 8 [--steps 50] [--workdir DIR]
    python benchmarks/multi_gpu_runs.py scaling --gpus 1,2,4,8 [--iters 20]
    python benchmarks/multi_gpu_runs.py correctness --gpus 2 --small --device cpu --steps 4
    python benchmarks/multi_gpu_runs.py scaling --gpus 1,2 --small --device cpu    # CPU, gloo

correctness: a dataset is built once under --workdir, offline (tools/demo.py's pieces: stdlib
docstring corpus -> BPE vocabulary -> tools/preprocess_data.py). XMoE-small (12 layers, hidden
768, 12 heads, seq 1024, 64 experts of 384 every 2nd layer, threshold 0.9, capacity factor 8,
bf16; --small: a tiny fp32 model) trains --steps iterations twice from the same seed on the same
data, dropout 0: on 1 process with global batch m x N (gradient accumulation N), and on N
processes with --moe-expert-parallel-size N (global batch m x N, no accumulation). Their
per-iteration lm loss and grad norm (TensorBoard tags lm-loss, grad-norm) must agree within
--rtol: 2e-2 relative in bf16 (the EP run's GEMMs see other shapes and its gradients are summed
in another order, so bf16 rounding differs and grows over the steps), 1e-4 in fp32. The EP run
evaluates at its last iteration (--eval-interval = steps) and saves a checkpoint; that is
converted to EP=1 (tools/convert_expert_parallel_checkpoint.py) and evaluated by one process
(pretrain_gpt.py --eval-only), whose validation and test losses must equal the EP run's
(both evaluate the first batches of each split, as
tests/test_pretrain_gpt.py::test_convert_expert_parallel_2_to_1_evaluates_the_same checks).

scaling: benchmarks/train_throughput.py --configs xmoe (synthetic data, micro-batch 16 x 1024
per GPU; --small: tiny shapes) on N = 1, 2, 4, 8 processes with --moe-expert-parallel-size N,
i.e. weak scaling (global batch = micro-batch x N): tokens/s, efficiency tokens/s(N) /
(N x tokens/s(1)) (= ms/step(1) / ms/step(N), computed so), and the all-to-all's time per step
and share of the step (train_throughput's profile: NCCL all-to-all kernels, waits included).
Target printed, not asserted: >= 90% efficiency at 8 GPUs with EP = 8.

Launching: N > 1 processes through the deepspeed launcher (`python -m deepspeed.launcher.runner
--num_gpus N`, which needs no `deepspeed` script on PATH: deepspeed may be installed with pip
--target), one process with plain python. Children get NCCL_NVLS_ENABLE=0 (and PyTorch's and
NVSHMEM's multicast off): NVLink multicast can take a shared host's GPUs down. Each run has a
--timeout (its process group is killed); its output goes to WORKDIR/logs/, the tail is printed
if it fails. --device cpu (gloo, OMP_NUM_THREADS=1) is for machines without GPUs: the launcher
sets CUDA_VISIBLE_DEVICES, so on a GPU host pretrain_gpt.py would still use the GPUs.
Exit status: 0 all ran and agree (or scaled), 1 results disagree, 2 a run failed or hung.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
XMOE_SMALL = ["--num-layers", "12", "--hidden-size", "768", "--ffn-hidden-size", "3072",
              "--num-attention-heads", "12", "--seq-length", "1024",
              "--max-position-embeddings", "1024", "--num-experts", "64",
              "--moe-ffn-hidden-size", "384", "--bf16"]
TINY = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "256",
        "--num-attention-heads", "4", "--seq-length", "64", "--max-position-embeddings", "64",
        "--num-experts", "8", "--moe-ffn-hidden-size", "64"]
MOE = ["--expert-interval", "2", "--use-threshold", "--threshold", "0.9",
       "--moe-train-capacity-factor", "8.0", "--moe-eval-capacity-factor", "8.0",
       "--moe-min-capacity", "4", "--moe-loss-coeff", "0.01", "--create-moe-param-group"]
# Corpus sizes: enough documents (~160, ~24) for an 80/10/10 split with non-empty validation
# and test splits; the training split is repeated over epochs as Megatron's dataset does.
DATA = {"full": {"corpus_mb": 2.0, "vocab_size": 8192},
        "small": {"corpus_mb": 0.5, "vocab_size": 300}}
TARGET_EFFICIENCY = 0.90


# ----------------------------------------------------------------------------------------------
# launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str) -> Dict[str, str]:
    """The environment of every child: no inherited rank variables, the repo importable,
    NVLink multicast off; on CPU one OpenMP thread (on few cores, torch's threads spin
    against the other ranks and a step gets many times slower)."""
    env = dict(os.environ, **MULTICAST_OFF, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch_command(script: Path, args: Sequence[str], nproc: int) -> List[str]:
    """`python script args` for one process, else the deepspeed launcher with nproc ranks."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--num_nodes", "1", "--master_port", str(_free_port()), str(script), *args]


def run_logged(name: str, cmd: List[str], opts: argparse.Namespace) -> Optional[str]:
    """Run cmd (its own process group) with output to WORKDIR/logs/NAME.log; its output, or
    None (tail printed) if it failed or outlived --timeout (then the group is killed)."""
    log = Path(opts.workdir, "logs", f"{name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=child_env(opts.device), start_new_session=True)
        try:
            rc = proc.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _kill_group(proc)
    text = log.read_text(errors="replace")
    if rc == 0:
        print(f"   {name}: done in {time.time() - start:.0f} s (log {log})", flush=True)
        return text
    why = f"hung: killed after --timeout {opts.timeout} s" if rc is None else f"exit code {rc}"
    print(f"   {name}: FAILED ({why}); log {log}, last lines:")
    for line in text.splitlines()[-40:]:
        print(f"   | {line}")
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------------------------
# data and flags


def build_data(opts: argparse.Namespace) -> Tuple[str, str, str]:
    """(dataset prefix, vocab, merges) under WORKDIR/data, built once by tools/demo.py's
    build_dataset (corpus, BPE vocabulary, preprocess_data.py, inspect/check)."""
    sys.path.insert(0, str(REPO / "tools"))
    import demo  # tools/demo.py

    size = "small" if opts.small else "full"
    out_dir = Path(opts.workdir, f"data_{size}")
    ready = out_dir / "ready.json"
    if ready.is_file():
        paths = json.loads(ready.read_text())
        print(f"== data: reusing {paths['prefix']}")
        return paths["prefix"], paths["vocab"], paths["merges"]
    out_dir.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(out_dir=str(out_dir), seed=1234, **DATA[size],
                              workers=min(8, os.cpu_count() or 1))
    start = time.time()
    prefix, vocab, merges = demo.build_dataset(args, demo.child_env()[0])
    ready.write_text(json.dumps({"prefix": prefix, "vocab": vocab, "merges": merges}))
    print(f"== data: built in {time.time() - start:.0f} s: {prefix}")
    return prefix, vocab, merges


def pretrain_flags(opts: argparse.Namespace, data: Tuple[str, str, str]) -> List[str]:
    """Every correctness run's flags: model, MoE, batch m per rank, global m x N, dropout 0,
    log interval 1, evaluation at the last iteration."""
    prefix, vocab, merges = data
    m, n, steps = opts.micro_batch, opts.gpus, opts.steps
    return [*(TINY if opts.small else XMOE_SMALL), *MOE, "--init-method-std", "0.014",
            "--micro-batch-size", str(m), "--global-batch-size", str(m * n),
            "--train-iters", str(steps), "--lr", "4.5e-4", "--min-lr", "4.5e-5",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, steps // 10)),
            "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.1",
            "--clip-grad", "1.0", "--seed", "1234", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--data-path", prefix, "--vocab-file", vocab,
            "--merge-file", merges, "--split", "80,10,10", "--num-workers", "0",
            "--log-interval", "1", "--eval-interval", str(steps),
            "--eval-iters", str(opts.eval_iters), "--test-iters", str(opts.eval_iters)]


def tensorboard_scalars(log_dir: Path, tag: str) -> Dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


# ----------------------------------------------------------------------------------------------
# correctness: EP=N vs one process, and the converted checkpoint's evaluation


def correctness(opts: argparse.Namespace) -> int:
    n, runs, script = opts.gpus, Path(opts.workdir, "runs"), REPO / "pretrain_gpt.py"
    shutil.rmtree(runs, ignore_errors=True)         # stale TensorBoard events would mix in
    runs.mkdir(parents=True)
    flags = pretrain_flags(opts, build_data(opts))
    commands = [
        ("reference_1proc", launch_command(
            script, flags + ["--tensorboard-dir", str(runs / "tb_ref")], 1)),
        (f"expert_parallel_{n}", launch_command(
            script, flags + ["--moe-expert-parallel-size", str(n), "--tensorboard-dir",
                             str(runs / "tb_ep"), "--save", str(runs / "ckpt_ep"),
                             "--save-interval", str(opts.steps)], n)),
        ("convert_to_ep1", [
            sys.executable, str(REPO / "tools" / "convert_expert_parallel_checkpoint.py"),
            "--load", str(runs / "ckpt_ep"), "--save", str(runs / "ckpt_ep1"),
            "--target-expert-parallel-size", "1"]),
        ("eval_only_ep1", launch_command(
            script, flags + ["--eval-only", "--load", str(runs / "ckpt_ep1"),
                             "--tensorboard-dir", str(runs / "tb_eval")], 1))]
    for k, (name, cmd) in enumerate(commands):
        if run_logged(name, cmd, opts) is None:
            print("correctness: FAIL (a run failed)")
            return 2
        if k == 1:
            train_ok = compare_training(runs / "tb_ref", runs / "tb_ep", opts)
    eval_ok = compare_eval(runs / "tb_ep", runs / "tb_eval", opts)
    print(f"correctness: {'PASS' if train_ok and eval_ok else 'FAIL'}")
    return 0 if train_ok and eval_ok else 1


def compare_training(ref_dir: Path, ep_dir: Path, opts: argparse.Namespace) -> bool:
    """Print the per-iteration lm loss and grad norm of both runs; True if all within rtol."""
    n, steps = opts.gpus, opts.steps
    got = {tag: [tensorboard_scalars(d, tag) for d in (ref_dir, ep_dir)]
           for tag in ("lm-loss", "grad-norm")}
    missing = [f"{tag} of the {'1-process' if k == 0 else f'EP={n}'} run"
               for tag, pair in got.items() for k, s in enumerate(pair)
               if sorted(s) != list(range(1, steps + 1))]
    if missing:
        print(f"agree: no (iterations 1..{steps} missing in TensorBoard: {', '.join(missing)})")
        return False
    print(f"\nper iteration (1 process x {n} accumulated micro-batches vs EP={n} on {n} ranks):")
    print(f"{'iter':>5} | {'lm loss 1 proc':>14} | {f'lm loss EP={n}':>14} | {'rel diff':>8} | "
          f"{'grad norm 1 proc':>16} | {f'grad norm EP={n}':>16} | {'rel diff':>8}")
    worst = {"lm-loss": 0.0, "grad-norm": 0.0}
    for it in range(1, steps + 1):
        cells = []
        for tag, (a, b) in got.items():
            d = rel_diff(a[it], b[it])
            worst[tag] = max(worst[tag], d)
            width = 14 if tag == "lm-loss" else 16
            cells.append(f"{a[it]:>{width}.6f} | {b[it]:>{width}.6f} | {d:8.1e}")
        print(f"{it:>5} | " + " | ".join(cells))
    ok = all(v <= opts.rtol for v in worst.values())
    print(f"max relative difference: lm loss {worst['lm-loss']:.2e}, grad norm "
          f"{worst['grad-norm']:.2e} (tolerance {opts.rtol:g}, {precision(opts)})")
    print(f"agree: {'yes' if ok else 'no'}")
    return ok


def compare_eval(ep_dir: Path, eval_dir: Path, opts: argparse.Namespace) -> bool:
    """The EP run's validation / test loss at its last iteration vs the converted checkpoint's
    --eval-only losses (both from the first batches of each split)."""
    ok = True
    print(f"\nevaluation at iteration {opts.steps} (EP={opts.gpus} run vs its checkpoint "
          "converted to EP=1, --eval-only on 1 process):")
    for what in ("validation", "test"):
        a = tensorboard_scalars(ep_dir, f"{what}/lm-loss").get(opts.steps)
        b = tensorboard_scalars(eval_dir, f"{what}/lm-loss").get(opts.steps)
        if a is None or b is None:
            print(f"{what} lm loss: missing (EP run {a}, eval-only {b})")
            ok = False
            continue
        d = rel_diff(a, b)
        ok = ok and d <= opts.rtol
        print(f"{what} lm loss: EP={opts.gpus} run {a:.6f} | converted, eval-only {b:.6f} | "
              f"rel diff {d:.1e}")
    print(f"eval loss matches: {'yes' if ok else 'no'} (tolerance {opts.rtol:g})")
    return ok


def precision(opts: argparse.Namespace) -> str:
    if not opts.small:
        return "bf16"
    return "fp32 on CPU" if opts.device == "cpu" else "fp32"


# ----------------------------------------------------------------------------------------------
# scaling: train_throughput.py on N ranks with EP = N

RESULT_RE = re.compile(r"^xmoe\s+\|\s+([\d.]+)k tokens/s \|\s+([\d.]+) ms/step .*$", re.M)
A2A_RE = re.compile(r"\| all-to-all ([\d.]+) ms/step \([^,]*, ([\d.]+)% of step\)")


def scaling(opts: argparse.Namespace) -> int:
    rows: List[Tuple[int, Optional[Tuple[float, float, Optional[float], Optional[float]]]]] = []
    for n in opts.gpu_list:
        args = ["--configs", "xmoe", "--iters", str(opts.iters), "--device", opts.device,
                *(["--small"] if opts.small else []), *shlex.split(opts.bench_args)]
        if n > 1:
            args.append(f"--megatron-args=--moe-expert-parallel-size {n}")
        out = run_logged(f"scaling_{n}", launch_command(
            REPO / "benchmarks" / "train_throughput.py", args, n), opts)
        m = RESULT_RE.search(out or "")
        if m:
            print(f"   {m.group(0)}")
            a2a = A2A_RE.search(m.group(0))
            rows.append((n, (float(m.group(1)) * 1e3, float(m.group(2)),
                             float(a2a.group(1)) if a2a else None,
                             float(a2a.group(2)) if a2a else None)))
        else:
            if out is not None:
                print(f"   scaling_{n}: no 'xmoe | ... tokens/s' line in its output")
            rows.append((n, None))
    print_scaling_table(rows, "tiny XMoE (--small)" if opts.small else "XMoE-small")
    return 0 if all(r is not None for _, r in rows) else 2


def print_scaling_table(rows, model: str) -> None:
    """N, tokens/s, per GPU, efficiency vs N x the 1-GPU run, ms/step, all-to-all; target."""
    base = dict(rows).get(1)
    print(f"\nweak scaling, {model}, micro-batch per GPU fixed, EP = N (N = 1: no EP):")
    print(f"{'N':>2} | {'tokens/s':>10} | {'per GPU':>9} | {'efficiency':>10} | "
          f"{'ms/step':>8} | {'all-to-all ms/step':>18} | {'all-to-all share':>16}")
    eff8 = None
    for n, r in rows:
        if r is None:
            print(f"{n:>2} | failed")
            continue
        tps, ms, a2a_ms, share = r
        # tokens/s(N) / (N x tokens/s(1)) = ms/step(1) / ms/step(N) at a fixed micro-batch per
        # GPU; from ms/step, printed to 0.01 ms where tokens/s is rounded to 0.1k
        eff = base[1] / ms if base else None
        if n == 8:
            eff8 = eff
        print(f"{n:>2} | {tps:>10.0f} | {tps / n:>9.0f} | "
              f"{'-' if eff is None else f'{100 * eff:.1f}%':>10} | {ms:>8.2f} | "
              f"{'-' if a2a_ms is None else f'{a2a_ms:.2f}':>18} | "
              f"{'-' if share is None else f'{share:.1f}%':>16}")
    verdict = ("not measured (no 8-GPU run, or no 1-GPU baseline)" if eff8 is None else
               f"{100 * eff8:.1f}%: {'met' if eff8 >= TARGET_EFFICIENCY else 'NOT met'}")
    print(f"target: >= {100 * TARGET_EFFICIENCY:.0f}% efficiency at 8 GPUs with EP = 8: {verdict}")


# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="experiment", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: gloo, for machines without GPUs (tests)")
    common.add_argument("--small", action="store_true", help="tiny model (CPU smoke runs)")
    common.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "xmoe_multi_gpu_runs"),
                        help="data, logs, TensorBoard, checkpoints (default %(default)s)")
    common.add_argument("--timeout", type=float, default=420.0,
                        help="seconds per run before it counts as hung (default %(default)s)")
    c = sub.add_parser("correctness", parents=[common], help="EP=N vs 1 process; conversion")
    c.add_argument("--gpus", type=int, required=True, help="N: ranks of the EP run (>= 2)")
    c.add_argument("--steps", type=int, default=50)
    c.add_argument("--micro-batch", type=int, default=None,
                   help="m, per rank (default 16; 4 with --small)")
    c.add_argument("--eval-iters", type=int, default=None,
                   help="validation and test iterations (default 4; 2 with --small)")
    c.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (default 2e-2 in bf16, 1e-4 with --small, fp32)")
    s = sub.add_parser("scaling", parents=[common], help="weak scaling of train_throughput.py")
    s.add_argument("--gpus", required=True, help="comma-separated N, e.g. 1,2,4,8")
    s.add_argument("--iters", type=int, default=20, help="timed steps per loop (default 20)")
    s.add_argument("--bench-args", default="",
                   help="more train_throughput.py flags, e.g. --bench-args='--repeats 1'")
    opts = p.parse_args(argv)
    if opts.experiment == "correctness":
        if opts.gpus < 2 or opts.steps < 1:
            p.error(f"--gpus must be >= 2 and --steps >= 1, got {opts.gpus}, {opts.steps}")
        for flag, full, small in (("micro_batch", 16, 4), ("eval_iters", 4, 2),
                                  ("rtol", 2e-2, 1e-4)):
            if getattr(opts, flag) is None:
                setattr(opts, flag, small if opts.small else full)
    else:
        try:
            opts.gpu_list = [int(x) for x in opts.gpus.split(",")]
        except ValueError:
            p.error(f"--gpus must be comma-separated integers, got {opts.gpus!r}")
    return opts


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)     # in order with the children's output
    os.makedirs(opts.workdir, exist_ok=True)
    print(f"multi_gpu_runs {opts.experiment}: {vars(opts)}", flush=True)
    return correctness(opts) if opts.experiment == "correctness" else scaling(opts)


if __name__ == "__main__":
    sys.exit(main())
