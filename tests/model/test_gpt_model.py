"""GPTModel against a slow, obviously correct reference written here (per-position loops, fp32).

Letters: B batch, S sequence, H hidden, N heads, D head dim, V vocabulary, T tokens (B * S).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import pytest
import torch

from megatron.config import GPTConfig, MoEConfig
from megatron.model import GPTModel, validate_inputs
from megatron.model.attention import KVCache
from tests.model.gelu_reference import FORMS, ref_gelu

Params = Dict[str, torch.Tensor]


def tiny_config(**overrides) -> GPTConfig:
    kw = dict(num_layers=3, hidden_size=16, num_attention_heads=2, padded_vocab_size=50,
              max_position_embeddings=12, ffn_hidden_size=24, hidden_dropout=0.0,
              attention_dropout=0.0, init_method_std=0.2)
    kw.update(overrides)
    return GPTConfig(**kw)


def moe_config(**overrides) -> GPTConfig:
    """Layers 2 and 4 of 4 are MoE (4 and 3 experts); drop-free top-2 so every pair is kept."""
    moe = MoEConfig(router="topk", topk=2, ffn_hidden_size=8, drop_tokens=False,
                    aux_loss_coeff=0.01)
    kw = dict(num_layers=4, num_experts=(4, 3), expert_interval=2, moe=moe)
    kw.update(overrides)
    return tiny_config(**kw)


def batch(config: GPTConfig, B: int = 2, S: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.padded_vocab_size, (B, S), generator=g)
    labels = torch.randint(0, config.padded_vocab_size, (B, S), generator=g)
    return ids, labels


# ---------------------------------------------------------------- the slow reference
def ref_layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def ref_mlp(x: torch.Tensor, w1, b1, w2, b2, form: str) -> torch.Tensor:
    """Megatron's MLP with GeLU form `form` (gelu_reference.py)."""
    return ref_gelu(x @ w1.T + b1, form) @ w2.T + b2


def ref_attention(x_SH: torch.Tensor, p: Params, prefix: str, N: int) -> torch.Tensor:
    """Per position t and head n: softmax over positions 0..t of q_t . k_j / sqrt(D)."""
    S, H = x_SH.shape
    D = H // N
    qkv = x_SH @ p[prefix + "query_key_value.weight"].T + p[prefix + "query_key_value.bias"]
    rows = []
    for t in range(S):
        heads = []
        for n in range(N):  # Megatron layout: head n owns features [n*3D, (n+1)*3D) = q | k | v
            q = qkv[t, n * 3 * D: n * 3 * D + D]
            k = qkv[: t + 1, n * 3 * D + D: n * 3 * D + 2 * D]
            v = qkv[: t + 1, n * 3 * D + 2 * D: (n + 1) * 3 * D]
            scores = (k @ q) / math.sqrt(D)
            e = torch.exp(scores - scores.max())
            heads.append((e / e.sum()) @ v)
        rows.append(torch.cat(heads))
    ctx = torch.stack(rows)
    return ctx @ p[prefix + "dense.weight"].T + p[prefix + "dense.bias"]


MoERef = Callable[[int, torch.Tensor, torch.Tensor, Params], torch.Tensor]


