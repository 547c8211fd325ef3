"""End-to-end training throughput on one GPU: XMoE-small vs top-8 vs the dense GPT-125M.

    python benchmarks/train_throughput.py                  # H200: the three configs, ~2 min
    python benchmarks/train_throughput.py --compile        # torch.compile'd, ~4 min
    python benchmarks/train_throughput.py --configs xmoe,dense --profile   # + top kernels
    python benchmarks/train_throughput.py --small --device cpu --iters 1   # smoke run
    deepspeed --num_gpus 8 benchmarks/train_throughput.py --configs xmoe \
        --megatron-args='--moe-expert-parallel-size 8'      # weak scaling: micro-batch per GPU

Every config goes through the step users run: the Megatron command line of
examples_deepspeed/MoE/ds_pretrain_gpt_*.sh (megatron.arguments parse_args / validate_args /
build_configs), megatron.engine.setup_model_and_optimizer (GPTModel, our AdamW, fused on CUDA,
DeepSpeed's engine, bf16, ZeRO 0) and Trainer.train_step (forward, engine.backward, engine.step,
LR schedule, MoE statistics). Data are SYNTHETIC: uniform random token ids in [0, 50257), a few
batches made once on the device and cycled (no DataLoader). validate_args insists that
--data-path / --vocab-file / --merge-file exist, so a one-document placeholder is written to a
temporary directory; nothing reads it.

Configs (12 layers, hidden 768, 12 heads, seq 1024, micro-batch 16 = global batch 16, so every
step is one micro-batch plus an optimizer step; vocabulary 50257 padded to 50304; dropout 0.1,
init std 0.014, Adam betas 0.9 / 0.95, weight decay 0.1, clipping 1.0, the scripts' LR
schedule, whose warmup keeps the LR near 0 over the benchmark's steps, as at a run's start):
  xmoe   64 experts of 384 in every 2nd layer, threshold router 0.9, capacity factor 8
  topk8  the same experts, top-8 router (--use-topk --topk 8)
  dense  GPT-125M: --num-experts 1, FFN 3072

Router sharpness. At initialisation the router's probabilities are almost uniform, so a
threshold of 0.9 wants ~50 of 64 experts per token and capacity (factor 8) cuts that to 8:
XMoE would then cost exactly what top-8 costs. A trained threshold router is confident, so that
most tokens take a few experts (the point of XMoE). By default each MoE layer's router weight
is therefore scaled once, before timing, until a threshold-0.9 router on that layer's input
wants --target-experts experts per token (default 3; 0 keeps the init). The top-8 model gets
the same sharpening, which skews its load: at capacity factor 8 (exactly 8 slots per token on
average) it then drops ~20% of its pairs. The experts per token printed are those the routers
actually used during the timed steps (the MoE statistics), and the top-8 / XMoE FLOP ratio is
taken from them.

Metrics:
  tokens/s, ms/step   global batch tokens / wall time per step (synchronised before and after
                      the timed loop, no sync inside it), median of --repeats timed loops
  MFU                 model FLOPs per step / step time / 790e12 (H200 bf16 dense peak measured
                      on this card), FLOPs as megatron.training_log.FlopsModel counts them for
                      the training log: 6 x (active matmul parameters: non-expert parameters
                      except the position table, the tied embedding once as the output layer,
                      + per MoE layer the measured experts/token x one expert's parameters)
                      x tokens + 12 x layers x hidden x seq x tokens (attention QK^T and AV,
                      forward + backward, not halved for causality)
  peak mem            torch.cuda.max_memory_allocated over the timed steps (model, optimizer,
                      activations)
  GPU busy            GPU kernel time per step (torch.profiler) / wall time per step: well
                      under 100% means the host (Python, DeepSpeed, host syncs) is the limit
  experts/token       used (after capacity) and wanted, mean over MoE layers and timed steps
  MoE share           share of the step's GPU kernel time spent in the MoE layers, from
                      torch.profiler over --profile-steps steps; forward kernels under a range
                      around each MoELayer, backward kernels of the autograd nodes created
                      there (benchmarks/_moe_profile.py says how). Not with --compile.
  all-to-all          with several ranks: time per step in the expert-parallel all-to-all,
                      from the same profile (NCCL's all-to-all / SendRecv kernels on GPU, the
                      c10d / gloo all-to-all ops on CPU, overlaps counted once), and its share
                      of the timed step. A kernel's time includes waiting for the slowest peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_TFLOPS = 790.0              # H200 bf16 dense matmul, measured on the device (see docs)
VOCAB = 50257                    # GPT-2's vocabulary; Megatron pads it to 50304
TARGET_TOKENS_PER_S = 450_000
TARGET_VS_DENSE = 0.95

MODEL = ["--num-layers", "12", "--hidden-size", "768", "--ffn-hidden-size", "3072",
         "--num-attention-heads", "12", "--seq-length", "1024",
         "--max-position-embeddings", "1024", "--micro-batch-size", "16"]
SMALL_MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
               "--num-attention-heads", "4", "--seq-length", "64",
               "--max-position-embeddings", "64", "--micro-batch-size", "2"]
# The launch scripts' training flags (examples_deepspeed/MoE/gpt_launch_common.sh), their LR
# schedule included: the benchmark's steps are the first of a run, deep in the warmup (LR ~1e-7),
# as a real run's are. (A constant 4.5e-4 from step 0 moves every Adam-updated weight by ~its
# init scale within 30 steps, and routing collapses onto few experts.)
TRAINING = ["--init-method-std", "0.014", "--lr", "4.5e-4", "--min-lr", "4.5e-6",
            "--lr-decay-style", "cosine", "--lr-warmup-tokens", str(60000 * 256 * 1024 // 10),
            "--lr-decay-tokens", str(60000 * 256 * 1024),
            "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.1",
            "--clip-grad", "1.0", "--seed", "1234", "--bf16", "--deepspeed"]
MOE = ["--expert-interval", "2", "--moe-train-capacity-factor", "8.0",
       "--moe-eval-capacity-factor", "8.0", "--moe-min-capacity", "4", "--moe-loss-coeff", "0.01",
       "--create-moe-param-group"]
CONFIGS = {
    "xmoe": ["--num-experts", "64", "--moe-ffn-hidden-size", "384", *MOE,
             "--use-threshold", "--threshold", "0.9"],
    "topk8": ["--num-experts", "64", "--moe-ffn-hidden-size", "384", *MOE,
              "--use-topk", "--topk", "8"],
    "dense": ["--num-experts", "1"],
}
SMALL_EXPERTS = {"--num-experts": "16", "--moe-ffn-hidden-size": "32"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default cuda when available; cpu hides the GPUs")
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--configs", default="xmoe,topk8,dense",
                   help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 8; 1 with --small)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per loop (default 20)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed loops, median reported (default 3; 1 with --small)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default the micro-batch (one micro-batch per step)")
    p.add_argument("--target-experts", type=float, default=3.0,
                   help="sharpen each router until threshold 0.9 wants this many experts per "
                        "token (default 3; 0 keeps the near-uniform init)")
    p.add_argument("--sync-free", action="store_true",
                   help="--moe-sync-free-dispatch: static dispatch buffer, no host sync")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (implies --sync-free: the exact dispatch reads "
                        "group sizes on the host, a graph break with a new shape every step)")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="steps profiled for the MoE share (default 3; 1 with --small; 0: skip)")
    p.add_argument("--profile", action="store_true",
                   help="also print the top CUDA kernels of the profiled steps")
    p.add_argument("--megatron-args", default="",
                   help="extra Megatron flags for every config; write it with '=', e.g. "
                        "--megatron-args='--checkpoint-activations --zero-stage 1'")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)   # the deepspeed launcher passes it (LOCAL_RANK too)
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    for flag, full, small in (("warmup", 8, 1), ("repeats", 3, 1), ("profile_steps", 3, 1)):
        if getattr(args, flag) is None:
            setattr(args, flag, small if args.small else full)
    if args.compile:
        args.sync_free = True
    return args


# ----------------------------------------------------------------------------------------------
# the run's configuration, through megatron.arguments


def placeholder_data(directory: str) -> List[str]:
    """Data flags pointing at a one-document dataset and empty vocab files (never read)."""
    import numpy as np

    from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder

    prefix = os.path.join(directory, "placeholder_text_document")
    with MMapIndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
        builder.add_item(np.arange(16, dtype=np.uint16))
        builder.end_document()
        builder.finalize()
    for name in ("vocab.json", "merges.txt"):
        Path(directory, name).touch()
    return ["--data-path", prefix, "--vocab-file", os.path.join(directory, "vocab.json"),
            "--merge-file", os.path.join(directory, "merges.txt")]


def megatron_argv(name: str, bench: argparse.Namespace, data_flags: List[str],
                  train_iters: int) -> List[str]:
    config = list(CONFIGS[name])
    if bench.small and name != "dense":
        for i, flag in enumerate(config[:-1]):
            config[i + 1] = SMALL_EXPERTS.get(flag, config[i + 1])
    argv = (SMALL_MODEL if bench.small else MODEL) + TRAINING + config + data_flags
    argv += ["--train-iters", str(train_iters)]
    if bench.global_batch_size:
        argv += ["--global-batch-size", str(bench.global_batch_size)]
    if bench.sync_free:
        argv.append("--moe-sync-free-dispatch")
    return argv + shlex.split(bench.megatron_args)


def build_run(argv: List[str], vocab: int):
    from megatron.arguments import build_configs, parse_args as megatron_parse_args
    from megatron.arguments import validate_args
    from megatron.tokenizer.padding import vocab_size_with_padding

    import torch.distributed as dist

    args = megatron_parse_args(argv)
    validated = validate_args(args, world_size=dist.get_world_size() if dist.is_initialized()
                              else 1)
    return build_configs(validated,
                         vocab_size_with_padding(vocab, args.make_vocab_size_divisible_by))


# ----------------------------------------------------------------------------------------------
# synthetic data, router sharpening


def synthetic_batches(t, vocab: int, device, count: int = 4) -> list:
    """`count` micro-batches {"text": int64 [b, s+1]} of uniform random ids, on the device."""
    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    g = torch.Generator(device="cpu").manual_seed(t.seed + rank)      # each rank its own data
    return [{"text": torch.randint(0, vocab, (t.micro_batch_size, t.seq_length + 1),
                                   generator=g).to(device)} for _ in range(count)]


def cycle(items: list):
    while True:
        yield from items


def sharpen_routers(engine, model, batch: dict, device, target: float) -> List[float]:
    """Scale each MoE router weight (in layer order, each on the inputs the previous ones give)
    until a threshold-0.9 router wants `target` experts per token; returns the scales.

    The optimizer's fp32 master copies are refreshed from the scaled weights (DeepSpeed's
    refresh_fp32_params, what load_module_only does), so the first step does not undo it.
    """
    import torch

    from megatron.lm_forward import get_batch
    from megatron.model.mlp_gating import threshold_route

    input_ids, _ = get_batch(batch, device)
    scales = []
    was_training = model.training
    model.eval()
    for layer in (l.mlp for l in model.transformer.layers if l.is_moe):
        if layer.gate_weight is None:
            continue
        captured = []      # the hook must return None (a value would replace the input)
        hook = layer.register_forward_pre_hook(
            lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(input_ids)
        hook.remove()
        x_TD, base = captured[0].float(), layer.gate_weight.detach().float().clone()

        def wanted(scale: float) -> float:
            decision = threshold_route(x_TD @ (base * scale).t(), 0.9, capacity=None)
            return float(decision.wanted_TK.sum()) / x_TD.shape[0]

        lo, hi = math.log(1e-2), math.log(1e4)     # larger scale: peakier, fewer experts
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if wanted(math.exp(mid)) > target else (lo, mid)
        log_scale = torch.tensor([0.5 * (lo + hi)], dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():      # one scale on every rank: routers are
            torch.distributed.all_reduce(log_scale)  # replicated (data-parallel) parameters
            log_scale /= torch.distributed.get_world_size()
        scales.append(math.exp(float(log_scale)))
        with torch.no_grad():
            layer.gate_weight.copy_(base * scales[-1])
    model.train(was_training)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:
        refresh()
    return scales


# ----------------------------------------------------------------------------------------------
# timing and profiling


@dataclasses.dataclass
class Result:
    name: str
    ms_per_step: float
    tokens_per_s: float
    mfu: float
    tflops: float
    peak_gib: float
    used_per_token: Optional[float]
    wanted_per_token: Optional[float]
    dropped: Optional[float]
    kernel_ms: Optional[float]          # GPU kernel time per step (profiled)
    moe_ms: Optional[float]             # of which in MoE layers (eager only)
    lm_loss: float
    params: int
    scales: List[float]
    on_gpu: bool
    world: int = 1                      # ranks; the global batch is micro-batch x world
    all_to_all_ms: Optional[float] = None   # all-to-all kernel (CPU: op) time per step


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, iters: int, device) -> tuple:
    """(seconds, reports) of `iters` train steps; synchronised only before and after."""
    synchronize(device)
    start = time.perf_counter()
    reports = [trainer.train_step() for _ in range(iters)]
    synchronize(device)
    return time.perf_counter() - start, reports


# ----------------------------------------------------------------------------------------------
# one config


def build_trainer(name: str, bench: argparse.Namespace, data_flags: List[str], device):
    """(trainer, scales): the config's run built as pretrain_gpt.py builds it, its routers
    sharpened, compiled if asked, a synthetic iterator in place of the data loader."""
    from megatron.initialize import set_random_seed
    from megatron.engine import compile_model, setup_model_and_optimizer
    from megatron.training import Trainer

    vocab = 1000 if bench.small else VOCAB
    total = bench.warmup + bench.repeats * bench.iters + bench.profile_steps
    run = build_run(megatron_argv(name, bench, data_flags, total), vocab)
    set_random_seed(run.training.seed)
    built = setup_model_and_optimizer(run, device, total)
    batches = synthetic_batches(run.training, vocab, device)
    scales = []
    if bench.target_experts > 0:
        scales = sharpen_routers(built.engine, built.model, batches[0], device,
                                 bench.target_experts)
    if bench.compile:
        # What --compile does (megatron.engine.compile_model), after sharpening: run in the
        # compiled model, the sharpening's hooks and eval passes would force recompiles.
        compile_model(built.model, "inductor")
    trainer = Trainer(run, built, device, total, (None, None, None))
    trainer.train_iter = cycle(batches)
    built.engine.train()
    return trainer, scales


def run_config(name: str, bench: argparse.Namespace, data_flags: List[str], device) -> Result:
    import torch
    from _moe_profile import profile_steps

    trainer, scales = build_trainer(name, bench, data_flags, device)
    timed_steps(trainer, bench.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loops, reports = [], []
    for _ in range(bench.repeats):
        seconds, r = timed_steps(trainer, bench.iters, device)
        loops.append(seconds / max(bench.iters, 1))
        reports += r
    per_step = statistics.median(loops)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0

    kernel_ms = moe_ms = a2a_ms = None
    if bench.profile_steps > 0:
        kernel_ms, moe_ms, a2a_ms = profile_steps(trainer, bench.profile_steps, device,
                                                  bench.profile, name, bench.compile)
    used_layers = wanted = used = dropped = None
    if reports[0].moe_fields is not None:
        fields = torch.stack([r.moe_fields for r in reports]).mean(0).cpu()  # [L, 6]
        used_layers = fields[:, 1].tolist()
        wanted, used, dropped = (float(fields[:, i].mean()) for i in (0, 1, 2))
    t = trainer.run.training
    flops = trainer.flops.per_iteration(t.global_batch_size, used_layers or [])
    tokens = t.global_batch_size * t.seq_length
    result = Result(
        name=name, ms_per_step=per_step * 1e3, tokens_per_s=tokens / per_step,
        tflops=flops / per_step / 1e12, mfu=flops / per_step / (PEAK_TFLOPS * 1e12),
        peak_gib=peak, used_per_token=used, wanted_per_token=wanted, dropped=dropped,
        kernel_ms=kernel_ms, moe_ms=moe_ms, lm_loss=float(reports[-1].lm_loss),
        params=trainer.built.model.num_parameters(), scales=scales, on_gpu=device.type == "cuda",
        world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        all_to_all_ms=a2a_ms)
    del trainer, reports
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if bench.compile:
        torch._dynamo.reset()
    return result


# ----------------------------------------------------------------------------------------------
# report


def result_line(r: Result) -> str:
    experts = ("-" if r.used_per_token is None else
               f"{r.used_per_token:.2f} used / {r.wanted_per_token:.2f} wanted, "
               f"{100 * r.dropped:.1f}% dropped")
    busy = ("-" if r.kernel_ms is None or not r.on_gpu else
            f"{100 * r.kernel_ms / r.ms_per_step:.0f}%")
    of = "GPU kernel" if r.on_gpu else "CPU op"
    share = ("-" if r.moe_ms is None or not r.kernel_ms or r.used_per_token is None else
             f"{100 * r.moe_ms / r.kernel_ms:.1f}% of {of} time ({r.moe_ms:.1f} ms/step)")
    return (f"{r.name:<6} | {r.tokens_per_s / 1e3:7.1f}k tokens/s | {r.ms_per_step:7.2f} ms/step"
            f" | MFU {100 * r.mfu:5.1f}% ({r.tflops:5.1f} TFLOP/s) | peak {r.peak_gib:5.1f} GiB"
            f" | GPU busy {busy} | experts/token {experts} | MoE share {share}"
            f" | lm loss {r.lm_loss:.3f}"
            f" | params {r.params / 1e6:.1f}M" + _all_to_all_field(r))


def _all_to_all_field(r: Result) -> str:
    """' | all-to-all X ms/step (Y% of step)' with several ranks and a profile, else ''."""
    if r.world <= 1 or r.all_to_all_ms is None:
        return ""
    what = "NCCL kernels" if r.on_gpu else "gloo ops"
    return (f" | all-to-all {r.all_to_all_ms:.2f} ms/step ({what}, "
            f"{100 * r.all_to_all_ms / r.ms_per_step:.1f}% of step)")


def summary_lines(results: Dict[str, Result]) -> List[str]:
    lines = []
    x, k, d = results.get("xmoe"), results.get("topk8"), results.get("dense")
    if x is not None:
        met = x.tokens_per_s >= TARGET_TOKENS_PER_S
        lines.append(f"xmoe tokens/s {x.tokens_per_s / 1e3:.1f}k [target >= "
                     f"{TARGET_TOKENS_PER_S / 1e3:.0f}k: {'met' if met else 'NOT met'}]")
    if x is not None and d is not None:
        ratio = x.tokens_per_s / d.tokens_per_s
        lines.append(f"xmoe / dense tokens/s = {ratio:.3f} [target >= {TARGET_VS_DENSE}: "
                     f"{'met' if ratio >= TARGET_VS_DENSE else 'NOT met'}]")
    if k is not None and d is not None:
        lines.append(f"topk8 / dense tokens/s = {k.tokens_per_s / d.tokens_per_s:.3f}")
    if x is not None and k is not None and x.used_per_token:
        flop_ratio = k.used_per_token / x.used_per_token
        moe = ""
        if x.moe_ms and k.moe_ms:
            moe = f"; MoE-layer kernel time ratio {k.moe_ms / x.moe_ms:.2f}"
        lines.append(f"topk8 / xmoe step time = {k.ms_per_step / x.ms_per_step:.2f}{moe} vs "
                     f"expert-FLOP ratio {flop_ratio:.2f} ({k.used_per_token:.2f} / "
                     f"{x.used_per_token:.2f} experts per token)")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    bench = parse_args(argv)
    if bench.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""      # before torch and deepspeed look
    import torch

    from megatron.initialize import initialize_distributed

    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    _, device = initialize_distributed(backend, bench.local_rank)
    world = torch.distributed.get_world_size()
    if torch.distributed.get_rank() != 0:       # every rank runs the steps; rank 0 reports
        sys.stdout = open(os.devnull, "w")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"world size {world} (global batch = micro-batch x {world}, tokens/s of all ranks) | "
          f"device {name} | torch {torch.__version__} | synthetic random token ids | "
          f"warmup {bench.warmup}, {bench.repeats} x {bench.iters} timed steps | sync-free "
          f"{bench.sync_free} | compile {bench.compile} | router target "
          f"{bench.target_experts or 'init'} experts/token (threshold 0.9) | extra flags "
          f"'{bench.megatron_args}'", flush=True)
    results: Dict[str, Result] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_flags = placeholder_data(tmp)
        for name in bench.configs.split(","):
            try:
                results[name] = run_config(name, bench, data_flags, device)
            except Exception as e:  # report and go on: one run should tell all it can
                print(f"{name:<6} | failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            print(result_line(results[name]), flush=True)
    for line in summary_lines(results):
        print(line)
    if any(r.scales for r in results.values()):
        print("router scales: " + "; ".join(f"{r.name} " + ", ".join(f"{s:.2f}" for s in r.scales)
                                            for r in results.values() if r.scales))


if __name__ == "__main__":
    main()
