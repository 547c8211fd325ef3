"""MoELayer vs a slow per-token fp32 reference: outputs and every gradient, all routers.

The reference takes the integer decisions (which experts, which kept) from the layer's router,
checks them against the routing rules it recomputes from its own per-token softmax, recomputes
every combine weight itself, and evaluates each kept expert MLP per token.
"""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from megatron.config import MoEConfig
from megatron.model.mlp import MLP
from megatron.model.mlp_gating import RoutingDecision, route
from megatron.model.moe import MoELayer, MoEOutput, MoEStats, compute_stats
from megatron.model.moe.dispatch import make_plan
from megatron.model.moe.experts import grouped_mm_available
from megatron.model.moe.reference import use_reference_experts
from megatron.model.moe.stats import interpolated_median
from tests.helpers import child_env
from tests.model.gelu_reference import FORMS, ref_gelu

B, S, D, E, FH, V = 2, 12, 16, 6, 8, 50
T = B * S


def _grouped_cpu_ok() -> bool:
    if not grouped_mm_available():
        return False
    try:
        torch._grouped_mm(torch.randn(2, 16), torch.randn(1, 16, 8),
                          offs=torch.tensor([2], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


IMPLS = ["loop"] + (["grouped"] if _grouped_cpu_ok() else [])


def make_layer(router="threshold", drop_tokens=True, sync_free=False, impl="loop", seed=0,
               num_experts=E, activation="gelu_tanh", **kw) -> MoELayer:
    """impl "loop": the experts as the per-expert reference loop (reference.py); any other:
    the backend's (config.backend, default auto: torch on CPU)."""
    fields = dict(router=router, ffn_hidden_size=FH, threshold=0.7, topk=2,
                  train_capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=2,
                  drop_tokens=drop_tokens, sync_free=sync_free,
                  vocab_size=V, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    fields.update(kw)
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**fields), D, num_experts, init_std=0.5, output_init_std=0.3,
                     layer_number=3, dense_ffn_hidden_size=4 * D, activation=activation)
    if impl == "loop":
        use_reference_experts(layer)
    if layer.experts.b1 is not None:
        with torch.no_grad():  # non-zero biases so gradients and outputs see them
            layer.experts.b1.normal_(0, 0.1)
            layer.experts.b2.normal_(0, 0.1)
    return layer


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, D, generator=g)
    ids = torch.randint(0, V, (B, S), generator=g)
    return x, ids


def params(layer: MoELayer):
    ex = layer.experts
    return [p for p in (layer.gate_weight, ex.w1, ex.b1, ex.w2, ex.b2) if p is not None]


# ----------------------------------------------------------------------------- reference

def check_decision_rules(layer: MoELayer, d: RoutingDecision, probs_TE, ids_T) -> None:
    """The integer decisions obey the router's definition (recomputed per token)."""
    cfg = layer.config
    for t in range(T):
        n = int(d.wanted_TK[t].sum())
        assert bool(d.wanted_TK[t, :n].all()), "wanted slots are a prefix"
        chosen = d.experts_TK[t, :n].tolist()
        if cfg.router == "hash":
            assert chosen == [int(layer.hash_table[ids_T[t]])]
            continue
        p = probs_TE[t]
        if cfg.router == "threshold":
            order = sorted(range(E), key=lambda e: -float(p[e]))
            mass, want = 0.0, []
            for e in order:
                want.append(e)
                mass += float(p[e])
                if mass >= cfg.threshold:
                    break
            assert chosen == want, (t, chosen, want)
        elif cfg.router == "switch":
            assert chosen == [int(p.argmax())]
        elif cfg.router == "topk":
            assert n == cfg.topk and chosen[0] == int(p.argmax())
            if not layer.training:
                assert chosen == p.topk(cfg.topk).indices.tolist()
    # Capacity: kept is a subset of wanted, at most C per expert, and a wanted pair is only
    # dropped when its expert is full.
    assert not bool((d.kept_TK & ~d.wanted_TK).any())
    load = torch.zeros(E, dtype=torch.int64).index_add_(
        0, d.experts_TK[d.kept_TK], torch.ones(int(d.kept_TK.sum()), dtype=torch.int64))
    assert torch.equal(load, d.tokens_per_expert_E)
    C = d.capacity
    if C is None:
        assert torch.equal(d.kept_TK, d.wanted_TK)
    else:
        assert int(load.max()) <= C
        dropped = d.wanted_TK & ~d.kept_TK
        assert all(int(load[e]) == C for e in d.experts_TK[dropped].tolist())