def ref_gpt(config: GPTConfig, p: Params, ids: torch.Tensor, labels: Optional[torch.Tensor],
            moe_ref: Optional[MoERef] = None) -> torch.Tensor:
    """Logits [B, S, V] (labels None) or per-token cross-entropy [B, S]."""
    B, S = ids.shape
    eps = config.layernorm_epsilon
    emb, pos = p["embedding.word_embeddings.weight"], p["embedding.position_embeddings.weight"]
    x = torch.stack([torch.stack([emb[ids[b, t]] + pos[t] for t in range(S)]) for b in range(B)])
    for L in range(1, config.num_layers + 1):
        pre = f"transformer.layers.{L - 1}."
        h = ref_layernorm(x, p[pre + "input_layernorm.weight"], p[pre + "input_layernorm.bias"], eps)
        x = x + torch.stack([ref_attention(h[b], p, pre + "self_attention.",
                                           config.num_attention_heads) for b in range(B)])
        h = ref_layernorm(x, p[pre + "post_attention_layernorm.weight"],
                          p[pre + "post_attention_layernorm.bias"], eps)
        if config.experts_for_layer(L) > 1:
            x = x + moe_ref(L, h.reshape(B * S, -1), ids.reshape(-1), p).view_as(x)
        else:
            x = x + ref_mlp(h, p[pre + "mlp.dense_h_to_4h.weight"], p[pre + "mlp.dense_h_to_4h.bias"],
                            p[pre + "mlp.dense_4h_to_h.weight"], p[pre + "mlp.dense_4h_to_h.bias"],
                            config.activation)
    x = ref_layernorm(x, p["transformer.final_layernorm.weight"],
                      p["transformer.final_layernorm.bias"], eps)
    logits = x @ emb.T  # tied output layer
    if labels is None:
        return logits
    loss = torch.empty(B, S)
    for b in range(B):
        for t in range(S):
            z = logits[b, t]
            lse = z.max() + torch.log(torch.exp(z - z.max()).sum())
            loss[b, t] = lse - z[labels[b, t]]
    return loss


def ref_expert(x_D: torch.Tensor, p: Params, prefix: str, e: int, form: str) -> torch.Tensor:
    """Expert e of an MoE layer: stacked weights w1 [E, D, F], w2 [E, F, D] (x @ w, not w.T)."""
    h = x_D @ p[prefix + "w1"][e] + p[prefix + "b1"][e]
    return ref_gelu(h, form) @ p[prefix + "w2"][e] + p[prefix + "b2"][e]


def make_moe_ref(model: GPTModel, config: GPTConfig) -> MoERef:
    """Per token, sum over its kept experts of weight * expert(x). The integer choices (experts,
    kept) are the layer's own decision; the weight is recomputed from the reference's fp32
    logits (softmax over all experts; 1 for hash routing) so its gradient is checked too."""

    def moe_ref(L: int, x_TD: torch.Tensor, ids_T: torch.Tensor, p: Params) -> torch.Tensor:
        layer = model.transformer.layers[L - 1].mlp
        pre = f"transformer.layers.{L - 1}.mlp."
        with torch.no_grad():
            decision = layer.decide(x_TD.detach(), ids_T)
        rows = []
        for t in range(x_TD.shape[0]):
            y = torch.zeros(x_TD.shape[1])
            if config.moe.router != "hash":
                logits = x_TD[t] @ p[pre + "gate_weight"].T
                probs = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            for k in range(decision.experts_TK.shape[1]):
                if decision.kept_TK[t, k]:
                    e = int(decision.experts_TK[t, k])
                    weight = 1.0 if config.moe.router == "hash" else probs[e]
                    y = y + weight * ref_expert(x_TD[t], p, pre + "experts.", e,
                                                config.activation)
            rows.append(y)
        return torch.stack(rows)

    return moe_ref


def leaf_copies(model: torch.nn.Module) -> Params:
    return {n: q.detach().clone().requires_grad_(True) for n, q in model.named_parameters()}


def compare_with_reference(config: GPTConfig, train: bool = True) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(config).train(train)
    moe_ref = make_moe_ref(model, config)
    ids, labels = batch(config)
    p = leaf_copies(model)

    logits = model(ids).logits
    torch.testing.assert_close(logits, ref_gpt(config, p, ids, None, moe_ref),
                               atol=1e-5, rtol=1e-5)

    out = model(ids, labels=labels)
    ref_loss = ref_gpt(config, p, ids, labels, moe_ref)
    assert out.logits is None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)

    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    (out.loss * w).sum().backward()
    (ref_loss * w).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, p[name].grad, atol=2e-5, rtol=1e-4, msg=name)
    return model


# ---------------------------------------------------------------- dense model
@pytest.mark.parametrize("form", FORMS)
def test_dense_model_matches_reference(form):
    model = compare_with_reference(tiny_config(activation=form))
    assert all(not layer.is_moe for layer in model.transformer.layers)


