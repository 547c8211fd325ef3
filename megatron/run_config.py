"""The run's typed configs, built from a validated command line (megatron/arguments.py).

    v = validate_args(args, world_size)            # megatron/arguments.py -> ValidatedArgs
    run = build_configs(v, padded_vocab_size)      # RunConfig of small frozen dataclasses

`apply_checkpoint_args`, `build_configs` and `build_data_config` are the only readers of the
argparse namespace besides megatron/arguments.py, which parses and validates it (and re-exports
these names).

--use-checkpoint-args (Megatron's flag) takes the model flags from the checkpoint --load names,
so that evaluating it needs only --load, data, tokenizer and batch flags. The merge happens in
one place, `apply_checkpoint_args`, on validate_args' copy of the namespace before anything is
validated, so the merged values go through the same validation and the same config building as
flags typed by hand. What it decides:
- Taken from the saved model config (xmoe_checkpoint.json "model"; older checkpoints: the
  model file's client state "args"): every GPTConfig / MoEConfig field a flag sets (_MODEL_DESTS,
  _MOE_DESTS: shape, placement, GeLU form, LayerNorm epsilon, dropout, init std, the router and
  its settings, capacity, loss coefficients) and --seq-length (= the saved
  --max-position-embeddings) when not given.
- A flag present on the command line (`args.explicit_flags`, recorded by parse_args) keeps its
  value. For the routing settings (config.OVERRIDABLE_ROUTING: the router among threshold /
  top-k / switch, --threshold, --threshold-max-experts, --topk, --moe-eval-capacity-factor,
  --moe-min-capacity, --disable-moe-token-dropping) that is the point: the saved model is
  evaluated with other routing. An explicit flag that shapes the parameters or the function
  (shape, placement, GeLU form, LayerNorm epsilon, hash vs gated router) must equal the
  checkpoint's: build_configs refuses the ones that differ by name (megatron/checkpoint_args.py,
  the same comparison --load makes), before anything is built. The remaining ones (dropout,
  init std, loss coefficients, the training capacity factor) apply as given, as when
  fine-tuning. The router flags (--use-threshold, --use-topk, --use-hash-layer) count as one
  setting, and so do the GeLU flags; --topk alone on a switch checkpoint makes it top-k.
- Never taken: run settings (precision, the MoE backend, parallelism,
  activation recomputation, the seed), and the padded vocabulary (the tokenizer's; compared).
- Without --use-checkpoint-args nothing is read here: the command line gives the model, and
  --load refuses shape differences and reports routing differences (megatron/checkpoint_check).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from megatron.checkpoint_args import LEGACY_ACTIVATION, model_differences
from megatron.checkpoint_check import saved_model_config
from megatron.config import (CheckpointConfig, DataConfig, GPTConfig, LoggingConfig, MoEConfig,
                             OptimizerConfig, TrainingConfig)

DEFAULT_THRESHOLD = 0.9          # the XMoE paper's threshold, used when --threshold is not given

# --use-checkpoint-args: saved GPTConfig / MoEConfig field -> the argparse dest it fills.
_MODEL_DESTS = {k: k for k in (
    "num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
    "ffn_hidden_size", "hidden_dropout", "attention_dropout", "init_method_std",
    "layernorm_epsilon", "num_experts", "expert_interval", "no_moe_layer_num")}
_MOE_DESTS = {"ffn_hidden_size": "moe_ffn_hidden_size", "topk": "topk", "threshold": "threshold",
              "threshold_max_experts": "threshold_max_experts",
              "train_capacity_factor": "moe_train_capacity_factor",
              "eval_capacity_factor": "moe_eval_capacity_factor",
              "min_capacity": "moe_min_capacity", "drop_tokens": "moe_token_dropping",
              "aux_loss_coeff": "moe_loss_coeff", "z_loss_coeff": "moe_z_loss_coeff"}
# Flags that together choose one setting: one of them given keeps all of them as given.
_ROUTER_DESTS = {"threshold": "use_threshold", "topk": "use_topk", "hash": "use_hash_layer"}
_GELU_DESTS = {"gelu_tanh": (True, False, False), "gelu": (False, False, False),
               "gelu_erf_onnx": (True, False, True)}     # bias_gelu_fusion, openai, onnx_safe
_GELU_FLAGS = ("bias_gelu_fusion", "openai_gelu", "onnx_safe")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, built once from the command line."""

    model: GPTConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig
    logging: LoggingConfig
    checkpoint: CheckpointConfig


