"""Typed configuration: model and MoE layers, optimizer, training loop, data, logging, checkpoints.

The Megatron-spelled command line (`megatron/arguments.py`) is turned into these frozen
dataclasses in one place; model, data and training code receive them (or the few fields they
need) and never read a global argument namespace. Each config validates itself and names the flag
behind a bad value. This module is torch-free so data tools can import the package cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from megatron.data.dataset_split import parse_data_path, parse_split

ROUTERS = ("threshold", "topk", "switch", "hash")
MOE_BACKENDS = ("auto", "torch", "triton")   # --moe-backend (see megatron/model/moe/backend.py)
PARAMS_DTYPES = ("fp32", "fp16", "bf16")
# GeLU forms of the dense MLPs and experts (megatron/model/activations.py), chosen from Megatron's
# --no-bias-gelu-fusion / --openai-gelu / --onnx-safe by megatron.run_config.gelu_form.
ACTIVATIONS = ("gelu_tanh", "gelu", "gelu_erf_onnx")
DEFAULT_ACTIVATION = "gelu_tanh"     # Megatron's default: fused bias + tanh GeLU
LR_DECAY_STYLES = ("constant", "linear", "cosine")
DISTRIBUTED_BACKENDS = ("nccl", "gloo")


def moe_layer_numbers(num_layers: int, expert_interval: int,
                      no_moe_layer_num: int = 0) -> Tuple[int, ...]:
    """Megatron-DeepSpeed's MoE placement: 1-based layers L > --no-moe-layer-num with
    (L - no_moe_layer_num) % --expert-interval == 0 (those that get --num-experts > 1)."""
    return tuple(L for L in range(1, num_layers + 1)
                 if L > no_moe_layer_num and (L - no_moe_layer_num) % expert_interval == 0)


# MoEConfig fields that change how the same gate weights route tokens, never which parameters
# exist nor what an expert computes: a run may evaluate a checkpoint with other values (reported,
# not refused: megatron/checkpoint_args.py), explicit flags override the checkpoint's under
# --use-checkpoint-args (megatron/run_config.py), and GPTModel.set_routing changes them on a
# built model. Field -> the flag that sets it. (Among routers only the gated ones interchange:
# hash routing has a frozen table instead of the gate weight.)
OVERRIDABLE_ROUTING = {
    "router": "--use-threshold / --use-topk / --topk 1 (switch)",
    "threshold": "--threshold",
    "threshold_max_experts": "--threshold-max-experts",
    "topk": "--topk",
    "eval_capacity_factor": "--moe-eval-capacity-factor",
    "min_capacity": "--moe-min-capacity",
    "drop_tokens": "--disable-moe-token-dropping",
}


@dataclass(frozen=True)
class MoEConfig:
    """How an MoE layer routes and computes (shared by all MoE layers of a model).

    router: "threshold" (XMoE, --use-threshold), "topk" (--use-topk), "switch" (top-1),
    "hash" (--use-hash-layer).
    """

    router: str = "threshold"
    ffn_hidden_size: int = 384                      # --moe-ffn-hidden-size
    topk: int = 1                                   # --topk (top-k router only)
    threshold: float = 0.9                          # --threshold (threshold router only)
    threshold_max_experts: Optional[int] = None     # --threshold-max-experts (None: no cap)
    train_capacity_factor: float = 1.0              # --moe-train-capacity-factor
    eval_capacity_factor: float = 1.0               # --moe-eval-capacity-factor
    min_capacity: int = 4                           # --moe-min-capacity
    drop_tokens: bool = True                        # False with --disable-moe-token-dropping
    aux_loss_coeff: float = 0.01                    # --moe-loss-coeff
    z_loss_coeff: float = 0.0                       # --moe-z-loss-coeff
    expert_bias: bool = True                        # Linear biases in experts (Megatron has them)
    hash_seed: int = 1234                           # seed of the frozen token -> expert map
    vocab_size: Optional[int] = None                # padded vocabulary (needed by hash routing)
    sync_free: bool = False                         # upper-bound dispatch buffer, no host sync
    expert_parallel_size: int = 1                   # --moe-expert-parallel-size
    compile_routing: bool = False                   # --moe-compile-routing (torch.compile)
    routing_cuda_graphs: bool = False               # --moe-routing-cuda-graphs (on CUDA)
    backend: str = "auto"                           # --moe-backend: auto | torch | triton

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"--moe-ffn-hidden-size must be > 0, got {self.ffn_hidden_size}")
        if self.router == "topk" and self.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {self.topk}")
        if not 0.0 < self.threshold <= 1.0:      # checked for every router: a typo never waits
            raise ValueError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.threshold_max_experts is not None and self.threshold_max_experts < 1:
            raise ValueError(
                f"--threshold-max-experts must be >= 1, got {self.threshold_max_experts}")
        for flag, value in (("--moe-train-capacity-factor", self.train_capacity_factor),
                            ("--moe-eval-capacity-factor", self.eval_capacity_factor)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"--moe-min-capacity must be >= 0, got {self.min_capacity}")
        if self.router == "hash" and self.vocab_size is None:
            raise ValueError("hash routing needs the vocabulary size (vocab_size)")
        if self.backend not in MOE_BACKENDS:
            raise ValueError(f"--moe-backend must be one of {MOE_BACKENDS}, got "
                             f"{self.backend!r}")
        if self.expert_parallel_size < 1:
            raise ValueError(f"--moe-expert-parallel-size must be >= 1, got "
                             f"{self.expert_parallel_size}")
        if self.routing_cuda_graphs and not self.compile_routing:
            # (--moe-routing-cuda-graphs sets both; a typed config must too, or the graphs
            # would silently not be used.)
            raise ValueError("routing_cuda_graphs needs compile_routing: the graphs replay the "
                             "compiled routing step")
        if self.expert_parallel_size > 1 and self.sync_free:
            # The exchange needs host split sizes; a sync-free one would need a fixed per-rank
            # capacity in the all_to_all (not built).
            raise ValueError("sync-free dispatch cannot be combined with "
                             f"--moe-expert-parallel-size {self.expert_parallel_size}")

    def capacity(self, num_tokens: int, num_experts: int, training: bool) -> Optional[int]:
        """Per-expert capacity C = max(ceil(T / E * cf), min_capacity); None when dropless."""
        if not self.drop_tokens:
            return None
        cf = self.train_capacity_factor if training else self.eval_capacity_factor
        return max(int(math.ceil(num_tokens / num_experts * cf)), self.min_capacity)


@dataclass(frozen=True)
class GPTConfig:
    """Megatron GPT shape and regularisation; MoE placement by Megatron-DeepSpeed's rule."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None           # --ffn-hidden-size (default 4 * hidden)
    hidden_dropout: float = 0.1                     # --hidden-dropout
    attention_dropout: float = 0.1                  # --attention-dropout
    init_method_std: float = 0.02                   # --init-method-std
    layernorm_epsilon: float = 1e-5                 # --layernorm-epsilon
    params_dtype: str = "fp32"                      # fp32 | fp16 | bf16 (the router stays fp32)
    num_experts: Tuple[int, ...] = (1,)             # --num-experts: one value or one per MoE layer
    expert_interval: int = 2                        # --expert-interval
    no_moe_layer_num: int = 0                       # --no-moe-layer-num
    moe: MoEConfig = field(default_factory=MoEConfig)
    checkpoint_activations: bool = False            # --checkpoint-activations
    # GeLU of every dense MLP and expert (the XMoE fork's experts are copies of its ParallelMLP):
    # see run_config.gelu_form for how the flags choose it.
    activation: str = DEFAULT_ACTIVATION

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        for flag, value in (("--num-layers", self.num_layers), ("--hidden-size", self.hidden_size),
                            ("--num-attention-heads", self.num_attention_heads),
                            ("--max-position-embeddings", self.max_position_embeddings),
                            ("--expert-interval", self.expert_interval)):
            if value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden-size {self.hidden_size} is not divisible by "
                             f"--num-attention-heads {self.num_attention_heads}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params dtype must be one of {PARAMS_DTYPES}, got "
                             f"{self.params_dtype!r}")
        if self.no_moe_layer_num < 0:
            raise ValueError(f"--no-moe-layer-num must be >= 0, got {self.no_moe_layer_num}")
        if any(e < 1 for e in self.num_experts) or not self.num_experts:
            raise ValueError(f"--num-experts values must be >= 1, got {list(self.num_experts)}")
        n_moe = len(self.moe_layer_numbers_if_sparse())
        if len(self.num_experts) not in (1, n_moe) and n_moe > 0:
            raise ValueError(f"--num-experts takes one value or one per MoE layer ({n_moe}), "
                             f"got {list(self.num_experts)}")
        for flag, value in (("--hidden-dropout", self.hidden_dropout),
                            ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {value}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} (chosen by "
                             "--no-bias-gelu-fusion, --openai-gelu, --onnx-safe), got "
                             f"{self.activation!r}")

    def moe_layer_numbers_if_sparse(self) -> Tuple[int, ...]:
        """1-based layers L with L > no_moe_layer_num and (L - no_moe_layer_num) % interval == 0."""
        return moe_layer_numbers(self.num_layers, self.expert_interval, self.no_moe_layer_num)

    def experts_for_layer(self, layer_number: int) -> int:
        """Experts of 1-based layer `layer_number`; 1 means a dense MLP layer."""
        moe_layers = self.moe_layer_numbers_if_sparse()
        if layer_number not in moe_layers:
            return 1
        if len(self.num_experts) == 1:
            return self.num_experts[0]
        return self.num_experts[moe_layers.index(layer_number)]