def test_default_model_uses_megatrons_tanh_gelu_everywhere():
    """Dense MLPs and experts default to the original's fused tanh GeLU (GPT-2's too)."""
    config = moe_config()
    assert config.activation == "gelu_tanh"
    compare_with_reference(config, train=False)
    model = GPTModel(moe_config(activation="gelu"))
    forms = [layer.mlp.experts.activation if layer.is_moe else layer.mlp.activation
             for layer in model.transformer.layers]
    assert forms == ["gelu"] * 4


MOE_ROUTERS = {
    # XMoE threshold routing with capacity drops (train capacity), a variable number of experts.
    "threshold": (dict(router="threshold", threshold=0.5, train_capacity_factor=1.0,
                       min_capacity=2), True),
    # Top-2, dropless; eval mode (training top-k > 1 draws Gumbel noise).
    "topk2": (dict(router="topk", topk=2, drop_tokens=False), False),
    "hash": (dict(router="hash", vocab_size=50, drop_tokens=False), True),
}


@pytest.mark.parametrize("router,form", [(r, "gelu_tanh") for r in MOE_ROUTERS]
                         + [("threshold", "gelu"), ("threshold", "gelu_erf_onnx")])
def test_moe_model_matches_reference(router, form):
    moe_kw, train = MOE_ROUTERS[router]
    config = moe_config(moe=MoEConfig(ffn_hidden_size=8, aux_loss_coeff=0.01, **moe_kw),
                        activation=form)
    model = compare_with_reference(config, train=train)
    assert [layer.num_experts for layer in model.transformer.layers] == [1, 4, 1, 3]
    stats = model(batch(config)[0]).moe_stats
    assert [s.layer_number for s in stats] == [2, 4]
    if router == "threshold":  # the test exercises drops and more than one expert per token
        assert any(s.dropped_fraction.item() > 0 for s in stats)
        assert any(s.wanted_per_token.item() > 1 for s in stats)


def test_parameter_counts_split_experts():
    config = moe_config()
    model = GPTModel(config)
    counts = model.parameter_counts()
    D, F = config.hidden_size, config.moe.ffn_hidden_size
    per_expert = D * F + F + F * D + D
    assert counts["expert"] == (4 + 3) * per_expert
    assert counts["total"] == sum(q.numel() for q in model.parameters())
    assert counts["non_expert"] == counts["total"] - counts["expert"]
    assert model.num_parameters() == counts["total"]
    assert model.num_parameters(active_only=True) == counts["non_expert"] + 2 * per_expert


def test_num_experts_one_is_dense_and_aux_zero():
    config = tiny_config(num_experts=(1,), expert_interval=1)
    model = GPTModel(config)
    out = model(batch(config)[0])
    assert out.moe_stats == [] and out.moe_aux_loss.dtype == torch.float32
    assert out.moe_aux_loss.item() == 0.0
    counts = model.parameter_counts()
    assert counts["expert"] == 0 and counts["total"] == model.num_parameters(active_only=True)


def test_explicit_position_ids():
    config = tiny_config()
    model = GPTModel(config)
    ids, _ = batch(config)
    default = model(ids).logits
    explicit = model(ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    shifted = model(ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids) + 1).logits
    assert not torch.allclose(default, shifted)


def test_tied_output_layer_shares_storage_and_gets_both_grads():
    config = tiny_config()
    model = GPTModel(config)
    assert model.output_weight is model.embedding.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("word_embeddings" in n for n in names) == 1 and not any("output" in n for n in names)
    ids, labels = batch(config)
    model(ids, labels=labels).loss.sum().backward()
    # Tokens absent from the input still get a gradient through the output layer.
    unused = sorted(set(range(config.padded_vocab_size)) - set(ids.flatten().tolist()))
    assert model.output_weight.grad[unused].abs().sum() > 0


