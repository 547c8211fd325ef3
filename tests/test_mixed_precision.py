"""MasterWeightAdamW (bf16 parameters, fp32 masters) against torch's AdamW on fp32 copies, on its
torch path (CPU); its Triton kernel path is tested in test_adamw_kernel.py."""

import copy

import pytest
import torch
from torch import nn

from megatron.mixed_precision import MasterWeightAdamW, cast_model_to_bf16, clip_coefficient


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.gate_weight = nn.Parameter(torch.randn(3, 6))
        self.unused = nn.Parameter(torch.randn(4))


def groups(model):
    decay = [model.lin.weight, model.gate_weight, model.unused]
    return [{"params": decay, "weight_decay": 0.1},
            {"params": [model.lin.bias], "weight_decay": 0.0}]


def loss_of(model, x):
    h = model.lin(x)
    return (h.float().square().sum() + (model.gate_weight.float() @ x.float().t()).sum())


def test_cast_keeps_the_router_fp32():
    model = Tiny()
    cast_model_to_bf16(model)
    assert model.lin.weight.dtype == model.lin.bias.dtype == torch.bfloat16
    assert model.gate_weight.dtype == torch.float32


def test_steps_equal_adamw_on_fp32_masters():
    torch.manual_seed(0)
    model = Tiny()
    cast_model_to_bf16(model)
    masters = {n: p.detach().float().clone().requires_grad_(True)
               for n, p in model.named_parameters()}
    opt = MasterWeightAdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    ref_model = Tiny()
    ref = torch.optim.AdamW(
        [{"params": [masters["lin.weight"], masters["gate_weight"], masters["unused"]],
          "weight_decay": 0.1}, {"params": [masters["lin.bias"]], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    del ref_model
    for step in range(4):
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(step)).bfloat16()
        opt.zero_grad()
        loss_of(model, x).backward()
        # the reference sees exactly the gradients the bf16 model produced, in fp32
        for n, p in model.named_parameters():
            masters[n].grad = None if p.grad is None else p.grad.float()
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 1e-2 / (step + 1)  # scheduler
        opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 1e-2 / (step + 1)
        opt.step()
        ref.step()
        for n, p in model.named_parameters():
            if p.dtype == torch.bfloat16:
                assert torch.equal(p, masters[n].detach().bfloat16()), n
            else:
                assert torch.equal(p, masters[n]), n
    assert torch.equal(model.unused.float(), masters["unused"])          # never had a grad
    inner = dict(zip([id(m) for ms in opt.masters for m in ms],
                     [m for ms in opt.masters for m in ms]))
    assert any(m.dtype == torch.float32 and not torch.equal(m.bfloat16().float(), m)
               for m in inner.values()), "masters carry more precision than the params"


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        m = Tiny()
        cast_model_to_bf16(m)
        return m, MasterWeightAdamW(groups(m), lr=1e-2, weight_decay=0.1)

    def step(model, opt, seed):
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(seed)).bfloat16()
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()

    a, opt_a = build()
    step(a, opt_a, 0)
    state = copy.deepcopy(opt_a.state_dict())      # (state tensors are live references)
    params = {n: p.detach().clone() for n, p in a.named_parameters()}
    step(a, opt_a, 1)
    b, opt_b = build()
    with torch.no_grad():
        for n, p in b.named_parameters():
            p.copy_(params[n])
    opt_b.load_state_dict(state)
    step(b, opt_b, 1)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_refresh_and_foreign_state():
    model = Tiny()
    cast_model_to_bf16(model)
    opt = MasterWeightAdamW(groups(model), lr=1e-2)
    with torch.no_grad():
        model.lin.weight.fill_(0.5)
    opt.refresh_fp32_params()
    assert torch.equal(opt.masters[0][0], torch.full((5, 6), 0.5))
    with pytest.raises(ValueError, match="--no-load-optim"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_clip_at_step_is_clip_gradients_then_step_on_the_torch_path():
    """The torch path scales the gradients in place at the next step exactly as the training
    loop's clip_gradients_ did (bit for bit), once: the step after is not clipped."""
    from megatron.expert_groups import clip_gradients_, global_grad_norm

    def build():
        torch.manual_seed(0)
        m = Tiny()
        cast_model_to_bf16(m)
        return m, MasterWeightAdamW(groups(m), lr=1e-2, weight_decay=0.1)

    a, opt_a = build()
    b, opt_b = build()
    assert opt_a.kernel is None                     # CPU without the interpreter: torch
    for step in range(3):
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(step)).bfloat16()
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            loss_of(model, x).backward()
        norm = global_grad_norm(a, None)
        assert torch.equal(norm, global_grad_norm(b, None))
        if step < 2:                                # max_norm below the norm: clipping acts
            clip_gradients_(a, 0.3 * norm.item(), norm)
            opt_b.clip_at_step(0.3 * norm.item(), norm)
            assert not torch.equal(a.lin.weight.grad, b.lin.weight.grad)   # not yet
        opt_a.step()
        opt_b.step()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (step, n)


def test_clip_coefficient_is_deepspeeds_rule():
    norm = torch.tensor([0.5, 2.0, 4.0])
    expected = torch.tensor([min(1.0, 1.0 / (n + 1e-6)) for n in norm.tolist()])
    torch.testing.assert_close(clip_coefficient(1.0, norm), expected, rtol=1e-7, atol=0)


def test_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    model = Tiny()
    cast_model_to_bf16(model)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert MasterWeightAdamW(groups(model), lr=1e-2).kernel is None
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        MasterWeightAdamW(groups(model), lr=1e-2, kernel=True)
    model.lin.bias.data = model.lin.bias.data.half()
    with pytest.raises(ValueError, match="bf16 and fp32 parameters only"):
        MasterWeightAdamW(groups(model), lr=1e-2, kernel=True)