def build_data_config(args: argparse.Namespace) -> DataConfig:
    """The data config alone: the entry point builds the tokenizer (hence the padded vocabulary
    size build_configs needs) from it. The vocabulary files are recorded as absolute paths: the
    checkpoint keeps them, and tools run from another directory (generation, export) find them."""
    return DataConfig(
        data_path=tuple(args.data_path or ()), split=args.split,
        data_cache_path=args.data_cache_path, num_workers=args.num_workers,
        tokenizer_type=args.tokenizer_type, vocab_file=_absolute(args.vocab_file),
        merge_file=_absolute(args.merge_file),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path is None else os.path.abspath(path)


@dataclass(frozen=True)
class ValidatedArgs:
    """What validate_args (megatron/arguments.py) hands to build_configs.

    flags: a copy of the parsed namespace with --use-checkpoint-args' values and Megatron's
    derived defaults filled in (--global-batch-size: micro-batch x data-parallel size;
    --max-position-embeddings: --seq-length), as Megatron's own args hold them. The rest is
    what validation derived. The caller's namespace is never changed, and build_configs takes
    only this type, so a command line that was not validated cannot be built.
    """

    flags: argparse.Namespace
    world_size: int
    router: str                                   # the one router (arguments._resolve_router)
    zero_stage: int                               # the flag, the DeepSpeed JSON's, or 0
    distributed_backend: str                      # the flag, else nccl with CUDA, gloo without
    checkpoint_model: Optional[Dict[str, Any]] = None   # --use-checkpoint-args: saved config
    checkpoint_dir: Optional[str] = None                # ... and the tag directory it came from

    @property
    def data_parallel_size(self) -> int:
        """Every process is a data-parallel rank (no tensor or pipeline parallelism)."""
        return self.world_size


def build_configs(validated: ValidatedArgs, padded_vocab_size: int) -> RunConfig:
    """Turn a validated command line into the run's frozen configs (each config validates its
    own options once, in its __post_init__: a bad value is one ValueError naming the flag).

    Under --use-checkpoint-args, explicit model flags that differ from the checkpoint's in
    shape or function are refused here (ValueError naming each), before anything is built.
    """
    if not isinstance(validated, ValidatedArgs):
        raise TypeError("build_configs takes validate_args(args, world_size)'s result, got "
                        f"{type(validated).__name__}")
    v, args = validated, validated.flags
    model = _model_config(v, padded_vocab_size)
    if v.checkpoint_model is not None:
        shape, _ = model_differences(v.checkpoint_model, dataclasses.asdict(model))
        if shape:
            raise ValueError(f"--use-checkpoint-args: {v.checkpoint_dir} was saved with "
                             f"other model flags: {', '.join(shape)}; leave these flags out "
                             "to take the checkpoint's values")
    return RunConfig(model=model, optimizer=_optimizer_config(args),
                     training=_training_config(v), data=build_data_config(args),
                     logging=_logging_config(args), checkpoint=_checkpoint_config(args))


def checkpoint_flag_values(saved: Dict[str, Any]) -> Dict[str, Any]:
    """argparse dest -> value of every model flag a saved model config (RunConfig.model as a
    dict) determines; fields an older checkpoint lacks are left out (the GeLU form: exact
    erf, as those checkpoints used)."""
    values = {dest: saved[key] for key, dest in _MODEL_DESTS.items() if key in saved}
    moe = saved.get("moe") or {}
    values.update({dest: moe[key] for key, dest in _MOE_DESTS.items() if key in moe})
    if "num_experts" in values:
        values["num_experts"] = [int(e) for e in values["num_experts"]]
    if "max_position_embeddings" in saved:
        values["seq_length"] = saved["max_position_embeddings"]
    router = moe.get("router")
    if router is not None:
        values.update({dest: router == name for name, dest in _ROUTER_DESTS.items()})
    activation = saved.get("activation", LEGACY_ACTIVATION)
    if activation in _GELU_DESTS:
        values.update(zip(_GELU_FLAGS, _GELU_DESTS[activation]))
    return values


def apply_checkpoint_args(args: argparse.Namespace
                          ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """--use-checkpoint-args: fill the model flags not given on the command line from the
    checkpoint --load names (see the module docstring) into `args` (validate_args' copy); a
    no-op without the flag.

    Returns (the saved model config, its tag directory) for build_configs' comparison, or
    (None, None). ValueError: no --load, no checkpoint there, no saved model flags in it.
    """
    if not getattr(args, "use_checkpoint_args", False):
        return None, None
    if args.load is None:
        raise ValueError("--use-checkpoint-args needs --load (the checkpoint whose model flags "
                         "it takes)")
    tag_dir, saved = saved_model_config(args.load)
    explicit = set(getattr(args, "explicit_flags", ()))
    values = checkpoint_flag_values(saved)
    for group in (set(_ROUTER_DESTS.values()), set(_GELU_FLAGS)):
        if explicit & group:            # the command line chose this setting: keep all of it
            for dest in group:
                values.pop(dest, None)
    for dest, value in values.items():
        if dest not in explicit:
            setattr(args, dest, value)
    return saved, tag_dir


def gelu_form(bias_gelu_fusion: bool, openai_gelu: bool, onnx_safe: bool) -> str:
    """The GeLU form (megatron.config.ACTIVATIONS) Megatron-DeepSpeed's ParallelMLP picks, in
    its order (the XMoE fork's ParallelMLP; its experts are deep copies of one, so every dense
    MLP and expert of the model uses the same form):

        --openai-gelu                       -> gelu_tanh      (openai_gelu)
        else --onnx-safe                    -> gelu_erf_onnx  (erf_gelu, x / 1.41421)
        else bias-gelu fusion (the default) -> gelu_tanh      (bias_gelu_impl: tanh, fused)
        else (--no-bias-gelu-fusion)        -> gelu           (F.gelu, exact erf)

    (Older Megatron versions tested the fusion first, so there --openai-gelu and --onnx-safe
    mattered only with --no-bias-gelu-fusion; the fork's Megatron-DeepSpeed has the order above.)
    """
    if openai_gelu:
        return "gelu_tanh"
    if onnx_safe:
        return "gelu_erf_onnx"
    return "gelu_tanh" if bias_gelu_fusion else "gelu"


def _model_config(v: ValidatedArgs, padded_vocab_size: int) -> GPTConfig:
    args = v.flags
    ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    moe = MoEConfig(
        router=v.router, ffn_hidden_size=args.moe_ffn_hidden_size or ffn_hidden_size,
        topk=args.topk,
        threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
        threshold_max_experts=args.threshold_max_experts,
        train_capacity_factor=args.moe_train_capacity_factor,
        eval_capacity_factor=args.moe_eval_capacity_factor,
        min_capacity=args.moe_min_capacity, drop_tokens=args.moe_token_dropping,
        aux_loss_coeff=args.moe_loss_coeff, z_loss_coeff=args.moe_z_loss_coeff,
        hash_seed=args.seed, vocab_size=padded_vocab_size,
        sync_free=args.moe_sync_free_dispatch or args.compile is not None,
        expert_parallel_size=args.moe_expert_parallel_size,
        compile_routing=args.moe_compile_routing or args.moe_routing_cuda_graphs,
        routing_cuda_graphs=args.moe_routing_cuda_graphs, backend=args.moe_backend)
    return GPTConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, padded_vocab_size=padded_vocab_size,
        max_position_embeddings=args.max_position_embeddings, ffn_hidden_size=ffn_hidden_size,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, layernorm_epsilon=args.layernorm_epsilon,
        params_dtype="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        num_experts=tuple(args.num_experts), expert_interval=args.expert_interval,
        no_moe_layer_num=args.no_moe_layer_num, moe=moe,
        checkpoint_activations=args.checkpoint_activations,
        activation=gelu_form(args.bias_gelu_fusion, args.openai_gelu, args.onnx_safe))


def _optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        lr=0.0 if args.lr is None else args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad, lr_decay_style=args.lr_decay_style,
        lr_warmup_fraction=args.lr_warmup_fraction, lr_warmup_iters=args.lr_warmup_iters,
        lr_warmup_tokens=args.lr_warmup_tokens, lr_decay_iters=args.lr_decay_iters,
        lr_decay_tokens=args.lr_decay_tokens, create_moe_param_group=args.create_moe_param_group)