def test_sequence_too_long_raises():
    config = tiny_config()
    model = GPTModel(config)
    ids = torch.zeros(1, config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        model(ids)
    with pytest.raises(ValueError, match="--seq-length"):
        model(ids)
    model(ids[:, :-1])  # exactly max_position_embeddings is fine


def test_out_of_range_inputs_raise():
    config = tiny_config()
    model = GPTModel(config)
    ids, labels = batch(config)
    bad = ids.clone()
    bad[0, 3] = config.padded_vocab_size
    with pytest.raises(ValueError, match="input_ids"):
        model(bad)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=bad)
    with pytest.raises(ValueError, match="position_ids"):
        validate_inputs(config, ids, position_ids=torch.full_like(ids, config.max_position_embeddings))
    with pytest.raises(ValueError, match="shape"):
        model(ids, labels=labels[:, :-1])
    validate_inputs(config, ids, labels=labels)


def test_dropout_active_in_train_only():
    for hidden, attention in ((0.5, 0.0), (0.0, 0.5)):
        config = tiny_config(hidden_dropout=hidden, attention_dropout=attention)
        torch.manual_seed(0)
        model = GPTModel(config)
        torch.manual_seed(0)
        no_dropout = GPTModel(tiny_config())
        no_dropout.load_state_dict(model.state_dict())
        ids, _ = batch(config)
        model.train()
        assert not torch.allclose(model(ids).logits, model(ids).logits)
        model.eval()
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, no_dropout(ids).logits, rtol=0, atol=0)


def run_train_step(model: GPTModel, ids, labels, seed: int = 123):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(ids, labels=labels)
    (out.loss.mean() + out.moe_aux_loss).backward()
    return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


def sync_free_threshold_config(**overrides) -> GPTConfig:
    """moe_config with the threshold router (capacity-limited) and the sync-free dispatch: the
    launch scripts' default dispatch, which ACTIVATION_CHECKPOINT=true recomputes."""
    moe = MoEConfig(router="threshold", threshold=0.6, ffn_hidden_size=8, train_capacity_factor=1.0,
                    min_capacity=1, aux_loss_coeff=0.01, sync_free=True)
    return moe_config(moe=moe, **overrides)


@pytest.mark.parametrize("make_config", [tiny_config, moe_config, sync_free_threshold_config],
                         ids=["dense", "moe", "sync_free_threshold"])