def reference_forward(layer: MoELayer, x_BSD, ids_BS, d: RoutingDecision) -> torch.Tensor:
    """Per token: own fp32 softmax, then sum over kept pairs of weight * expert MLP(x_t) (the
    layer's GeLU form, written out in gelu_reference.py)."""
    ex = layer.experts
    x_TD = x_BSD.reshape(T, D)
    probs = []
    out = []
    for t in range(T):
        xt = x_TD[t].float()
        p = None
        if layer.gate_weight is not None:
            logits = layer.gate_weight.float() @ xt
            p = torch.softmax(logits, dim=0)
            probs.append(p.detach())
        acc = torch.zeros(D)
        for k in range(d.experts_TK.shape[1]):
            if not bool(d.kept_TK[t, k]):
                assert float(d.weights_TK[t, k].detach()) == 0.0
                continue
            e = int(d.experts_TK[t, k])
            w = p[e] if p is not None else torch.tensor(1.0)
            assert math.isclose(float(w.detach()), float(d.weights_TK[t, k].detach()),
                                rel_tol=1e-6, abs_tol=1e-7)
            b1, b2 = (0.0, 0.0) if ex.b1 is None else (ex.b1[e], ex.b2[e])
            h = ref_gelu(xt @ ex.w1[e] + b1, ex.activation)
            acc = acc + w * (h @ ex.w2[e] + b2)
        out.append(acc)
    check_decision_rules(layer, d, torch.stack(probs) if probs else None, ids_BS.reshape(T))
    return torch.stack(out).reshape(B, S, D)


