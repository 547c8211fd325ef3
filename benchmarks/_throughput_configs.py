"""The Megatron runs of benchmarks/train_throughput.py: each config's flags (those of
examples_deepspeed/MoE/ds_pretrain_gpt_*.sh), the placeholder data validate_args insists on,
the synthetic batches and the routers' sharpening (train_throughput.py's docstring says why)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
from pathlib import Path
from typing import List


VOCAB = 50257                    # GPT-2's vocabulary; Megatron pads it to 50304
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
    "plain": ["--num-experts", "1"],    # the dense config's flags, run by benchmarks/_plain_gpt.py
}
SMALL_EXPERTS = {"--num-experts": "16", "--moe-ffn-hidden-size": "32"}


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
    if bench.small and config != CONFIGS["dense"]:
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