def test_checkpoint_activations_matches_plain(make_config):
    config = make_config(hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    plain = GPTModel(config)
    ckpt = GPTModel(make_config(hidden_dropout=0.1, attention_dropout=0.1,
                                checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    ids, labels = batch(config)
    out_a, grads_a = run_train_step(plain.train(), ids, labels)
    out_b, grads_b = run_train_step(ckpt.train(), ids, labels)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    torch.testing.assert_close(out_a.moe_aux_loss, out_b.moe_aux_loss, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_params_keep_router_fp32():
    config = moe_config(params_dtype="bf16")
    model = GPTModel(config)
    routers = 0
    for name, q in model.named_parameters():
        if name.endswith("gate_weight"):
            routers += 1
            assert q.dtype == torch.float32, name
        else:
            assert q.dtype == torch.bfloat16, name
    assert routers == 2
    ids, labels = batch(config)
    logits_out = model(ids)
    assert logits_out.logits.dtype == torch.bfloat16
    out = model(ids, labels=labels)
    assert out.loss.dtype == torch.float32 and out.moe_aux_loss.dtype == torch.float32
    assert torch.isfinite(out.loss).all()
    (out.loss.mean() + out.moe_aux_loss).backward()
    assert all(q.grad is not None and q.grad.dtype == q.dtype for q in model.parameters())


# ---------------------------------------------------------------- incremental forward (KV cache)
INCREMENTAL_CONFIGS = {
    "dense": lambda: tiny_config(),
    "threshold": lambda: moe_config(moe=MoEConfig(router="threshold", threshold=0.5,
                                                  ffn_hidden_size=8, drop_tokens=False)),
    "topk2": lambda: moe_config(),
    "hash": lambda: moe_config(moe=MoEConfig(router="hash", vocab_size=50, ffn_hidden_size=8,
                                             drop_tokens=False)),
}


@pytest.mark.parametrize("name", INCREMENTAL_CONFIGS)
def test_cached_incremental_forward_equals_full_forward(name):
    """A prompt of 4, then one position at a time, then a chunk of 3 with a past (the masked
    path): each call's logits equal the full forward's at those positions (fp32, tight). A
    prompt into an empty cache runs the training path itself (is_causal): bitwise equal."""
    config = INCREMENTAL_CONFIGS[name]()
    torch.manual_seed(0)
    model = GPTModel(config).eval()
    ids, _ = batch(config, B=2, S=10)
    with torch.no_grad():
        full = model(ids).logits
        prefilled = model(ids, kv_cache=KVCache(config.num_layers, max_length=10)).logits
        torch.testing.assert_close(prefilled, full, rtol=0, atol=0)
        cache = KVCache(config.num_layers, max_length=10)
        chunks = [(0, 4), (4, 5), (5, 6), (6, 7), (7, 10)]
        for start, end in chunks:
            assert cache.length == start
            out = model(ids[:, start:end], kv_cache=cache)
            torch.testing.assert_close(out.logits, full[:, start:end], rtol=1e-5, atol=1e-5,
                                       msg=f"positions {start}..{end}")
        assert cache.length == 10


def test_cached_forward_with_explicit_positions_and_bad_calls():
    config = tiny_config()
    model = GPTModel(config).eval()
    ids, _ = batch(config, B=1, S=config.max_position_embeddings)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(config.num_layers, max_length=config.max_position_embeddings)
        model(ids[:, :5], kv_cache=cache)
        step = model(ids[:, 5:6], position_ids=torch.tensor([[5]]), kv_cache=cache).logits
        torch.testing.assert_close(step, full[:, 5:6], rtol=1e-5, atol=1e-5)
        model(ids[:, 6:], kv_cache=cache)        # fills the position table exactly
        with pytest.raises(ValueError, match="--max-position-embeddings"):
            model(ids[:, :1], kv_cache=cache)
        with pytest.raises(ValueError, match="layers"):
            model(ids[:, :1], kv_cache=KVCache(config.num_layers + 1, max_length=4))
        small = KVCache(config.num_layers, max_length=2)
        with pytest.raises(ValueError, match="max_length 2"):
            model(ids[:, :3], kv_cache=small)
        assert small.length == 0                 # refused before anything was written


def test_record_experts_gives_each_tokens_kept_experts_only_on_request():
    """token_experts_TK holds each token's kept experts in choice order, -1 elsewhere (the
    layer's own routing decision); without record_experts it is not computed."""
    config = moe_config(moe=MoEConfig(router="threshold", threshold=0.6, ffn_hidden_size=8,
                                      drop_tokens=True, eval_capacity_factor=0.5,
                                      min_capacity=1))
    torch.manual_seed(0)
    model = GPTModel(config).eval()
    ids, _ = batch(config)
    seen = {}
    for layer in model.transformer.layers:
        if layer.is_moe:
            layer.mlp.register_forward_pre_hook(
                lambda m, args: seen.__setitem__(m.layer_number, args[0].detach().clone()))
    with torch.no_grad():
        plain = model(ids)
        assert all(s.token_experts_TK is None for s in plain.moe_stats)
        recorded = model(ids, record_experts=True)
    dropped = 0
    for s in recorded.moe_stats:
        layer = model.transformer.layers[s.layer_number - 1].mlp
        x_TD = seen[s.layer_number].reshape(-1, config.hidden_size)
        decision = layer.decide(x_TD, ids.reshape(-1))
        expected = torch.where(decision.kept_TK, decision.experts_TK, -1)
        assert torch.equal(s.token_experts_TK, expected)
        dropped += int((decision.wanted_TK & ~decision.kept_TK).sum())
    assert dropped > 0      # capacity drops show as -1, not as the wanted expert
    torch.testing.assert_close(recorded.logits, plain.logits, rtol=0, atol=0)
