"""The exact correspondence between xmoe's dense GPT and transformers' GPT2LMHeadModel.

Both are GPT-2: learned absolute positions, pre-LayerNorm blocks with biases, a final LayerNorm,
an output layer tied to the word embedding, attention scaled by 1/sqrt(head dim). What differs
is layout, and one activation:

- QKV: ours is Megatron's fused [3H, H] with per-head interleaved rows (row n*3D + j*D + d is
  (q, k, v)[j] of head n: view(B, S, N, 3, D)); GPT-2's c_attn is a Conv1D [H, 3H] (weights
  transposed) with columns [q | k | v] (column j*H + n*D + d). Rows are permuted exactly.
- Every other Linear [out, in] is a Conv1D [in, out]: transposed.
- GeLU: ours "gelu_tanh" (Megatron's default) is GPT-2's "gelu_new" (the same tanh formula;
  transformers evaluates it with its own expression, equal to ~1 ulp), "gelu" is "gelu".
  Megatron's --onnx-safe erf GeLU (erf(x / 1.41421)) has no transformers name: such a model
  exports with the remote code instead (convert.py), never silently as another GeLU.
- The vocabulary keeps Megatron's padded rows (vocab_size = the padded size), so logits and
  log-probabilities equal ours over the same rows; the tokenizer never produces the extra ids.

Letters: H hidden, N heads, D head dim (H = N * D), F ffn hidden, V padded vocabulary.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from megatron.config import GPTConfig

# Our GeLU form -> transformers' ACT2FN name (GPT2Config.activation_function).
GPT2_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# ... and back (gelu_pytorch_tanh is the same tanh approximation, as torch computes it).
FROM_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                         "gelu": "gelu"}


def is_dense(config: GPTConfig) -> bool:
    return all(config.experts_for_layer(L) == 1 for L in range(1, config.num_layers + 1))


def not_stock_gpt2_reason(config: GPTConfig) -> Optional[str]:
    """Why the model needs the remote code (a phrase), or None when GPT2LMHeadModel is exact."""
    if not is_dense(config):
        moe = [L for L in range(1, config.num_layers + 1) if config.experts_for_layer(L) > 1]
        return f"MoE layers {moe} ({config.moe.router} routing)"
    if config.activation not in GPT2_ACTIVATIONS:
        return (f"activation {config.activation} (Megatron's --onnx-safe erf GeLU with the "
                "constant 1.41421) has no transformers name")
    return None


def gpt2_config_kwargs(config: GPTConfig, eod: int) -> Dict[str, Any]:
    """GPT2Config keyword arguments of a dense model (not_stock_gpt2_reason is None)."""
    assert not_stock_gpt2_reason(config) is None
    return dict(vocab_size=config.padded_vocab_size, n_positions=config.max_position_embeddings,
                n_embd=config.hidden_size, n_layer=config.num_layers,
                n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
                activation_function=GPT2_ACTIVATIONS[config.activation],
                resid_pdrop=config.hidden_dropout, embd_pdrop=config.hidden_dropout,
                attn_pdrop=config.attention_dropout, layer_norm_epsilon=config.layernorm_epsilon,
                initializer_range=config.init_method_std, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                tie_word_embeddings=True, bos_token_id=eod, eos_token_id=eod,
                architectures=["GPT2LMHeadModel"])


def _qkv_rows_to_gpt2(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Our [3H, ...] per-head (n, j, d) rows -> GPT-2's (j, n, d) order."""
    three_h = t.shape[0]
    return t.reshape(heads, 3, three_h // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(
        t.shape)