def _check_positive(*pairs: Tuple[str, Optional[float]]) -> None:
    """Raise ValueError naming the flag of the first value that is not > 0 (None passes)."""
    for flag, value in pairs:
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) and the learning-rate schedule (Megatron's --lr-* flags).

    Warmup is --lr-warmup-fraction of the decay length, or --lr-warmup-iters, or
    --lr-warmup-tokens (token-based, Megatron-DeepSpeed); decay runs over --lr-decay-iters
    (default: --train-iters) or --lr-decay-tokens when given.
    """

    lr: float                                       # --lr
    min_lr: float = 0.0                             # --min-lr
    weight_decay: float = 0.01                      # --weight-decay
    adam_beta1: float = 0.9                         # --adam-beta1
    adam_beta2: float = 0.999                       # --adam-beta2
    adam_eps: float = 1e-8                          # --adam-eps
    clip_grad: float = 1.0                          # --clip-grad (0 disables clipping)
    lr_decay_style: str = "linear"                  # --lr-decay-style
    lr_warmup_fraction: Optional[float] = None      # --lr-warmup-fraction
    lr_warmup_iters: int = 0                        # --lr-warmup-iters
    lr_warmup_tokens: Optional[int] = None          # --lr-warmup-tokens
    lr_decay_iters: Optional[int] = None            # --lr-decay-iters (None: --train-iters)
    lr_decay_tokens: Optional[int] = None           # --lr-decay-tokens
    create_moe_param_group: bool = False            # --create-moe-param-group

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ValueError(f"--lr must be >= 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be in [0, --lr {self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for flag, beta in (("--adam-beta1", self.adam_beta1), ("--adam-beta2", self.adam_beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {beta}")
        _check_positive(("--adam-eps", self.adam_eps))
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, "
                             f"got {self.lr_decay_style!r}")
        if self.lr_warmup_fraction is not None:
            if not 0.0 <= self.lr_warmup_fraction <= 1.0:
                raise ValueError(f"--lr-warmup-fraction must be in [0, 1], "
                                 f"got {self.lr_warmup_fraction}")
            if self.lr_warmup_iters > 0:
                raise ValueError(f"--lr-warmup-fraction {self.lr_warmup_fraction} and "
                                 f"--lr-warmup-iters {self.lr_warmup_iters}: give only one")
        if self.lr_warmup_iters < 0:
            raise ValueError(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_warmup_tokens is not None and self.lr_warmup_tokens < 0:
            raise ValueError(f"--lr-warmup-tokens must be >= 0, got {self.lr_warmup_tokens}")
        _check_positive(("--lr-decay-iters", self.lr_decay_iters),
                        ("--lr-decay-tokens", self.lr_decay_tokens))


@dataclass(frozen=True)
class TrainingConfig:
    """Batch geometry, duration, evaluation cadence, precision and the distributed setup.

    global_batch_size = micro_batch_size * data_parallel_size * gradient_accumulation_steps.
    Training stops at --train-iters or --train-tokens, whichever comes first.
    """

    micro_batch_size: int                           # --micro-batch-size (per GPU)
    global_batch_size: int                          # --global-batch-size
    seq_length: int                                 # --seq-length
    train_iters: Optional[int]                      # --train-iters
    train_tokens: Optional[int]                     # --train-tokens
    seed: int = 1234                                # --seed
    eval_interval: int = 1000                       # --eval-interval
    eval_iters: int = 100                           # --eval-iters (validation)
    test_iters: Optional[int] = None                # --test-iters (None: --eval-iters)
    eval_only: bool = False                         # --eval-only: evaluate, never train
    exit_interval: Optional[int] = None             # --exit-interval
    exit_duration_in_mins: Optional[float] = None   # --exit-duration-in-mins
    fp16: bool = False                              # --fp16
    bf16: bool = False                              # --bf16
    zero_stage: int = 0                             # DeepSpeed JSON zero_optimization.stage
    checkpoint_activations: bool = False            # --checkpoint-activations
    compile: Optional[str] = None                   # --compile: torch.compile backend (None: off)
    distributed_backend: str = "gloo"               # --distributed-backend
    data_parallel_size: int = 1                     # world size / (tensor * pipeline) = world size
    deepspeed: bool = False                         # --deepspeed
    deepspeed_config: Optional[str] = None          # --deepspeed_config (None: built from flags)
    deepspeed_activation_checkpointing: bool = False  # --deepspeed-activation-checkpointing
    loss_scale: Optional[float] = None              # --loss-scale (static; None: dynamic)
    initial_loss_scale: float = 2.0 ** 32           # --initial-loss-scale (a power of 2)
    min_loss_scale: float = 1.0                     # --min-loss-scale
    loss_scale_window: int = 1000                   # --loss-scale-window
    hysteresis: int = 2                             # --hysteresis
    local_rank: Optional[int] = None                # --local_rank (from the launcher)

    def __post_init__(self) -> None:
        _check_positive(("--micro-batch-size", self.micro_batch_size),
                        ("--global-batch-size", self.global_batch_size),
                        ("--seq-length", self.seq_length), ("data-parallel size",
                                                             self.data_parallel_size),
                        ("--eval-interval", self.eval_interval),
                        ("--train-iters", self.train_iters), ("--train-tokens", self.train_tokens),
                        ("--exit-interval", self.exit_interval),
                        ("--exit-duration-in-mins", self.exit_duration_in_mins),
                        ("--loss-scale", self.loss_scale),
                        ("--min-loss-scale", self.min_loss_scale),
                        ("--loss-scale-window", self.loss_scale_window))
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel_size} (= {per_step})")
        if self.train_iters is None and self.train_tokens is None and not self.eval_only:
            raise ValueError("give --train-iters or --train-tokens (or --eval-only)")
        for flag, value in (("--eval-iters", self.eval_iters), ("--test-iters", self.test_iters),
                            ("--hysteresis", self.hysteresis)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are exclusive: give at most one")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"ZeRO stage {self.zero_stage} is not supported (0, 1 or 2)")
        if self.distributed_backend not in DISTRIBUTED_BACKENDS:
            raise ValueError(f"--distributed-backend must be one of {DISTRIBUTED_BACKENDS}, "
                             f"got {self.distributed_backend!r}")
        scale = self.initial_loss_scale
        if not (scale >= 1 and math.log2(scale).is_integer()):
            raise ValueError(f"--initial-loss-scale must be a power of 2 >= 1, got {scale}")

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro batches each rank runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes over all ranks."""
        return self.global_batch_size * self.seq_length

    @property
    def params_dtype(self) -> str:
        return "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from: mmap .bin/.idx prefixes (optionally weighted) and the tokenizer.

    data_path keeps --data-path as given: ("PREFIX",) or ("W1", "P1", "W2", "P2", ...).
    """

    data_path: Tuple[str, ...]                      # --data-path
    split: str = "969,30,1"                         # --split (train, valid, test)
    data_cache_path: Optional[str] = None           # --data-cache-path (None: next to the data)
    num_workers: int = 2                            # --num-workers (DataLoader workers)
    tokenizer_type: str = "GPT2BPETokenizer"        # --tokenizer-type
    vocab_file: Optional[str] = None                # --vocab-file
    merge_file: Optional[str] = None                # --merge-file
    make_vocab_size_divisible_by: int = 128         # --make-vocab-size-divisible-by

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_path", tuple(str(p) for p in self.data_path))
        parse_data_path(list(self.data_path))       # raises naming --data-path
        parse_split(self.split, 1000)               # raises naming --split
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        _check_positive(("--make-vocab-size-divisible-by", self.make_vocab_size_divisible_by))

    @property
    def prefixes(self) -> Tuple[str, ...]:
        return tuple(parse_data_path(list(self.data_path))[0])

    @property
    def weights(self) -> Tuple[float, ...]:
        """Normalised blending weights, one per prefix (1.0 for a single prefix)."""
        return tuple(parse_data_path(list(self.data_path))[1])


@dataclass(frozen=True)
class LoggingConfig:
    """What the training loop prints and writes to TensorBoard."""

    log_interval: int = 100                         # --log-interval (iterations)
    tensorboard_dir: Optional[str] = None           # --tensorboard-dir (None: no TensorBoard)
    tensorboard_log_interval: int = 1               # --tensorboard-log-interval
    log_moe_stats: bool = True                      # --log-moe-stats / --no-log-moe-stats

    def __post_init__(self) -> None:
        _check_positive(("--log-interval", self.log_interval),
                        ("--tensorboard-log-interval", self.tensorboard_log_interval))


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints are saved to and loaded from (Megatron layout)."""

    save: Optional[str] = None                      # --save (directory)
    load: Optional[str] = None                      # --load (directory; absent: start fresh)
    save_interval: Optional[int] = None             # --save-interval (iterations)
    no_save_optim: bool = False                     # --no-save-optim
    no_save_rng: bool = False                       # --no-save-rng
    no_load_optim: bool = False                     # --no-load-optim
    no_load_rng: bool = False                       # --no-load-rng
    finetune: bool = False                          # --finetune: load weights, iteration 0

    def __post_init__(self) -> None:
        _check_positive(("--save-interval", self.save_interval))
        if self.save is not None and self.save_interval is None:
            raise ValueError(f"--save {self.save!r} needs --save-interval")