def run_and_compare(layer: MoELayer, seed=5):
    """Layer vs reference: outputs and grads of x and every parameter (atol 1e-5)."""
    x, ids = inputs()
    x.requires_grad_(True)
    grad_out = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(seed)  # the train-mode top-k noise comes from torch's global generator
    decision = layer.decide(x.reshape(T, D), ids.reshape(T))
    torch.manual_seed(seed)
    out = layer(x, ids)
    assert isinstance(out, MoEOutput) and out.output.shape == x.shape
    wrt = [x] + params(layer)
    got = torch.autograd.grad((out.output * grad_out).sum(), wrt)
    ref = reference_forward(layer, x, ids, decision)
    want = torch.autograd.grad((ref * grad_out).sum(), wrt)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, p in layer.named_parameters() if any(p is q for q in wrt)]
    for name, g, r in zip(names, got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return out, decision


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("router", ["threshold", "topk", "switch", "hash"])
def test_layer_matches_per_token_reference(router, drop_tokens, sync_free, impl):
    layer = make_layer(router, drop_tokens, sync_free, impl).eval()
    out, d = run_and_compare(layer)
    if drop_tokens and router != "hash":
        assert bool((d.wanted_TK & ~d.kept_TK).any()), "test should exercise capacity drops"
    expected_aux = 0.0 if router == "hash" else 0.01 * d.aux_loss + 0.001 * d.z_loss
    torch.testing.assert_close(out.aux_loss, torch.as_tensor(expected_aux, dtype=torch.float32))
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.dim() == 0


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_topk_train_mode_with_noise(drop_tokens, sync_free):
    layer = make_layer("topk", drop_tokens, sync_free, topk=3).train()
    _, d1 = run_and_compare(layer, seed=7)
    torch.manual_seed(7)
    x, ids = inputs()
    d2 = layer.decide(x.reshape(T, D), ids.reshape(T))
    assert torch.equal(d1.experts_TK, d2.experts_TK)   # fixed seed, same noisy choices
    eval_d = layer.eval().decide(x.reshape(T, D), None)
    assert not torch.equal(d1.experts_TK, eval_d.experts_TK), "noise should change choices"


@pytest.mark.parametrize("router", ["threshold", "hash"])
def test_exact_and_sync_free_identical(router):
    x, ids = inputs()
    results = []
    for sync_free in (False, True):
        layer = make_layer(router, True, sync_free).eval()
        xx = x.clone().requires_grad_(True)
        out = layer(xx, ids)
        grads = torch.autograd.grad(out.output.square().sum(), [xx] + params(layer))
        results.append((out.output,) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sync_free_plan_is_padded_and_masked():
    layer = make_layer("threshold", True, True).eval()
    x, _ = inputs()
    d = layer.decide(x.reshape(T, D), None)
    plan = make_plan(d, sync_free=True)
    K = d.experts_TK.shape[1]
    assert plan.num_rows == min(T * K, E * d.capacity)
    kept = int(d.kept_TK.sum())
    assert int(plan.valid_P.sum()) == kept and bool(plan.valid_P[:kept].all())
    assert torch.equal(plan.token_idx_P[kept:], torch.arange(kept, plan.num_rows) % T)
    assert torch.all(plan.weight_P[kept:] == 0)
    assert plan.group_offsets_E.dtype == torch.int32
    assert torch.equal(plan.group_offsets_E.long(), torch.cumsum(d.tokens_per_expert_E, 0))
    exact = make_plan(d, sync_free=False)
    assert exact.valid_P is None and exact.num_rows == kept
    assert torch.equal(exact.token_idx_P, plan.token_idx_P[:kept])


@pytest.mark.skipif("grouped" not in IMPLS, reason="torch._grouped_mm does not run on CPU here")
def test_sync_free_grouped_forward_makes_no_host_reads(monkeypatch):
    """CPU proxy for 'no host sync': no Python-level tensor reads in route/plan/experts/stats."""
    layer = make_layer("threshold", True, True, "grouped").eval()
    x, _ = inputs()

    def boom(*_a, **_k):
        raise AssertionError("host read in the sync-free path")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = layer(x)
    monkeypatch.undo()
    assert torch.isfinite(out.output).all()


@pytest.mark.skipif("grouped" not in IMPLS, reason="torch._grouped_mm does not run on CPU here")
@pytest.mark.parametrize("sync_free", [False, True])
def test_grouped_equals_loop(sync_free):
    x, _ = inputs()
    results = []
    for impl in ("loop", "grouped"):
        layer = make_layer("threshold", False, sync_free, impl).eval()
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        grads = torch.autograd.grad(out.output.square().sum(), [xx] + params(layer))
        results.append((out.output,) + grads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_experts_with_zero_tokens():
    """Hash routing of ids that map to two experts: the others get nothing, grads exactly 0."""
    layer = make_layer("hash", drop_tokens=False).eval()
    table = layer.hash_table
    ids_pool = [i for i in range(V) if int(table[i]) in (1, 4)]
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor(ids_pool)[torch.randint(0, len(ids_pool), (B, S), generator=g)]
    x, _ = inputs()
    x.requires_grad_(True)
    out = layer(x, ids)
    load = out.stats.expert_load_E
    assert load.sum() == T and set(torch.nonzero(load).flatten().tolist()) <= {1, 4}
    out.output.sum().backward()
    ex = layer.experts
    for e in range(E):
        if load[e] == 0:
            for p in (ex.w1, ex.b1, ex.w2, ex.b2):
                assert torch.all(p.grad[e] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", FORMS)
def test_every_gelu_form_matches_per_token_reference(form, impl):
    layer = make_layer("threshold", True, False, impl, activation=form).eval()
    assert layer.experts.activation == form
    run_and_compare(layer)


def test_default_layer_is_megatrons_tanh_gelu():
    """Built without a form, the experts use the original's default (fused tanh GeLU)."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(ffn_hidden_size=FH), D, E, 0.5, 0.3, layer_number=1)
    assert layer.experts.activation == "gelu_tanh"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("sync_free", [False, True])
def test_one_expert_equals_dense_mlp(sync_free, form):
    layer = make_layer("threshold", drop_tokens=False, sync_free=sync_free, num_experts=1,
                       activation=form).eval()
    ex = layer.experts
    mlp = MLP(D, FH, 0.02, 0.02, activation=form)
    with torch.no_grad():
        mlp.dense_h_to_4h.weight.copy_(ex.w1[0].T)
        mlp.dense_h_to_4h.bias.copy_(ex.b1[0])
        mlp.dense_4h_to_h.weight.copy_(ex.w2[0].T)
        mlp.dense_4h_to_h.bias.copy_(ex.b2[0])
    x, _ = inputs()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_moe, y_mlp = layer(x1).output, mlp(x2)
    torch.testing.assert_close(y_moe, y_mlp, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(x)
    (y_moe * g).sum().backward()
    (y_mlp * g).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(ex.w1.grad[0], mlp.dense_h_to_4h.weight.grad.T, **tol)
    torch.testing.assert_close(ex.b1.grad[0], mlp.dense_h_to_4h.bias.grad, **tol)
    torch.testing.assert_close(ex.w2.grad[0], mlp.dense_4h_to_h.weight.grad.T, **tol)
    torch.testing.assert_close(ex.b2.grad[0], mlp.dense_4h_to_h.bias.grad, **tol)
    assert torch.all(layer.gate_weight.grad == 0)   # softmax over one expert is constant 1


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_low_threshold_equals_switch(drop_tokens):
    x, _ = inputs()
    switch = make_layer("switch", drop_tokens).eval()
    top1 = torch.softmax(switch.router_logits(x.reshape(T, D)), -1).max(-1).values
    threshold = make_layer("threshold", drop_tokens, threshold=float(top1.min().detach()) * 0.99).eval()
    threshold.load_state_dict(switch.state_dict())
    results = []
    for layer in (switch, threshold):
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        grads = torch.autograd.grad(out.output.square().sum(), [xx] + params(layer))
        results.append((out.output,) + grads)
        assert float(out.stats.wanted_per_token) == 1.0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cast_after", [False, True])
def test_bf16_params_with_fp32_router(cast_after):
    if cast_after:  # DeepSpeed-style: build fp32, then cast the whole module
        layer = make_layer("threshold").to(torch.bfloat16)
    else:
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(ffn_hidden_size=FH, threshold=0.7), D, E, 0.5, 0.3,
                         layer_number=1, params_dtype=torch.bfloat16)
        assert layer.gate_weight.dtype == torch.float32
    assert layer.experts.w1.dtype == torch.bfloat16
    x = torch.randn(B, S, D, dtype=torch.bfloat16, requires_grad=True)
    assert layer.router_logits(x.reshape(T, D)).dtype == torch.float32
    out = layer(x)
    assert out.output.dtype == torch.bfloat16 and out.output.shape == x.shape
    assert out.aux_loss.dtype == torch.float32
    (out.output.float().sum() + out.aux_loss).backward()
    assert x.grad.dtype == torch.bfloat16 and layer.gate_weight.grad is not None
    assert torch.isfinite(layer.experts.w1.grad.float()).all()


def test_hash_layer_has_no_gate_and_needs_token_ids():
    layer = make_layer("hash")
    assert layer.gate_weight is None and "hash_table" in dict(layer.named_buffers())
    assert not any("gate" in n for n, _ in layer.named_parameters())
    assert not layer.hash_table.requires_grad
    with pytest.raises(ValueError, match="token ids"):
        layer(torch.randn(B, S, D))


def test_stats_match_hand_computation():
    # 4 tokens, K = 2, E = 3. Pairs: t0 -> (0, 1) both kept; t1 -> (0) kept; t2 -> (1, 2),
    # 2 dropped; t3 -> (0) dropped.
    d = RoutingDecision(
        experts_TK=torch.tensor([[0, 1], [0, 2], [1, 2], [0, 1]]),
        weights_TK=torch.tensor([[0.6, 0.3], [0.9, 0.0], [0.5, 0.0], [0.0, 0.0]]),
        wanted_TK=torch.tensor([[True, True], [True, False], [True, True], [True, False]]),
        kept_TK=torch.tensor([[True, True], [True, False], [True, False], [False, False]]),
        probs_TK=torch.tensor([[0.6, 0.3], [0.9, 0.05], [0.5, 0.4], [0.7, 0.2]]),
        tokens_per_expert_E=torch.tensor([2, 2, 0]),
        aux_loss=torch.tensor(1.0), z_loss=torch.tensor(2.0),
        top1_prob_T=torch.tensor([0.6, 0.9, 0.5, 0.7]), capacity=2)
    s = compute_stats(d, layer_number=5, topk=2, expert_ffn_hidden_size=8,
                      dense_ffn_hidden_size=32)
    assert isinstance(s, MoEStats) and s.layer_number == 5 and s.num_experts == 3
    torch.testing.assert_close(s.wanted_per_token, torch.tensor(6 / 4))
    torch.testing.assert_close(s.used_per_token, torch.tensor(4 / 4))
    torch.testing.assert_close(s.dropped_fraction, torch.tensor(2 / 6))
    assert torch.equal(s.expert_load_E, torch.tensor([2, 2, 0]))
    assert s.expert_load_E.dtype == torch.int64
    # sorted top-1: 0.5, 0.6, 0.7, 0.9; the median interpolates 0.6 and 0.7
    torch.testing.assert_close(s.top1_prob_median, torch.tensor(0.65))
    for n in (1, 2, 5, 8):                          # odd and even sizes, as torch.quantile
        v = torch.rand(n, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(interpolated_median(v), torch.quantile(v, 0.5))
    torch.testing.assert_close(s.flops_vs_topk, torch.tensor(4 / (4 * 2)))
    torch.testing.assert_close(s.flops_vs_dense, torch.tensor(4 * 8 / (4 * 32)))


def test_layer_stats_are_detached_and_consistent():
    layer = make_layer("threshold").eval()
    x, _ = inputs()
    x.requires_grad_(True)
    out = layer(x)
    d = layer.decide(x.reshape(T, D), None)
    s = out.stats
    for name in ("wanted_per_token", "used_per_token", "dropped_fraction", "expert_load_E",
                 "top1_prob_median", "flops_vs_topk", "flops_vs_dense"):
        assert not getattr(s, name).requires_grad, name
    assert torch.equal(s.expert_load_E, d.tokens_per_expert_E)
    torch.testing.assert_close(s.used_per_token, d.kept_TK.sum().float() / T)
    torch.testing.assert_close(s.flops_vs_dense, d.kept_TK.sum().float() * FH / (T * 4 * D))
    assert s.top1_prob_median.dtype == torch.float32 and s.top1_prob_median.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sync_free", [False, True])
def test_cuda_grouped_bf16_close_to_cpu_fp32(sync_free):
    """CUDA (grouped GEMM in bf16) vs the CPU fp32 loop path: same decisions, close values."""
    cpu = make_layer("threshold", True, sync_free).eval()
    gpu = make_layer("threshold", True, sync_free, impl="auto").eval().cuda()
    x, _ = inputs()
    outs, grads = [], []
    for layer, xx in ((cpu, x.clone()), (gpu, x.cuda())):
        xx.requires_grad_(True)
        out = layer(xx)
        outs.append(out)
        grads.append(torch.autograd.grad(out.output.sum(), [xx] + params(layer)))
    assert "reference" not in str(gpu.backend)        # the grouped GEMMs, not the loop
    assert torch.equal(outs[0].stats.expert_load_E, outs[1].stats.expert_load_E.cpu())
    torch.testing.assert_close(outs[1].output.cpu(), outs[0].output, atol=3e-2, rtol=3e-2)
    for g_cpu, g_gpu in zip(*grads):
        torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("router", ["threshold", "topk", "hash"])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("sync_free", [False, True])
def test_plan_matches_per_expert_reference(router, drop_tokens, sync_free):
    """Rows: expert-major, token order inside an expert; bags: each token's rows, in slot order."""
    layer = make_layer(router, drop_tokens, sync_free).eval()
    x, ids = inputs()
    d = layer.decide(x.reshape(T, D), ids.reshape(T))
    plan = make_plan(d, sync_free=sync_free)
    pairs = [(e, t, k) for t in range(T) for k in range(d.experts_TK.shape[1])
             for e in [int(d.experts_TK[t, k])] if bool(d.kept_TK[t, k])]
    pairs.sort(key=lambda p: (p[0], p[1]))                 # expert, then token
    kept = len(pairs)
    assert plan.token_idx_P[:kept].tolist() == [t for _, t, _ in pairs]
    assert plan.weight_P[:kept].tolist() == [float(d.weights_TK[t, k].detach()) for _, t, k in pairs]
    row_of = {(t, k): p for p, (_, t, k) in enumerate(pairs)}
    starts = plan.bag_offsets_G.tolist()
    ends = starts[1:] + [plan.bag_rows_J.numel()]
    for t in range(T):
        want = [row_of[(t, k)] for k in range(d.experts_TK.shape[1]) if (t, k) in row_of]
        assert plan.bag_rows_J[starts[t]:ends[t]].tolist() == want
    assert starts[T - 1] + sum(1 for p in pairs if p[1] == T - 1) == (ends[T - 1])
    assert all(s >= kept for s in starts[T:])              # scratch bags hold no kept pair


@pytest.mark.parametrize("sync_free", [False, True])
def test_bag_combine_and_dispatch_equal_index_add(sync_free):
    """The token-bag combine / dispatch backward equal the scatter-add formulation."""
    import dataclasses
    from megatron.model.moe.dispatch import combine, dispatch
    layer = make_layer("threshold", True, sync_free).eval()
    x, _ = inputs()
    d = layer.decide(x.reshape(T, D), None)
    plan = make_plan(d, sync_free=sync_free)
    plain = dataclasses.replace(plan, bag_rows_J=None, bag_offsets_G=None)
    g = torch.Generator().manual_seed(3)
    y = torch.randn(plan.num_rows, D, generator=g)
    if plan.valid_P is not None:
        y = torch.where(plan.valid_P[:, None], y, 0.0)
    grad_out = torch.randn(T, D, generator=g)
    results = []
    for pl in (plan, plain):
        xx = x.reshape(T, D).clone().requires_grad_(True)
        yy = y.clone().requires_grad_(True)
        w = d.weights_TK.detach().clone().requires_grad_(True)
        pl = dataclasses.replace(pl, weight_P=make_plan(
            dataclasses.replace(d, weights_TK=w), sync_free=sync_free).weight_P)
        out = (combine(yy, pl, torch.float32) * grad_out).sum() + \
            (dispatch(xx, pl) * y).sum()
        results.append((out,) + torch.autograd.grad(out, [xx, yy, w]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- compiled routing

@pytest.fixture
def compiled_routing(request, monkeypatch):
    """compile_routing with torch.compile's `backend` (aot_eager: the traced graph and its
    autograd, fast; inductor: generated kernels); a fresh compile cache per test."""
    from megatron.model.moe import layer as layer_module

    torch._dynamo.reset()
    compiled = torch.compile(layer_module.routing_step, fullgraph=True, dynamic=False,
                             backend=request.param)
    monkeypatch.setattr(layer_module, "COMPILED_ROUTING_STEPS", {"default": compiled})
    yield request.param
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled_routing", ["aot_eager"], indirect=True)
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("router", ["threshold", "topk", "switch", "hash"])
def test_compiled_routing_matches_reference(compiled_routing, router, sync_free):
    """Traced routing (fullgraph: no graph break, no host read) still equals the per-token
    reference, in training mode (top-k noise drawn eagerly: the same choices as uncompiled)."""
    layer = make_layer(router, True, sync_free, compile_routing=True, topk=3).train()
    out, d = run_and_compare(layer, seed=7)
    plain = make_layer(router, True, sync_free, topk=3).train()
    x, ids = inputs()
    torch.manual_seed(7)
    want = plain(x, ids)
    torch.testing.assert_close(out.output, want.output, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.aux_loss, want.aux_loss, atol=1e-7, rtol=1e-6)
    assert out.stats.layer_number == 3
    assert float(out.stats.used_per_token) == float(want.stats.used_per_token)


@pytest.mark.parametrize("compiled_routing", ["inductor"], indirect=True)
def test_inductor_compiled_routing_matches_reference(compiled_routing):
    layer = make_layer("threshold", True, False, compile_routing=True).train()
    run_and_compare(layer)


@pytest.mark.parametrize("compiled_routing", ["aot_eager"], indirect=True)
def test_routing_cuda_graphs_off_cuda_compile_plainly(compiled_routing):
    """routing_cuda_graphs only applies to CUDA tensors: on CPU the plainly compiled step runs
    (the fixture's), with the same results as without the option."""
    from megatron.model.moe import layer as layer_module

    layer = make_layer("threshold", True, False, routing_cuda_graphs=True,
                       compile_routing=True).train()
    run_and_compare(layer)
    assert set(layer_module.COMPILED_ROUTING_STEPS) == {"default"}


def test_backend_is_resolved_once_and_shown(monkeypatch):
    """The layer resolves --moe-backend at construction (and when moved), never per call;
    print(layer) names what runs. auto on CPU is the torch backend."""
    from megatron.model.moe import layer as layer_module
    from megatron.model.moe.backend import TORCH

    layer = make_layer("threshold", True, False, impl="grouped").train()
    assert layer.backend.name == "torch"
    assert "backend=torch (router logits: torch_router_logits, threshold slots: " \
           "torch_threshold_slots, capacity: capacity_with_rows, experts: " \
           "torch_experts_untraced)" in str(layer)   # (untraced off CUDA)
    calls = []
    monkeypatch.setattr(layer_module, "resolve_backend",
                        lambda *a: calls.append(a) or TORCH)
    x, _ = inputs()
    for _ in range(3):
        layer(x).output.sum().backward()
    assert calls == []
    use_reference_experts(layer)
    assert "experts: reference_moe_experts" in str(layer)
    layer.to(torch.float32)              # a move resolves again (here: back to the torch one)
    assert len(calls) == 1 and calls[0][0] == "auto"


def test_routing_cuda_graphs_needs_compile_routing():
    with pytest.raises(ValueError, match="routing_cuda_graphs needs compile_routing"):
        make_layer("threshold", True, False, routing_cuda_graphs=True)


STARTUP_PROBE = """
import sys, torch
from megatron.config import MoEConfig
from megatron.model.moe import MoELayer
import megatron.training
layer = MoELayer(MoEConfig(router="threshold", ffn_hidden_size=8), 16, 4, 0.02, 0.02, 1)
layer(torch.randn(6, 16)).output.sum().backward()
print("torch._dynamo" in sys.modules)
"""


def test_eager_moe_runs_do_not_import_dynamo():
    """torch._dynamo costs seconds to import (every run, every test subprocess): building and
    running an MoE layer eagerly, and importing the training loop, must not pull it in."""
    proc = subprocess.run([sys.executable, "-c", STARTUP_PROBE], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False"], proc.stdout + proc.stderr[-2000:]


def test_a_loss_with_coefficient_zero_is_left_out():
    """aux_loss = aux coeff * balance loss + z coeff * z-loss, and a 0 coefficient drops its
    term: no NaN from an infinite z-loss that does not count, no gradient through it."""
    layer = make_layer("threshold").train()
    x, _ = inputs()
    decision = layer.decide(x.reshape(-1, x.shape[-1]), None)
    for aux_c, z_c in ((0.01, 0.0), (0.0, 0.001), (0.01, 0.001), (0.0, 0.0)):
        layer.config = dataclasses.replace(layer.config, aux_loss_coeff=aux_c, z_loss_coeff=z_c)
        want = aux_c * decision.aux_loss + z_c * decision.z_loss
        torch.testing.assert_close(layer.weighted_losses(decision), want, rtol=0, atol=0)
    layer.config = dataclasses.replace(layer.config, aux_loss_coeff=0.01, z_loss_coeff=0.0)
    infinite = dataclasses.replace(decision, z_loss=torch.tensor(float("inf")))
    assert torch.isfinite(layer.weighted_losses(infinite))
    logits = torch.randn(6, 4, requires_grad=True)
    d = route(logits, layer.config, 4, training=True)
    layer.weighted_losses(d).backward()
    balance_only = torch.autograd.grad(0.01 * route(logits, layer.config, 4,
                                                    training=True).aux_loss, logits)[0]
    torch.testing.assert_close(logits.grad, balance_only, rtol=0, atol=0)
