"""The Megatron-spelled command line of `pretrain_gpt.py`, parsed and validated in one place.

    args = parse_args(argv)                      # every flag the original XMoE launch script passes
    v = validate_args(args, world_size)          # ValidatedArgs; ValueError naming the flag ...
    data = build_data_config(v.flags)            # -> tokenizer -> padded vocabulary size
    run = build_configs(v, padded_vocab_size)    # RunConfig (each config checks its own options)
    ds = deepspeed_config_dict(run)              # the DeepSpeed JSON to hand to deepspeed

Each option's value is checked once, where its typed config is built (megatron/config.py's
__post_init__, through build_configs); validate_args checks what no single config can see: flags
given together, the world size, the files, the DeepSpeed JSON against the flags, and what is
not supported. This module and megatron/run_config.py (build_configs, re-exported here) are the
only code that reads the argparse namespace; everything below the entry point takes a config from
`megatron.config`. Flag names and defaults follow Megatron-DeepSpeed (e.g.
--moe-loss-coeff 0.1, --initial-loss-scale 2**32, --split 969,30,1) and the XMoE fork's additions.

Decisions (see each flag's help):
- Router: at most one of --use-threshold (XMoE), --use-topk, --use-hash-layer. With none,
  --topk 1 means switch (top-1) routing and --topk > 1 top-k routing (the XMoE fork's gate
  without a router flag was DeepSpeed's top-k gate). --num-experts 1 is a dense model.
- --sparse-mlp selected the fork's own MoE layer (its threshold / top-k / hash routers) instead
  of DeepSpeed's MoE; here that is the only MoE layer, so the flag is accepted and changes nothing.
- Not built, rejected with "not supported": tensor or pipeline parallelism > 1 (the fork ran
  MoE with --no-pipeline-parallel, accepted as a no-op), --gate-view-num > 1 (the fork's router
  emitted E * V logits and max-pooled the V views of each expert), --num-ffn-heads > 1 (the fork
  split each token's hidden vector into heads routed separately), --data-impl lazy/cached,
  ZeRO stage 3, DeepSpeed curriculum learning.
- --moe-expert-parallel-size N (the fork accepted it and kept every expert on every rank): each
  MoE layer's experts are split E / N per rank over DeepSpeed's expert-parallel groups.
- GeLU (dense MLPs and experts alike): Megatron's default fused bias + tanh GeLU;
  --no-bias-gelu-fusion, --openai-gelu and --onnx-safe as in Megatron (run_config.gelu_form).
- --use-checkpoint-args (Megatron's): model flags from the checkpoint --load names, explicit
  routing flags overriding them (run_config.apply_checkpoint_args says what is taken).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from megatron.config import MOE_BACKENDS
from megatron.data.dataset_split import parse_data_path, parse_split
from megatron.deepspeed_config import (  # noqa: F401  (re-exported for the entry point)
    check_deepspeed_args, deepspeed_config_dict, read_deepspeed_config)
from megatron.run_config import (  # noqa: F401  (re-exported: the entry point's API)
    DEFAULT_THRESHOLD, RunConfig, ValidatedArgs, apply_checkpoint_args, build_configs,
    build_data_config)

ROUTER_FLAGS = (("use_threshold", "--use-threshold", "threshold"),
                ("use_topk", "--use-topk", "topk"),
                ("use_hash_layer", "--use-hash-layer", "hash"))

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# parse_args


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse `argv` (default: sys.argv[1:]) with Megatron-DeepSpeed's flag names and defaults.

    Only syntax is checked here (argparse exits on an unknown flag or a bad number);
    `validate_args` checks meaning.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.explicit_flags = _explicit_dests(argv)
    _map_deprecated_moe_flags(args)
    return args


def _map_deprecated_moe_flags(args: argparse.Namespace) -> None:
    """--moe-kernels, --moe-expert-impl and --moe-expert-gemm (replaced by --moe-backend) onto
    args.moe_backend, with one warning line each; an explicit --moe-backend wins."""
    implied, notes = None, []
    if args.moe_kernels is not None:
        implied = args.moe_kernels
        notes.append(f"--moe-kernels {args.moe_kernels} is deprecated: use --moe-backend "
                     f"{args.moe_kernels}")
    if args.moe_expert_impl == "loop":
        implied = implied or "torch"
        notes.append("--moe-expert-impl loop is deprecated: the per-expert loop is a test "
                     "reference now; the experts run torch._grouped_mm (--moe-backend torch)")
    elif args.moe_expert_impl is not None:
        notes.append(f"--moe-expert-impl {args.moe_expert_impl} is deprecated and changes "
                     "nothing: the experts run torch._grouped_mm")
    if args.moe_expert_gemm == "fused":
        notes.append("--moe-expert-gemm fused was retired (slower in every benchmark: "
                     "benchmarks/HISTORY.md): the default runs; for less activation memory use "
                     "--checkpoint-activations")
    elif args.moe_expert_gemm is not None:
        notes.append(f"--moe-expert-gemm {args.moe_expert_gemm} is deprecated and changes "
                     "nothing: the experts run torch._grouped_mm")
    if args.moe_backend is None:
        args.moe_backend = implied or "auto"
    elif implied is not None and implied != args.moe_backend:
        notes.append(f"--moe-backend {args.moe_backend} wins over the deprecated flags")
    for note in notes:
        logger.warning(note)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT pretraining with XMoE layers",
                                     allow_abbrev=False)
    for add_group in (_add_model_args, _add_moe_args, _add_training_args, _add_optimizer_args,
                      _add_data_args, _add_checkpoint_logging_args, _add_distributed_args):
        add_group(parser)
    return parser


def _explicit_dests(argv: list[str]) -> frozenset:
    """The dests of the flags present in `argv` (--use-checkpoint-args lets them win over the
    checkpoint's): argv parsed again with every default suppressed, so that only given flags
    land in the namespace (whatever their spelling: `--flag=v`, aliases)."""
    parser = _parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None, help="Transformer layers (required).")
    g.add_argument("--hidden-size", type=int, default=None, help="Hidden size (required).")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="Dense FFN hidden size (default 4 * --hidden-size).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Required.")
    g.add_argument("--seq-length", type=int, default=None, help="Tokens per sample (required).")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Position table size, >= --seq-length (default --seq-length).")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--num-ffn-heads", type=int, default=1,
                   help="XMoE fork: split tokens into this many heads routed separately; "
                        "only 1 is supported.")
    # GeLU of every dense MLP and expert, as Megatron picks it (run_config.gelu_form).
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion",
                   help="Exact erf GeLU instead of Megatron's default fused bias + tanh GeLU.")
    g.add_argument("--openai-gelu", action="store_true",
                   help="OpenAI's tanh GeLU (the default's formula); wins over --onnx-safe.")
    g.add_argument("--onnx-safe", type=_true_or_false, nargs="?", const=True, default=False,
                   metavar="BOOL",
                   help="Megatron's erf_gelu (erf(x / 1.41421)), unless --openai-gelu. Takes "
                        "true / false as Megatron's `--onnx-safe True` (bare: true; Megatron "
                        "read any non-empty value, even False, as true).")


def _true_or_false(value: str) -> bool:
    """A boolean flag value: true/false, 1/0, yes/no (any case)."""
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return words[value.lower()]


def _add_moe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=[1],
                   help="Experts per MoE layer: one value, or one per MoE layer. 1 = dense.")
    g.add_argument("--expert-interval", type=int, default=2,
                   help="Layer L is MoE iff L > --no-moe-layer-num and "
                        "(L - no_moe_layer_num) %% interval == 0.")
    g.add_argument("--no-moe-layer-num", type=int, default=0,
                   help="The first this-many layers are always dense.")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="Hidden size of each expert (default --ffn-hidden-size; XMoE: small).")
    g.add_argument("--topk", type=int, default=1,
                   help="k of top-k routing. Without a router flag, 1 = switch, > 1 = top-k. "
                        "Ignored by --use-threshold (cap with --threshold-max-experts).")
    g.add_argument("--use-threshold", action="store_true",
                   help="XMoE threshold router: experts in probability order until their "
                        "cumulative probability reaches --threshold.")
    g.add_argument("--use-topk", action="store_true", help="Top-k router (--topk).")
    g.add_argument("--use-hash-layer", action="store_true",
                   help="Hash router: a frozen token-id -> expert map (seeded by --seed).")
    g.add_argument("--threshold", type=float, default=None,
                   help=f"Threshold in (0, 1] of --use-threshold (default {DEFAULT_THRESHOLD}).")
    g.add_argument("--threshold-max-experts", type=int, default=None,
                   help="Cap on experts per token of the threshold router (default none).")
    g.add_argument("--moe-loss-coeff", type=float, default=0.1,
                   help="Load-balancing loss coefficient (Megatron-DeepSpeed default 0.1).")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0, help="Router z-loss.")
    g.add_argument("--moe-train-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-eval-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-min-capacity", type=int, default=4)
    g.add_argument("--disable-moe-token-dropping", action="store_false",
                   dest="moe_token_dropping", help="No capacity limit: no token is dropped.")
    g.add_argument("--create-moe-param-group", action="store_true",
                   help="Put expert parameters in their own optimizer group.")
    g.add_argument("--moe-expert-parallel-size", type=int, default=1,
                   help="Expert-parallel size N: each rank holds E / N experts of every MoE "
                        "layer (N must divide --num-experts and the world size).")
    g.add_argument("--moe-sync-free-dispatch", action="store_true",
                   help="Dispatch into a static upper-bound buffer: no host sync per layer.")
    g.add_argument("--moe-compile-routing", action="store_true",
                   help="torch.compile each MoE layer's router, capacity, dispatch plan and "
                        "statistics (~150 small ops -> a few fused kernels; compiles once "
                        "per shape at the first steps).")
    g.add_argument("--moe-routing-cuda-graphs", action="store_true",
                   help="Implies --moe-compile-routing; on CUDA the compiled routing step runs "
                        "as CUDA graphs (torch.compile mode reduce-overhead): its ~30 small "
                        "kernels launch as one graph (eager training is host-bound). Its "
                        "statistics are overwritten by the next step's: read them at once, as "
                        "the trainer does. Ignored under --compile; not with "
                        "--checkpoint-activations.")
    g.add_argument("--moe-backend", choices=MOE_BACKENDS, default=None,
                   help="Implementation of the MoE layers' router logits, capacity and experts: "
                        "triton (Triton kernels around torch._grouped_mm; CUDA), torch (torch "
                        "ops), auto (default: triton on CUDA when triton is installed, else "
                        "torch).")
    # Deprecated spellings of --moe-backend, mapped onto it by parse_args with a warning.
    g.add_argument("--moe-kernels", choices=("auto", "triton", "torch"), default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--moe-expert-impl", choices=("auto", "grouped", "loop"), default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--moe-expert-gemm", choices=("auto", "grouped_mm", "fused"), default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--sparse-mlp", action="store_true",
                   help="XMoE fork: use its MoE layer rather than DeepSpeed's. That is the only "
                        "MoE layer here, so this flag is accepted and changes nothing.")
    g.add_argument("--gate-view-num", type=int, default=1,
                   help="XMoE fork: router views max-pooled per expert; only 1 is supported.")
    for flag in ("--use-base-layer", "--placeholder-expert", "--scale-moe"):
        g.add_argument(flag, action="store_true", help="XMoE fork option; not supported.")
    g.add_argument("--mlp-type", choices=("standard", "residual"), default="standard",
                   help="Megatron-DeepSpeed residual MoE is not supported.")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None, help="Per GPU (required).")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step (default micro batch x data-parallel size).")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None,
                   help="Stop after this many tokens (with --train-iters: whichever first).")
    g.add_argument("--eval-only", action="store_true", help="Evaluate only, no training.")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--test-iters", type=int, default=None,
                   help="Iterations of the final test evaluation (default --eval-iters).")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="Recompute each layer's activations in the backward pass.")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor): fused kernels, "
                        "far fewer launches. Implies --moe-sync-free-dispatch (the exact "
                        "dispatch reads sizes on the host: a graph break and a new shape "
                        "every step); not with --moe-expert-parallel-size > 1.")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="Static; default dynamic.")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)


def _add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate (required).")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default --train-iters.")
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="Warmup as a fraction of the decay length (not with --lr-warmup-iters).")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="PREFIX, or WEIGHT PREFIX pairs; each PREFIX.bin/.idx must exist.")
    g.add_argument("--split", default="969,30,1", help="Train, valid, test proportions.")
    g.add_argument("--data-impl", choices=("mmap", "infer", "lazy", "cached"), default="infer",
                   help="Only Megatron's mmap format is supported (infer reads it).")
    g.add_argument("--data-cache-path", default=None,
                   help="Where index caches go (default next to the data).")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                   choices=("GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase"))
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)


def _add_checkpoint_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="Take the model flags (shape, GeLU form, router and its settings) from "
                        "the checkpoint --load names; routing flags given here (--threshold, "
                        "--topk, --moe-eval-capacity-factor, ...) override its values; "
                        "flags given here that shape the model must equal its values.")
    g.add_argument("--save-interval", type=int, default=None)
    for flag in ("--no-save-optim", "--no-save-rng", "--no-load-optim", "--no-load-rng",
                 "--finetune"):
        g.add_argument(flag, action="store_true")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--log-moe-stats", action=argparse.BooleanOptionalAction, default=True,
                   help="Log per-layer routing statistics (experts per token, drops, balance).")


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed and DeepSpeed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Only 1.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Only 1.")
    g.add_argument("--no-pipeline-parallel", action="store_true",
                   help="Accepted; there is no pipeline-parallel engine here.")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="Default nccl with CUDA, else gloo.")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, dest="local_rank",
                   help="Passed by the deepspeed / torch launchers.")
    g.add_argument("--deepspeed", action="store_true", help="Train with the DeepSpeed engine.")
    g.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   dest="deepspeed_config",
                   help="DeepSpeed JSON (default: built from these flags); cross-checked.")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="Accepted for Megatron-DeepSpeed scripts. There it makes "
                        "--checkpoint-activations use DeepSpeed's checkpointing, which differs "
                        "only by partitioning activations across tensor-parallel ranks; with "
                        "tensor parallel size 1 that is torch's, used by --checkpoint-activations. "
                        "Alone it recomputes nothing, as in Megatron-DeepSpeed.")
    g.add_argument("--zero-stage", type=int, default=None,
                   help="ZeRO stage 0-2 when no --deepspeed_config gives one (default 0).")


# ----------------------------------------------------------------------------------------------
# validate_args


def validate_args(args: argparse.Namespace, world_size: int) -> ValidatedArgs:
    """The command line checked for `world_size` processes, as build_configs' input: ValueError
    naming the flag for anything unbuilt or inconsistent.

    Works on a copy of `args` (the caller's namespace is left as parsed): with
    --use-checkpoint-args it first fills the model flags not given from the checkpoint
    (megatron/run_config.apply_checkpoint_args), so the merged values are what is checked, then
    Megatron's derived defaults (--global-batch-size: micro batch x data-parallel size;
    --max-position-embeddings: --seq-length). The router, ZeRO stage (flag, JSON or 0) and
    distributed backend it resolves are fields of the result.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    flags = argparse.Namespace(**vars(args))
    checkpoint_model, checkpoint_dir = apply_checkpoint_args(flags)   # before anything is checked
    _check_not_supported(flags)
    _check_model(flags)
    _check_expert_parallel(flags, world_size)
    router = _resolve_router(flags)
    _check_training(flags, world_size)
    _check_data(flags)
    zero_stage = check_deepspeed_args(flags, world_size)
    return ValidatedArgs(flags=flags, world_size=world_size, router=router,
                         zero_stage=zero_stage,
                         distributed_backend=_resolve_backend(flags.distributed_backend),
                         checkpoint_model=checkpoint_model, checkpoint_dir=checkpoint_dir)


def _check_not_supported(args: argparse.Namespace) -> None:
    """Features the XMoE fork or Megatron-DeepSpeed had that are not built here."""
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                        ("--gate-view-num", args.gate_view_num),
                        ("--num-ffn-heads", args.num_ffn_heads)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
        if value > 1:
            raise ValueError(f"{flag} {value} is not supported (only 1)")
    if args.data_impl not in ("mmap", "infer"):
        raise ValueError(f"--data-impl {args.data_impl} is not supported (only mmap)")
    if args.tokenizer_type != "GPT2BPETokenizer":
        raise ValueError(f"--tokenizer-type {args.tokenizer_type} is not supported "
                         "(only GPT2BPETokenizer)")
    if args.mlp_type != "standard":
        raise ValueError(f"--mlp-type {args.mlp_type} is not supported (only standard)")
    for flag in ("--use-base-layer", "--placeholder-expert", "--scale-moe"):
        if getattr(args, flag[2:].replace("-", "_")):
            raise ValueError(f"{flag} is not supported")


def _check_model(args: argparse.Namespace) -> None:
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length"):
        if getattr(args, flag[2:].replace("-", "_")) is None:
            raise ValueError(f"{flag} is required")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")
    if args.moe_routing_cuda_graphs and args.checkpoint_activations:
        # Seen on the H200 (torch 2.11): CUDA graph trees stop with "graph recording observed
        # an input tensor deallocate during graph recording" when the recomputation replays
        # the routing step inside the backward.
        raise ValueError("--moe-routing-cuda-graphs cannot be combined with "
                         "--checkpoint-activations (torch's CUDA graph trees fail when the "
                         "recomputation runs the routing step inside the backward)")


def _check_expert_parallel(args: argparse.Namespace, world_size: int) -> None:
    ep = args.moe_expert_parallel_size
    if ep <= 1:                  # (below 1: MoEConfig names it)
        return
    uneven = [e for e in args.num_experts if e > 1 and e % ep]
    if uneven:
        raise ValueError(f"--moe-expert-parallel-size {ep} must divide --num-experts "
                         f"{' '.join(map(str, args.num_experts))} (each MoE layer's experts are "
                         "split evenly over the expert-parallel ranks)")
    if world_size % ep:
        raise ValueError(f"--moe-expert-parallel-size {ep} must divide the world size "
                         f"({world_size} processes)")
    for flag, on in (("--moe-sync-free-dispatch", args.moe_sync_free_dispatch),
                     ("--compile", args.compile is not None)):
        if on:
            raise ValueError(f"{flag} cannot be combined with --moe-expert-parallel-size {ep} "
                             "(the exchange needs host split sizes)")


def _resolve_router(args: argparse.Namespace) -> str:
    """The router: the one router flag given, else switch (--topk 1) or top-k (--topk > 1)."""
    given = [(flag, router) for attr, flag, router in ROUTER_FLAGS if getattr(args, attr)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(f for f, _ in given)}: give at most one router flag")
    if given:
        return given[0][1]
    return "switch" if args.topk == 1 else "topk"


def _check_training(args: argparse.Namespace, world_size: int) -> None:
    if args.micro_batch_size is None or args.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size is required and must be >= 1, "
                         f"got {args.micro_batch_size}")
    per_step = args.micro_batch_size * world_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size < 1 or args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a positive "
                         f"multiple of --micro-batch-size {args.micro_batch_size} x data-parallel "
                         f"size {world_size} (= {per_step})")
    if args.lr is None and not args.eval_only:
        raise ValueError("--lr is required for training")
    if args.distributed_backend == "nccl" and not _cuda_available():
        raise ValueError("--distributed-backend nccl needs CUDA; use gloo on CPU")


def _check_data(args: argparse.Namespace) -> None:
    if not args.data_path:
        raise ValueError("--data-path is required")
    from megatron.data.indexed_dataset import missing_dataset_message  # numpy: only here

    prefixes, _ = parse_data_path(args.data_path)
    for prefix in prefixes:
        problem = missing_dataset_message(prefix)
        if problem:
            raise ValueError(f"--data-path: {problem}")
    parse_split(args.split, 1000)
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
        if path is None:
            raise ValueError(f"{flag} is required for --tokenizer-type {args.tokenizer_type}")
        if not os.path.isfile(path):
            raise ValueError(f"{flag}: {path} not found")


def _resolve_backend(backend: Optional[str]) -> str:
    if backend is not None:
        return backend
    return "nccl" if _cuda_available() else "gloo"


def _cuda_available() -> bool:
    import torch  # lazily: parsing and validating flags needs no torch otherwise

    return torch.cuda.is_available()
