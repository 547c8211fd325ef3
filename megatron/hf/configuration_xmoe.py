"""Configuration of xmoe's GPT for Hugging Face transformers (`trust_remote_code=True`).

tools/convert_to_hf.py copies this file and modeling_xmoe.py next to the exported config.json and
model.safetensors. Both are standalone (they import torch and transformers, never megatron), so an
exported directory loads wherever transformers does:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

The routing settings (ROUTING_SETTINGS) may differ from the trained ones, as `--threshold` does
in xmoe's evaluation; pass them at load time or change them on a loaded model:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, threshold=0.5)
    model.set_routing(threshold=0.5)

Inference is dropless by default (drop_tokens=False: every token gets every expert its router
chooses). drop_tokens=True applies xmoe's evaluation capacity per expert,
max(ceil(tokens / experts * capacity_factor), min_capacity), over the tokens of each forward call.
"""

from __future__ import annotations

from typing import Any, List, Optional

from transformers import PretrainedConfig

ROUTERS = ("threshold", "topk", "switch", "hash")
# GeLU forms (xmoe's megatron/model/activations.py): tanh approximation (Megatron's default,
# Hugging Face's "gelu_new"), exact erf, and Megatron's --onnx-safe erf with the constant 1.41421.
ACTIVATIONS = ("gelu_tanh", "gelu", "gelu_erf_onnx")
# Settings that change how the same weights route tokens (never which weights exist).
ROUTING_SETTINGS = ("router", "threshold", "threshold_max_experts", "topk", "drop_tokens",
                    "capacity_factor", "min_capacity")


class XMoEConfig(PretrainedConfig):
    """Megatron GPT shape (learned positions, pre-LayerNorm, tied output) and XMoE layers.

    num_experts: experts per layer, one entry per layer (1: a dense MLP of intermediate_size;
    > 1: an MoE layer of experts of moe_ffn_hidden_size). router: "threshold" (XMoE: the
    fewest experts whose probability mass reaches `threshold`, at most threshold_max_experts),
    "topk" (`topk` experts), "switch" (top-1) or "hash" (a frozen token -> expert table saved
    with the weights).
    """

    model_type = "xmoe"

    def __init__(self, vocab_size: int = 50304, hidden_size: int = 768,
                 num_hidden_layers: int = 12, num_attention_heads: int = 12,
                 intermediate_size: Optional[int] = None, max_position_embeddings: int = 1024,
                 layer_norm_epsilon: float = 1e-5, activation: str = "gelu_tanh",
                 hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 initializer_range: float = 0.02, num_experts: Optional[List[int]] = None,
                 moe_ffn_hidden_size: Optional[int] = None, expert_bias: bool = True,
                 router: str = "threshold", threshold: float = 0.9,
                 threshold_max_experts: Optional[int] = None, topk: int = 1,
                 drop_tokens: bool = False, capacity_factor: float = 1.0, min_capacity: int = 4,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_epsilon = layer_norm_epsilon
        self.activation = activation
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.num_experts = list(num_experts) if num_experts is not None else [1] * num_hidden_layers
        self.moe_ffn_hidden_size = moe_ffn_hidden_size or self.intermediate_size
        self.expert_bias = expert_bias
        self.router = router
        self.threshold = threshold
        self.threshold_max_experts = threshold_max_experts
        self.topk = topk
        self.drop_tokens = drop_tokens
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        # The output layer is the word embedding itself (no separate lm_head to tie).
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def check(self) -> None:
        """ValueError naming the first setting out of range. Called when a model is built, so
        overrides given to from_pretrained (applied after __init__) are checked too."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if len(self.num_experts) != self.num_hidden_layers or min(self.num_experts) < 1:
            raise ValueError(f"num_experts must hold one count >= 1 per layer "
                             f"({self.num_hidden_layers}), got {self.num_experts}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.threshold_max_experts is not None and self.threshold_max_experts < 1:
            raise ValueError(f"threshold_max_experts must be >= 1 or None, got "
                             f"{self.threshold_max_experts}")
        moe_sizes = [e for e in self.num_experts if e > 1]
        if self.router == "topk" and not all(1 <= self.topk <= e for e in moe_sizes):
            raise ValueError(f"topk must be in [1, {min(moe_sizes)}] (the experts of a layer), "
                             f"got {self.topk}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
