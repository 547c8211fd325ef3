"""Global gradient norm and clipping used when we clip instead of DeepSpeed (one process here;
the expert-parallel sum is tested end to end in tests/test_pretrain_gpt.py)."""

import torch
from torch import nn

from megatron.expert_groups import clip_gradients_, global_grad_norm


def model_with_grads():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(3, 2))
    m[2].bias.requires_grad_(False)                     # a parameter without a gradient
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return m


def test_norm_is_fp32_over_every_gradient():
    m = model_with_grads()
    want = torch.sqrt(sum(p.grad.double().square().sum() for p in m.parameters()
                          if p.grad is not None))
    got = global_grad_norm(m, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_clip_follows_deepspeeds_rule():
    for max_norm in (0.5, 1e6):
        m = model_with_grads()
        before = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
        norm = global_grad_norm(m, None)
        clip_gradients_(m, max_norm, norm)
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
        for p, g in zip(m.parameters(), before):
            if g is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, (g.float() * coef).to(g.dtype), rtol=1e-2,
                                           atol=0)