def _qkv_rows_from_gpt2(t: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-2's (j, n, d) rows -> our per-head (n, j, d) order."""
    three_h = t.shape[0]
    return t.reshape(3, heads, three_h // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(
        t.shape)


# Per-layer names: ours -> GPT-2's, and whether the weight is a transposed Conv1D.
_LAYER_NAMES = (("input_layernorm.weight", "ln_1.weight", False),
                ("input_layernorm.bias", "ln_1.bias", False),
                ("self_attention.dense.weight", "attn.c_proj.weight", True),
                ("self_attention.dense.bias", "attn.c_proj.bias", False),
                ("post_attention_layernorm.weight", "ln_2.weight", False),
                ("post_attention_layernorm.bias", "ln_2.bias", False),
                ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", True),
                ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", False),
                ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", True),
                ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", False))
_GLOBAL_NAMES = (("embedding.word_embeddings.weight", "transformer.wte.weight"),
                 ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
                 ("transformer.final_layernorm.weight", "transformer.ln_f.weight"),
                 ("transformer.final_layernorm.bias", "transformer.ln_f.bias"))


def to_gpt2_state_dict(ours: Dict[str, torch.Tensor], config: GPTConfig
                       ) -> Dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors (lm_head.weight omitted: tied to transformer.wte.weight)."""
    heads = config.num_attention_heads
    out = {theirs: ours[name] for name, theirs in _GLOBAL_NAMES}
    for i in range(config.num_layers):
        src, dst = f"transformer.layers.{i}.", f"transformer.h.{i}."
        qkv_w = ours[src + "self_attention.query_key_value.weight"]
        out[dst + "attn.c_attn.weight"] = _qkv_rows_to_gpt2(qkv_w, heads).t()
        out[dst + "attn.c_attn.bias"] = _qkv_rows_to_gpt2(
            ours[src + "self_attention.query_key_value.bias"], heads)
        for name, theirs, transposed in _LAYER_NAMES:
            t = ours[src + name]
            out[dst + theirs] = t.t() if transposed else t
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_gpt2_state_dict(theirs: Dict[str, torch.Tensor], num_layers: int, heads: int
                         ) -> Dict[str, torch.Tensor]:
    """Our GPTModel's tensors from GPT2LMHeadModel's (keys with or without "transformer.")."""
    theirs = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v
              for k, v in theirs.items()}
    out = {name: theirs[key] for name, key in _GLOBAL_NAMES}
    for i in range(num_layers):
        src, dst = f"transformer.h.{i}.", f"transformer.layers.{i}."
        out[dst + "self_attention.query_key_value.weight"] = _qkv_rows_from_gpt2(
            theirs[src + "attn.c_attn.weight"].t(), heads)
        out[dst + "self_attention.query_key_value.bias"] = _qkv_rows_from_gpt2(
            theirs[src + "attn.c_attn.bias"], heads)
        for name, key, transposed in _LAYER_NAMES:
            t = theirs[src + key]
            out[dst + name] = t.t() if transposed else t
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def gpt_config_from_gpt2(hf: Dict[str, Any], where: str) -> Tuple[GPTConfig, int]:
    """(GPTConfig, eod id) of a GPT-2 config.json dict; ValueError naming what our GPT cannot
    express (`where`: the file, for the message)."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r}; --from-hf reads GPT-2 "
                         "(model_type gpt2) only")
    activation = hf.get("activation_function", "gelu_new")
    checks = ((activation in FROM_GPT2_ACTIVATIONS,
               f"activation_function {activation!r} (supported: {sorted(FROM_GPT2_ACTIVATIONS)})"),
              (hf.get("scale_attn_weights", True), "scale_attn_weights false"),
              (not hf.get("scale_attn_by_inverse_layer_idx", False),
               "scale_attn_by_inverse_layer_idx true"),
              (not hf.get("add_cross_attention", False), "add_cross_attention true"),
              (hf.get("tie_word_embeddings", True), "tie_word_embeddings false"))
    for ok, what in checks:
        if not ok:
            raise ValueError(f"{where}: {what} cannot be expressed by xmoe's GPT")
    hidden = int(hf.get("n_embd", 768))
    config = GPTConfig(
        num_layers=int(hf.get("n_layer", 12)), hidden_size=hidden,
        num_attention_heads=int(hf.get("n_head", 12)),
        padded_vocab_size=int(hf.get("vocab_size", 50257)),
        max_position_embeddings=int(hf.get("n_positions", 1024)),
        ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)),
        attention_dropout=float(hf.get("attn_pdrop", 0.1)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=FROM_GPT2_ACTIVATIONS[activation])
    eod = hf.get("eos_token_id", 50256)
    return config, int(eod[0] if isinstance(eod, list) else eod)
