"""Which model flags of a run differ from the ones a checkpoint was saved with.

Both sides are `RunConfig.model` as a dict (`dataclasses.asdict`; read back from JSON, tuples
are lists). Two kinds of difference:

- shape: flags that change which parameters exist or their shapes (or, for
  --num-attention-heads, how the same tensors are read): loading would fail in DeepSpeed with one
  `size mismatch` per tensor, or silently compute another model. Refused by the caller.
- routing: OVERRIDABLE_ROUTING (megatron/config.py, the one list of them): the router kind
  among the gated routers (threshold / top-k / switch), --threshold, --threshold-max-experts,
  --topk, --moe-eval-capacity-factor, --moe-min-capacity, --disable-moe-token-dropping. They
  keep every parameter's shape, and evaluating or fine-tuning a checkpoint under other routing
  (another threshold, another capacity) is a legitimate experiment, so they are only reported.
  The same list is what --use-checkpoint-args lets an explicit flag override
  (megatron/run_config.py). The training capacity factor, dropout and dtype are run settings:
  not compared.
- the GeLU form (GPTConfig.activation) and --layernorm-epsilon are refused like a shape: the
  same tensors would compute another function. Checkpoints saved before the GeLU field existed
  used exact erf GeLU, so a saved model without it counts as "gelu" (--no-bias-gelu-fusion).

Layers that are dense or MoE follow Megatron-DeepSpeed's placement (megatron.config), so e.g.
--num-experts 4 and --num-experts 4 4 on two MoE layers are the same model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from megatron.config import OVERRIDABLE_ROUTING, moe_layer_numbers

__all__ = ["OVERRIDABLE_ROUTING", "model_differences", "experts_per_layer"]

_PLAIN_SHAPE_FLAGS = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
                      ("num_attention_heads", "--num-attention-heads"),
                      ("layernorm_epsilon", "--layernorm-epsilon"))
_PLACEMENT_FLAGS = (("num_experts", "--num-experts"), ("expert_interval", "--expert-interval"),
                    ("no_moe_layer_num", "--no-moe-layer-num"))
# How each GeLU form is asked for on the command line (megatron.run_config.gelu_form).
GELU_FLAGS = {"gelu_tanh": "the default GeLU (tanh, bias-gelu fusion)",
              "gelu": "--no-bias-gelu-fusion (exact erf GeLU)",
              "gelu_erf_onnx": "--onnx-safe (erf GeLU, x / 1.41421)"}
LEGACY_ACTIVATION = "gelu"      # checkpoints saved before GPTConfig.activation: exact erf
ROUTER_FLAGS = {"threshold": "--use-threshold", "topk": "--use-topk",
                "hash": "--use-hash-layer", "switch": "--topk 1"}


# Routing settings that only mean something for one router: compared when both use it.
_ONE_ROUTER_SETTINGS = {"threshold": "threshold", "threshold_max_experts": "threshold",
                        "topk": "topk"}


def _text(value: Any) -> str:
    """A value as it is written on the command line (lists space-separated; None: none)."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def experts_per_layer(model: Dict[str, Any]) -> List[int]:
    """Experts of each layer 1..L (1: a dense MLP), by Megatron-DeepSpeed's placement."""
    num_layers = int(model["num_layers"])
    moe_layers = moe_layer_numbers(num_layers, int(model.get("expert_interval", 2)),
                                   int(model.get("no_moe_layer_num", 0)))
    counts = list(model.get("num_experts", [1]))
    per_layer = {layer: counts[min(i, len(counts) - 1)] for i, layer in enumerate(moe_layers)}
    return [int(per_layer.get(layer, 1)) for layer in range(1, num_layers + 1)]


class _Differences:
    """Collects "FLAG SAVED (this run: RUN)" items; a key missing on one side (a checkpoint
    older than the field) is not compared."""

    def __init__(self, saved: Dict[str, Any], run: Dict[str, Any]) -> None:
        self.saved, self.run, self.items = saved, run, []

    def compare(self, key: str, flag: str, note: str = "") -> None:
        if key not in self.saved or key not in self.run:
            return
        a, b = self.saved[key], self.run[key]
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            self.items.append(f"{flag} {_text(a)} (this run: {_text(b)}{note})")


