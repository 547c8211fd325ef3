"""Optimizer parameter groups (weight decay, MoE expert groups) and build_optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron.config import GPTConfig, MoEConfig, OptimizerConfig
from megatron.model import GPTModel
from megatron.model.moe import MoELayer
from megatron.optimizer import EXPERT_GROUP_NAME, build_optimizer, param_groups


def moe_gpt() -> GPTModel:
    """Layers 2 and 4 of 4 are MoE (threshold router, experts with biases)."""
    cfg = GPTConfig(num_layers=4, hidden_size=16, num_attention_heads=2, padded_vocab_size=64,
                    max_position_embeddings=8, ffn_hidden_size=24, num_experts=(4,),
                    expert_interval=2, moe=MoEConfig(ffn_hidden_size=8))
    return GPTModel(cfg)


def expected_role(name: str, expert_groups: bool):
    """(expert group?, decays?) from the parameter's name, written independently of the code."""
    leaf = name.split(".")[-1]
    is_expert = ".mlp.experts." in name
    no_decay = leaf in ("bias", "b1", "b2") or "layernorm" in name
    return (is_expert and expert_groups, not no_decay)


@pytest.mark.parametrize("expert_groups", [False, True])
def test_each_parameter_once_in_the_right_group(expert_groups):
    model = moe_gpt()
    groups = param_groups(model, weight_decay=0.1, create_moe_param_group=expert_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names)                # each trainable parameter exactly once
    for g in groups:
        assert g["params"], g["name"]                   # no empty group
        for p in g["params"]:
            is_expert, decays = expected_role(names[id(p)], expert_groups)
            assert g["weight_decay"] == (0.1 if decays else 0.0), names[id(p)]
            assert g.get("moe", False) == is_expert, names[id(p)]
            assert g["name"] == (EXPERT_GROUP_NAME if is_expert
                                 else "decay" if decays else "no_decay")
    n_groups = 4 if expert_groups else 2
    assert len(groups) == n_groups


def test_router_and_embeddings_decay_and_stay_shared():
    model = moe_gpt()
    groups = param_groups(model, 0.1, create_moe_param_group=True)
    decay = next(g for g in groups if g["name"] == "decay")
    gates = [m.gate_weight for m in model.modules() if isinstance(m, MoELayer)]
    assert len(gates) == 2
    for p in gates + [model.embedding.word_embeddings.weight]:
        assert any(p is q for q in decay["params"])
    # DeepSpeed's expert-parameter attributes are deliberately not set (megatron/optimizer.py).
    assert not any(hasattr(p, "allreduce") or hasattr(p, "group_name") for p in model.parameters())


def test_frozen_and_shared_parameters():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.LayerNorm(3), lin)    # `lin` twice: counted once
    model[1].weight.requires_grad_(False)
    groups = param_groups(model, 0.5)
    by_name = {g["name"]: g["params"] for g in groups}
    assert [p is lin.weight for p in by_name["decay"]] == [True]
    assert len(by_name["no_decay"]) == 2                # lin.bias and the LayerNorm bias


def test_build_optimizer_hyperparameters():
    model = moe_gpt()
    cfg = OptimizerConfig(lr=2e-4, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                          adam_eps=1e-6, create_moe_param_group=True)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 4
    for g in opt.param_groups:
        assert g["lr"] == 2e-4 and g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6
        assert g["weight_decay"] in (0.05, 0.0)
        assert g["foreach"] is True and not g["fused"]  # CPU parameters: foreach
    assert sum(g.get("moe", False) for g in opt.param_groups) == 2
    # One step runs and decoupled weight decay follows the group (no grads: decay only).
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            want = before[id(p)] * (1 - 2e-4 * g["weight_decay"])
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12)


def test_apex_requested_but_missing_falls_back(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_apex(name, *args, **kwargs):
        if name.startswith("apex"):
            raise ImportError("no apex here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_apex)
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(lr=1e-3), use_apex=True)
    assert isinstance(opt, torch.optim.AdamW)