def _training_config(v: ValidatedArgs) -> TrainingConfig:
    args = v.flags
    return TrainingConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, train_iters=args.train_iters, train_tokens=args.train_tokens,
        seed=args.seed, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        test_iters=args.test_iters, eval_only=args.eval_only, exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins, fp16=args.fp16, bf16=args.bf16,
        zero_stage=v.zero_stage, checkpoint_activations=args.checkpoint_activations,
        compile=args.compile, distributed_backend=v.distributed_backend,
        data_parallel_size=v.data_parallel_size, deepspeed=args.deepspeed,
        deepspeed_config=args.deepspeed_config,
        deepspeed_activation_checkpointing=args.deepspeed_activation_checkpointing,
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=int(args.loss_scale_window),
        hysteresis=args.hysteresis, local_rank=args.local_rank)


def _logging_config(args: argparse.Namespace) -> LoggingConfig:
    return LoggingConfig(log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
                         tensorboard_log_interval=args.tensorboard_log_interval,
                         log_moe_stats=args.log_moe_stats)


def _checkpoint_config(args: argparse.Namespace) -> CheckpointConfig:
    return CheckpointConfig(save=args.save, load=args.load, save_interval=args.save_interval,
                            no_save_optim=args.no_save_optim, no_save_rng=args.no_save_rng,
                            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
                            finetune=args.finetune)
