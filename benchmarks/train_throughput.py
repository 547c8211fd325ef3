"""End-to-end training throughput on one GPU: XMoE-small vs top-8 vs the dense GPT-125M vs a
minimal plain-PyTorch GPT-125M.

    python benchmarks/train_throughput.py                  # H200: the four configs
    python benchmarks/train_throughput.py --compile        # torch.compile'd
    python benchmarks/train_throughput.py --breakdown      # + where each step's GPU time goes
    python benchmarks/train_throughput.py --configs xmoe,dense --profile   # + top kernels
    python benchmarks/train_throughput.py --configs xmoe,dense \
        --megatron-args='--moe-compile-routing --moe-sync-free-dispatch'  # the scripts' eager
    python benchmarks/train_throughput.py --small --device cpu --iters 1   # smoke run
    deepspeed --num_gpus 8 benchmarks/train_throughput.py --configs xmoe \
        --megatron-args='--moe-expert-parallel-size 8'      # weak scaling: micro-batch per GPU

This file times the configs; their flags, placeholder data, synthetic batches and router
sharpening live in _throughput_configs.py, the printed lines and goals in _throughput_report.py,
the profile's attribution in _step_profile.py.

Every config but `plain` goes through the step users run: the Megatron command line of
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
  plain  the reference for the dense model: its shapes and hyperparameters (parsed from the
         dense config's flags), learned positions, pre-LN, tied output embedding, tanh-GeLU,
         written as a minimal plain-PyTorch GPT (benchmarks/_plain_gpt.py): torch SDPA causal
         attention, fp32 parameters under torch.autocast(bfloat16) (the usual minimal recipe;
         the Megatron configs keep bf16 parameters and fp32 masters), fp32 cross-entropy on
         logits.float(), torch's fused AdamW (no weight decay on biases and norms),
         clip_grad_norm_ (foreach), torch.compile(model) with --compile; no DeepSpeed, no
         logging. The same synthetic batches and LR schedule (megatron.learning_rates). One
         rank only (skipped under the launcher). Of --megatron-args it takes what the dense
         config's shapes and hyperparameters take from them, nothing else (no
         --checkpoint-activations, no ZeRO). Its MFU uses the dense model's FLOPs per step
         (the same parameters).

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
                      torch.profiler over --profile-steps steps taken after the timed loops;
                      forward kernels under a range around each MoELayer, backward kernels of
                      the autograd nodes created there (benchmarks/_step_profile.py says how).
                      Not with --compile.
  all-to-all          with several ranks: time per step in the expert-parallel all-to-all,
                      from the same profile (NCCL's all-to-all / SendRecv kernels on GPU, the
                      c10d / gloo all-to-all ops on CPU, overlaps counted once), and its share
                      of the timed step. A kernel's time includes waiting for the slowest peer.

--breakdown: one table after all configs ran, a column per config, in ms per step of GPU
kernel time over the profiled steps (CPU op time on CPU; kernels on one stream do not overlap,
so they add up):
  by category (eager only)  embedding (word+position), attention (the attention module with
                      its QKV and output GEMMs), dense FFN (the MLP layers), MoE layers (router
                      to combine), other transformer ops (layer norms, residual adds, dropout),
                      output layer + loss, gradient norm + clipping (a clipping the optimizer
                      applies inside its step counts as optimizer step), optimizer step, DeepSpeed
                      engine (kernels inside the engine's forward, backward and step that are
                      neither the model's autograd nodes nor the optimizer), unattributed
                      (e.g. the MoE statistics and the loss sum in Trainer.train_step, gradient
                      accumulation into .grad); forward kernels by the module ranges, backward
                      kernels by the autograd node that launched them (the module whose forward
                      created it)
  by phase            forward, backward (autograd nodes), grad norm/clip, optimizer, engine
                      (DeepSpeed's own work), outside phases: ranges around the callables
                      Trainer.train_step (PlainTrainer.train_step) calls, wrapped for the
                      profiled steps only
  kernels linked to no op  GPU kernels the profiler attributes to no CPU op (Triton's launches
                      through the driver API): counted from the GPU's kernel events, in no
                      category or phase above, part of the total
  then                the kernel total, the step's wall time (the timed loops) and the host gap
                      (wall - kernel time: the GPU idles waiting for the host)
Under --compile only the phase rows: module hooks would force recompiles and the fused kernels
cross module boundaries.

Summary lines, the issue's goals as same-run ratios: xmoe / dense tokens/s (>= 1.0, stretch
1.1, for --compile runs; >= 0.9 for eager runs: the line of the run's mode), xmoe tokens/s
>= 450k and dense / plain tokens/s >= 0.95 (--compile goals: eager runs print the figures
without a verdict), and xmoe's peak memory beside the issue's compiled reference (information
only: a figure from another run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _step_profile import (ATTENTION, DENSE_FFN, EMBEDDING, ENGINE, OTHER,  # noqa: E402
                           OUTPUT, profile_steps)
from _step_profile import MOE as MOE_LAYERS  # noqa: E402  (MOE: the MoE flags)
from _throughput_configs import (CONFIGS, VOCAB, build_run, cycle,  # noqa: E402
                                 megatron_argv, placeholder_data, sharpen_routers,
                                 synthetic_batches)
from _throughput_report import (Result, breakdown_lines, result_line,  # noqa: E402
                                summary_lines)

PEAK_TFLOPS = 790.0              # H200 bf16 dense matmul, measured on the device (see docs)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default cuda when available; cpu hides the GPUs")
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--configs", default="xmoe,topk8,dense,plain",
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
    p.add_argument("--breakdown", action="store_true",
                   help="print where each config's step goes (a table, a column per config): "
                        "GPU kernel ms per step by category (eager) and phase, wall, host gap")
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
    if args.breakdown and args.profile_steps == 0:
        p.error("--breakdown needs profiled steps (--profile-steps > 0)")
    if args.compile:
        args.sync_free = True
    return args



# ----------------------------------------------------------------------------------------------
# timing and profiling


@dataclasses.dataclass
class Subject:
    """One config ready to time: its step, and what the report and the profile need."""

    step: Callable[[], Any]                     # one training step; returns its report
    modules: Optional[List[Tuple[Any, str]]]    # (module, category) ranges; None: compiled
    phases: List[Tuple[object, str, str]]       # (owner, attribute, phase) to wrap
    flops: Any                                  # megatron.training_log.FlopsModel
    global_batch_size: int
    seq_length: int
    params: int
    scales: List[float]
    lm_loss: Callable[[Any], float]             # of a step's report
    moe_fields: Callable[[Any], Any]            # of a step's report: [L, 6] tensor or None




def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], Any], iters: int, device) -> tuple:
    """(seconds, reports) of `iters` train steps; synchronised only before and after."""
    synchronize(device)
    start = time.perf_counter()
    reports = [step() for _ in range(iters)]
    synchronize(device)
    return time.perf_counter() - start, reports


# ----------------------------------------------------------------------------------------------
# the configs' steps


def total_steps(bench: argparse.Namespace) -> int:
    return bench.warmup + bench.repeats * bench.iters + bench.profile_steps


def build_trainer(name: str, bench: argparse.Namespace, data_flags: List[str], device):
    """(trainer, scales): the config's run built as pretrain_gpt.py builds it, its routers
    sharpened, compiled if asked, a synthetic iterator in place of the data loader."""
    from megatron.initialize import set_random_seed
    from megatron.engine import compile_model, setup_model_and_optimizer
    from megatron.training import Trainer

    vocab = 1000 if bench.small else VOCAB
    run = build_run(megatron_argv(name, bench, data_flags, total_steps(bench)), vocab)
    set_random_seed(run.training.seed)
    built = setup_model_and_optimizer(run, device, total_steps(bench))
    batches = synthetic_batches(run.training, vocab, device)
    scales = []
    if bench.target_experts > 0:
        scales = sharpen_routers(built.engine, built.model, batches[0], device,
                                 bench.target_experts)
    if bench.compile:
        # What --compile does (megatron.engine.compile_model), after sharpening: run in the
        # compiled model, the sharpening's hooks and eval passes would force recompiles.
        compile_model(built.model, "inductor")
    trainer = Trainer(run, built, device, total_steps(bench), (None, None, None))
    trainer.train_iter = cycle(batches)
    built.engine.train()
    return trainer, scales


def megatron_subject(name: str, bench: argparse.Namespace, data_flags: List[str],
                     device) -> Subject:
    trainer, scales = build_trainer(name, bench, data_flags, device)
    t = trainer.run.training
    return Subject(
        step=trainer.train_step, modules=None if bench.compile else megatron_modules(trainer),
        phases=megatron_phases(trainer), flops=trainer.flops,
        global_batch_size=t.global_batch_size, seq_length=t.seq_length,
        params=trainer.built.model.num_parameters(), scales=scales,
        lm_loss=lambda r: float(r.lm_loss), moe_fields=lambda r: r.moe_fields)


def megatron_modules(trainer) -> List[Tuple[Any, str]]:
    """The module ranges of the breakdown: the DeepSpeed engine's forward around GPTModel's
    (whose own ops are the output layer and the loss) around embedding, layers, attention and
    MLP / MoE layer (layer norms, residual adds, dropout: the layers' and transformer's own)."""
    engine, model = trainer.built.engine, trainer.built.model
    modules = [(engine, ENGINE), (model, OUTPUT), (model.embedding, EMBEDDING),
               (model.transformer, OTHER)]
    for layer in model.transformer.layers:
        modules += [(layer, OTHER), (layer.self_attention, ATTENTION),
                    (layer.mlp, MOE_LAYERS if layer.is_moe else DENSE_FFN)]
    return modules


def megatron_phases(trainer) -> List[Tuple[object, str, str]]:
    """What Trainer.train_step calls, to wrap in phase ranges: forward_lm, engine.backward,
    engine.step, the optimizer's step, and the gradient norm / clipping functions under every
    name a megatron module holds them by (clipping may move; an absent name is skipped)."""
    import megatron.expert_groups as groups
    import megatron.training as training

    engine = trainer.built.engine
    phases = [(training, "forward_lm", "forward"), (engine, "backward", "engine"),
              (engine, "step", "engine"), (engine.optimizer, "step", "optimizer")]
    for attribute in ("global_grad_norm", "clip_gradients_"):
        function = getattr(groups, attribute, None)
        if function is None:
            continue
        for module_name, module in list(sys.modules.items()):
            if (module_name.split(".")[0] == "megatron"
                    and getattr(module, attribute, None) is function):
                phases.append((module, attribute, "grad norm/clip"))
    return phases


def plain_subject(bench: argparse.Namespace, data_flags: List[str], device) -> Subject:
    """The plain-PyTorch reference with the dense config's shapes, hyperparameters, LR
    schedule and synthetic batches (parsed from the dense config's Megatron flags)."""
    import torch

    from _plain_gpt import PlainGPT, PlainTrainer
    from megatron.learning_rates import LRScheduler

    if torch.distributed.get_world_size() > 1:
        raise ValueError("plain runs on one rank (it has no data parallelism)")
    vocab = 1000 if bench.small else VOCAB
    run = build_run(megatron_argv("plain", bench, data_flags, total_steps(bench)), vocab)
    m, o, t = run.model, run.optimizer, run.training
    torch.manual_seed(t.seed)
    model = PlainGPT(m.padded_vocab_size, m.max_position_embeddings, m.num_layers,
                     m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.hidden_dropout,
                     m.attention_dropout, m.init_method_std).to(device)
    trainer = PlainTrainer(model, cycle(synthetic_batches(t, vocab, device)), lr=o.lr,
                           betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                           weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                           micro_steps=t.global_batch_size // t.micro_batch_size,
                           compile=bench.compile)
    schedule = LRScheduler(trainer.optimizer, o, total_steps(bench), t.global_batch_size,
                           t.seq_length)
    trainer.after_step = lambda: schedule.step(1, tokens=t.global_batch_size * t.seq_length)
    return Subject(step=trainer.train_step,
                   modules=None if bench.compile else plain_modules(model),
                   phases=plain_phases(trainer), flops=plain_flops(model, t.seq_length),
                   global_batch_size=t.global_batch_size, seq_length=t.seq_length,
                   params=sum(p.numel() for p in model.parameters()), scales=[],
                   lm_loss=float, moe_fields=lambda r: None)


def plain_flops(model, seq_length: int):
    """The dense model's FlopsModel: the same matmul parameters (all but the position table,
    the tied embedding once), counted as FlopsModel.of_model counts GPTModel's."""
    from megatron.training_log import FlopsModel

    params = sum(p.numel() for p in model.parameters())
    return FlopsModel(params - model.embedding.wpe.weight.numel(), (), len(model.blocks),
                      model.ln_f.normalized_shape[0], seq_length, False)


def plain_phases(trainer) -> List[Tuple[object, str, str]]:
    """What PlainTrainer.train_step calls, to wrap in phase ranges."""
    return [(trainer, "forward", "forward"), (trainer, "backward", "backward"),
            (trainer, "clip_gradients", "grad norm/clip"), (trainer.optimizer, "step", "optimizer")]


def plain_modules(model) -> List[Tuple[Any, str]]:
    """PlainGPT's module ranges, with the Megatron configs' category names."""
    modules = [(model, OUTPUT), (model.embedding, EMBEDDING), (model.ln_f, OTHER)]
    for block in model.blocks:
        modules += [(block, OTHER), (block.attn, ATTENTION), (block.mlp, DENSE_FFN)]
    return modules


# ----------------------------------------------------------------------------------------------
# one config


def run_config(name: str, bench: argparse.Namespace, data_flags: List[str], device) -> Result:
    import torch

    subject = (plain_subject(bench, data_flags, device) if name == "plain" else
               megatron_subject(name, bench, data_flags, device))
    timed_steps(subject.step, bench.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loops, reports = [], []
    for _ in range(bench.repeats):
        seconds, r = timed_steps(subject.step, bench.iters, device)
        loops.append(seconds / max(bench.iters, 1))
        reports += r
    per_step = statistics.median(loops)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0

    profile = None          # after the timed loops: profiling does not touch their numbers
    if bench.profile_steps > 0:
        profile = profile_steps(subject.step, bench.profile_steps, device, subject.modules,
                                subject.phases, bench.profile, name)
    used_layers = wanted = used = dropped = None
    if subject.moe_fields(reports[0]) is not None:
        fields = torch.stack([subject.moe_fields(r) for r in reports]).mean(0).cpu()  # [L, 6]
        used_layers = fields[:, 1].tolist()
        wanted, used, dropped = (float(fields[:, i].mean()) for i in (0, 1, 2))
    flops = subject.flops.per_iteration(subject.global_batch_size, used_layers or [])
    tokens = subject.global_batch_size * subject.seq_length
    result = Result(
        name=name, ms_per_step=per_step * 1e3, tokens_per_s=tokens / per_step,
        tflops=flops / per_step / 1e12, mfu=flops / per_step / (PEAK_TFLOPS * 1e12),
        peak_gib=peak, used_per_token=used, wanted_per_token=wanted, dropped=dropped,
        profile=profile, lm_loss=subject.lm_loss(reports[-1]), params=subject.params,
        scales=subject.scales, on_gpu=device.type == "cuda",
        world=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    del subject, reports
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if bench.compile:
        torch._dynamo.reset()
    return result



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
            if name == "plain" and world > 1:
                print("plain  | skipped: the plain-PyTorch reference runs on one rank")
                continue
            try:
                results[name] = run_config(name, bench, data_flags, device)
            except Exception as e:  # report and go on: one run should tell all it can
                print(f"{name:<6} | failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            print(result_line(results[name]), flush=True)
    if bench.breakdown:
        print("\n".join(breakdown_lines(results, bench.compile)))
    for line in summary_lines(results, bench.compile):
        print(line)
    if any(r.scales for r in results.values()):
        print("router scales: " + "; ".join(f"{r.name} " + ", ".join(f"{s:.2f}" for s in r.scales)
                                            for r in results.values() if r.scales))


if __name__ == "__main__":
    main()
