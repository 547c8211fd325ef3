"""Transformer layers: Megatron-DeepSpeed MoE placement, Megatron init, aux-loss bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.config import GPTConfig, MoEConfig
from megatron.model.embedding import Embedding
from megatron.model.moe import MoELayer
from megatron.model.transformer import Transformer, TransformerLayer


def config(**overrides) -> GPTConfig:
    kw = dict(num_layers=4, hidden_size=8, num_attention_heads=2, padded_vocab_size=32,
              max_position_embeddings=8, ffn_hidden_size=16, hidden_dropout=0.0,
              attention_dropout=0.0, moe=MoEConfig(router="switch", ffn_hidden_size=4))
    kw.update(overrides)
    return GPTConfig(**kw)


# (num_layers, expert_interval, no_moe_layer_num, num_experts) -> {MoE layer: experts},
# written out by hand from Megatron-DeepSpeed's rule.
PLACEMENTS = [
    ((4, 2, 0, (4,)), {2: 4, 4: 4}),
    ((4, 1, 0, (2,)), {1: 2, 2: 2, 3: 2, 4: 2}),
    ((6, 2, 1, (4,)), {3: 4, 5: 4}),
    ((6, 2, 0, (2, 4, 8)), {2: 2, 4: 4, 6: 8}),
    ((6, 3, 0, (4, 1)), {3: 4}),                     # a per-layer count of 1 stays dense
    ((5, 2, 3, (8,)), {5: 8}),
    ((4, 2, 4, (8,)), {}),                           # no layer past --no-moe-layer-num
    ((4, 1, 0, (1,)), {}),                           # --num-experts 1: dense model
]


@pytest.mark.parametrize("shape,expected", PLACEMENTS)
def test_moe_placement_follows_rule(shape, expected):
    num_layers, interval, no_moe, experts = shape
    stack = Transformer(config(num_layers=num_layers, expert_interval=interval,
                               no_moe_layer_num=no_moe, num_experts=experts))
    found = {layer.layer_number: layer.num_experts for layer in stack.layers if layer.is_moe}
    assert found == expected
    for layer in stack.layers:
        assert isinstance(layer.mlp, MoELayer) == (layer.layer_number in expected)
        if layer.is_moe:
            assert layer.mlp.gate_weight.shape == (expected[layer.layer_number], 8)
    assert [layer.layer_number for layer in stack.layers] == list(range(1, num_layers + 1))


def assert_std(t: torch.Tensor, expected: float, name: str) -> None:
    got = t.float().std().item()
    assert abs(got - expected) < 0.03 * expected, f"{name}: std {got:.5f}, expected {expected:.5f}"
    assert abs(t.float().mean().item()) < 0.03 * expected, name


def test_megatron_init_statistics():
    std, layers = 0.02, 8
    cfg = config(num_layers=layers, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
                 padded_vocab_size=1024, max_position_embeddings=512, init_method_std=std)
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, 1)
    scaled = std / math.sqrt(2 * layers)
    assert_std(layer.self_attention.query_key_value.weight, std, "qkv")
    assert_std(layer.mlp.dense_h_to_4h.weight, std, "h_to_4h")
    assert_std(layer.self_attention.dense.weight, scaled, "attention dense")
    assert_std(layer.mlp.dense_4h_to_h.weight, scaled, "4h_to_h")
    for name, p in layer.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    emb = Embedding(cfg)
    assert_std(emb.word_embeddings.weight, std, "word embeddings")
    assert_std(emb.position_embeddings.weight, std, "position embeddings")


def test_moe_layer_gets_megatron_init_stds():
    std, layers = 0.02, 8
    moe = MoEConfig(router="switch", ffn_hidden_size=512)
    cfg = config(num_layers=layers, hidden_size=256, num_attention_heads=4, init_method_std=std,
                 num_experts=(4,), expert_interval=1, moe=moe)
    torch.manual_seed(0)
    layer = TransformerLayer(cfg, 1)
    assert layer.is_moe and layer.num_experts == 4
    w1 = [p for n, p in layer.mlp.named_parameters() if n.endswith("w1")]
    w2 = [p for n, p in layer.mlp.named_parameters() if n.endswith("w2")]
    assert len(w1) == len(w2) == 1, [n for n, _ in layer.mlp.named_parameters()]
    assert_std(w1[0], std, "expert w1")
    assert_std(w2[0], std / math.sqrt(2 * layers), "expert w2")


def test_aux_loss_is_sum_over_moe_layers_in_layer_order():
    cfg = config(num_layers=4, expert_interval=1, no_moe_layer_num=1, num_experts=(2, 3, 4),
                 moe=MoEConfig(router="switch", ffn_hidden_size=4, aux_loss_coeff=0.1,
                               z_loss_coeff=0.01))
    torch.manual_seed(0)
    stack = Transformer(cfg)
    seen = []
    for layer in stack.layers:
        if layer.is_moe:
            layer.mlp.register_forward_hook(lambda m, args, out: seen.append(out))
    out = stack(torch.randn(2, 5, 8), torch.randint(0, 32, (2, 5)))
    assert len(seen) == 3 and [s.stats for s in seen] == out.stats
    assert [s.num_experts for s in out.stats] == [2, 3, 4]
    assert [s.layer_number for s in out.stats] == [2, 3, 4]
    expected = seen[0].aux_loss + seen[1].aux_loss + seen[2].aux_loss
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    assert out.aux_loss.item() > 0


def test_dense_layer_output_and_shape():
    stack = Transformer(config(num_experts=(1,)))
    x = torch.randn(3, 6, 8)
    out = stack(x)
    assert out.hidden_states.shape == x.shape and out.stats == []
    assert out.aux_loss.item() == 0.0