def model_differences(saved: Dict[str, Any], run: Dict[str, Any]
                      ) -> Tuple[List[str], List[str]]:
    """(shape differences, routing differences) as "FLAG SAVED (this run: RUN)" items."""
    shape = _Differences(saved, run)
    for key, flag in _PLAIN_SHAPE_FLAGS:
        shape.compare(key, flag)
    shape.compare("max_position_embeddings", "--max-position-embeddings",
                  "; it defaults to --seq-length")
    shape.compare("padded_vocab_size", "padded vocabulary size",
                  "; set by --vocab-file and --make-vocab-size-divisible-by")
    saved_layers, run_layers = experts_per_layer(saved), experts_per_layer(run)
    if saved_layers != run_layers:
        for key, flag in _PLACEMENT_FLAGS:
            shape.compare(key, flag)
    if 1 in saved_layers and 1 in run_layers:
        shape.compare("ffn_hidden_size", "--ffn-hidden-size")
    _compare_activation(saved, run, shape.items)
    routing: List[str] = []
    if max(saved_layers) > 1 and max(run_layers) > 1:
        saved_moe, run_moe = saved.get("moe", {}), run.get("moe", {})
        moe = _Differences(saved_moe, run_moe)
        moe.compare("ffn_hidden_size", "--moe-ffn-hidden-size")
        shape.items += moe.items
        routing = _routing_differences(saved_moe, run_moe, shape.items)
    return shape.items, routing


def _compare_activation(saved: Dict[str, Any], run: Dict[str, Any], items: List[str]) -> None:
    """The GeLU form; a saved model without the field is an older checkpoint (exact erf)."""
    if "activation" not in run:
        return
    a, b = saved.get("activation", LEGACY_ACTIVATION), run["activation"]
    if a != b:
        items.append(f"{GELU_FLAGS.get(a, a)} (this run: {GELU_FLAGS.get(b, b)})")


def _routing_differences(saved_moe: Dict[str, Any], run_moe: Dict[str, Any],
                         shape_items: List[str]) -> List[str]:
    """The OVERRIDABLE_ROUTING settings that differ (a router's own settings only when both
    sides use that router); hash vs a gated router changes the parameters (a frozen table
    instead of the gate weight), so that one is appended to `shape_items`."""
    a, b = saved_moe.get("router"), run_moe.get("router")
    if a is None or b is None:
        return []
    routing = _Differences(saved_moe, run_moe)
    if a != b:
        item = f"{ROUTER_FLAGS.get(a, a)} (this run: {ROUTER_FLAGS.get(b, b)})"
        if "hash" in (a, b):
            shape_items.append(item)
            return []
        routing.items.append(item)
    for key, flag in OVERRIDABLE_ROUTING.items():
        owner = _ONE_ROUTER_SETTINGS.get(key)
        if key == "router" or (owner is not None and not a == b == owner):
            continue
        if key == "drop_tokens":
            _compare_dropping(saved_moe, run_moe, routing.items)
        else:
            routing.compare(key, flag)
    return routing.items


def _compare_dropping(saved_moe: Dict[str, Any], run_moe: Dict[str, Any],
                      items: List[str]) -> None:
    """drop_tokens as the flags say it: capacity drops tokens unless
    --disable-moe-token-dropping."""
    def words(drop: Any) -> str:
        return "token dropping" if drop else "--disable-moe-token-dropping"

    if "drop_tokens" in saved_moe and "drop_tokens" in run_moe \
            and bool(saved_moe["drop_tokens"]) != bool(run_moe["drop_tokens"]):
        items.append(f"{words(saved_moe['drop_tokens'])} (this run: "
                     f"{words(run_moe['drop_tokens'])})")
