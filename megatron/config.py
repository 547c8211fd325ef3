"""Typed configuration for the model and its MoE layers.

The Megatron-spelled command line (`megatron/arguments.py`, the training issue) is turned into
these frozen dataclasses in one place; model code receives them in `__init__` and never reads a
global argument namespace. Each config validates itself and names the flag behind a bad value.
This module is torch-free so data tools can import the package cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

ROUTERS = ("threshold", "topk", "switch", "hash")
PARAMS_DTYPES = ("fp32", "fp16", "bf16")


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
    expert_impl: str = "auto"                       # "auto" | "grouped" | "loop"
    sync_free: bool = False                         # upper-bound dispatch buffer, no host sync

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"--moe-ffn-hidden-size must be > 0, got {self.ffn_hidden_size}")
        if self.router == "topk" and self.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {self.topk}")
        if self.router == "threshold" and not (0.0 < self.threshold <= 1.0):
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
        if self.expert_impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"expert_impl must be auto, grouped or loop, got {self.expert_impl!r}")

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
            raise ValueError(f"params dtype must be one of {PARAMS_DTYPES}, got {self.params_dtype!r}")
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

    def moe_layer_numbers_if_sparse(self) -> Tuple[int, ...]:
        """1-based layers L with L > no_moe_layer_num and (L - no_moe_layer_num) % interval == 0."""
        return tuple(L for L in range(1, self.num_layers + 1)
                     if L > self.no_moe_layer_num
                     and (L - self.no_moe_layer_num) % self.expert_interval == 0)

    def experts_for_layer(self, layer_number: int) -> int:
        """Experts of 1-based layer `layer_number`; 1 means a dense MLP layer."""
        moe_layers = self.moe_layer_numbers_if_sparse()
        if layer_number not in moe_layers:
            return 1
        if len(self.num_experts) == 1:
            return self.num_experts[0]
        return self.num_experts[moe_layers.index(layer_number)]
