"""Routers against a slow reference written here with per-token Python loops.

The reference ranks experts with Python `sorted`, accumulates the threshold prefix sums one
expert at a time (Python float = fp64, each prefix rounded to np.float32, compared with t as
np.float32: the numerics the router documents), and applies capacity with one priority queue
per expert. Integer decisions must match exactly; weights, losses and gradients tightly.
"""

import heapq
import math

import numpy as np
import pytest
import torch

from megatron.config import MoEConfig
from megatron.model.mlp_gating import (
    RoutingDecision, apply_capacity, gumbel_noise_like, hash_route, load_balancing_loss,
    make_hash_table, route, router_z_loss, switch_route, threshold_route, topk_route)

SHAPES = [(T, E) for T in (1, 7, 64, 300) for E in (1, 2, 8, 64)]


# ----------------------------------------------------------------------------- reference

def ref_ranked(row_probs):
    """Experts by probability descending, ties to the lower index."""
    return sorted(range(len(row_probs)), key=lambda e: (-row_probs[e], e))


def ref_threshold_rows(probs, t, max_experts):
    """Per token: (experts in all K slots, number of wanted slots)."""
    E = len(probs[0]) if probs else 0
    K = E if max_experts is None else min(max_experts, E)
    rows = []
    for p in probs:
        ranked = ref_ranked(p)[:K]
        taken, before = 0, 0.0
        for e in ranked:
            if not np.float32(before) < np.float32(t):
                break
            taken += 1
            before += p[e]                       # fp64 accumulation, rounded when compared
        rows.append((ranked, taken))
    return rows


def ref_topk_rows(logits, probs, k, noise):
    rows = []
    for i, p in enumerate(probs):
        ranked = ref_ranked(p)
        if noise is None or k == 1:
            chosen = ranked[:k]
        else:
            noised = (logits[i].float() + noise[i].float()).tolist()
            rest = sorted((e for e in range(len(p)) if e != ranked[0]),
                          key=lambda e: (-noised[e], e))
            chosen = [ranked[0]] + rest[:k - 1]
        rows.append((chosen, k))
    return rows


def ref_capacity(rows, probs, E, C):
    """Set of kept (token, slot): per expert, pop by (slot, -prob, token) up to C."""
    queues = [[] for _ in range(E)]
    for t, (experts, taken) in enumerate(rows):
        for k in range(taken):
            heapq.heappush(queues[experts[k]], (k, -probs[t][experts[k]], t))
    kept = set()
    for q in queues:
        n = len(q) if C is None else min(C, len(q))
        for _ in range(n):
            k, _, t = heapq.heappop(q)
            kept.add((t, k))
    return kept


def ref_decision(logits, rows, C):
    """Everything the contract holds, from per-token loops; weights carry autograd."""
    T, E = logits.shape
    K = len(rows[0][0]) if rows else 0
    row_probs_t = [torch.softmax(logits[i].float(), dim=-1) for i in range(T)]
    probs = [p.tolist() for p in row_probs_t]
    kept = ref_capacity(rows, probs, E, C)
    zero = torch.zeros((), dtype=torch.float32)
    weights = torch.zeros(0, K)
    if T:
        weights = torch.stack([
            torch.where(torch.tensor([(t, k) in kept for k in range(K)]),
                        row_probs_t[t][torch.tensor(rows[t][0])], zero) for t in range(T)])
    counts = [0] * E
    for t, k in kept:
        counts[rows[t][0][k]] += 1
    firsts = [rows[t][0][0] for t in range(T)]
    mean_p = [sum(probs[t][e] for t in range(T)) / T for e in range(E)]
    frac = [firsts.count(e) / T for e in range(E)]
    aux = E * sum(mean_p[e] * frac[e] for e in range(E))
    z = 0.0
    for row in logits.double().tolist():
        m = max(row)
        z += (m + math.log(sum(math.exp(x - m) for x in row))) ** 2
    return dict(
        experts=[r[0] for r in rows],
        wanted=[[k < r[1] for k in range(K)] for r in rows],
        kept=[[(t, k) in kept for k in range(K)] for t in range(T)],
        weights=weights, probs=[[probs[t][e] for e in rows[t][0]] for t in range(T)],
        tokens_per_expert=counts, aux=aux, z=z / T, top1=[probs[t][firsts[t]] for t in range(T)])


def check_invariants(d: RoutingDecision, E: int):
    T, K = d.experts_TK.shape
    assert d.experts_TK.dtype == torch.int64 and d.tokens_per_expert_E.dtype == torch.int64
    assert d.weights_TK.dtype == d.probs_TK.dtype == d.top1_prob_T.dtype == torch.float32
    assert d.wanted_TK.dtype == d.kept_TK.dtype == torch.bool
    assert d.aux_loss.shape == d.z_loss.shape == () and d.aux_loss.dtype == torch.float32
    assert ((d.experts_TK >= 0) & (d.experts_TK < E)).all()
    assert not (d.kept_TK & ~d.wanted_TK).any()
    assert (d.weights_TK[~d.kept_TK] == 0).all()
    if T:
        assert d.wanted_TK[:, 0].all()
        # wanted slots are a prefix of each token's slots
        assert (d.wanted_TK[:, 1:] <= d.wanted_TK[:, :-1]).all()
    assert int(d.tokens_per_expert_E.sum()) == int(d.kept_TK.sum())
    if d.capacity is not None:
        assert (d.tokens_per_expert_E <= d.capacity).all()
    assert not d.probs_TK.requires_grad and not d.top1_prob_T.requires_grad


def assert_matches(make_decision, logits, rows, C):
    """make_decision(leaf logits) vs the reference on a separate leaf; grads compared too."""
    T, E = logits.shape
    fast_leaf = logits.detach().clone().requires_grad_(True)
    ref_leaf = logits.detach().clone().requires_grad_(True)
    d = make_decision(fast_leaf)
    ref = ref_decision(ref_leaf, rows, C)
    check_invariants(d, E)
    assert d.capacity == C
    assert d.experts_TK.tolist() == ref["experts"]
    assert d.wanted_TK.tolist() == ref["wanted"]
    assert d.kept_TK.tolist() == ref["kept"]
    assert d.tokens_per_expert_E.tolist() == ref["tokens_per_expert"]
    close = dict(dtype=torch.float64)  # reference values are Python floats
    torch.testing.assert_close(d.weights_TK, ref["weights"].detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(d.probs_TK.double(), torch.tensor(ref["probs"], **close).view(T, -1),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(d.top1_prob_T.double(), torch.tensor(ref["top1"], **close),
                               rtol=1e-6, atol=0)
    for got, want in ((d.aux_loss, ref["aux"]), (d.z_loss, ref["z"])):
        torch.testing.assert_close(got.double(), torch.tensor(want, **close), rtol=2e-6, atol=1e-7)
    coeff = torch.randn(d.weights_TK.shape, generator=torch.Generator().manual_seed(T * 97 + E))
    (d.weights_TK * coeff).sum().backward()
    if ref["weights"].requires_grad:
        (ref["weights"] * coeff).sum().backward()
    ref_grad = ref_leaf.grad if ref_leaf.grad is not None else torch.zeros_like(logits)
    torch.testing.assert_close(fast_leaf.grad, ref_grad, rtol=1e-5, atol=1e-7)
    return d


def probs_of(logits):
    return [torch.softmax(logits[i].float(), dim=-1).tolist() for i in range(logits.shape[0])]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_logits(T, E, scale, seed):
    return torch.randn(T, E, generator=gen(seed)) * scale


def check_threshold(logits, t, C, max_experts=None):
    rows = ref_threshold_rows(probs_of(logits), t, max_experts)
    return assert_matches(lambda x: threshold_route(x, t, C, max_experts), logits, rows, C)


def check_topk(logits, k, C, noise=None):
    rows = ref_topk_rows(logits, probs_of(logits), k, noise)
    return assert_matches(lambda x: topk_route(x, k, C, noise), logits, rows, C)


# ----------------------------------------------------------------------------- random logits

@pytest.mark.parametrize("T,E", SHAPES)
def test_threshold_matches_reference(T, E):
    cases = ((0.1, 0.9, None, None), (1.0, 0.5, math.ceil(T / E), None), (1.0, 1.0, 1, 3),
             (8.0, 0.99, math.ceil(2 * T / E), None), (8.0, 0.3, None, 2))
    for i, (scale, t, C, cap) in enumerate(cases):
        check_threshold(random_logits(T, E, scale, seed=1000 * T + 10 * E + i), t, C, cap)


@pytest.mark.parametrize("T,E", SHAPES)
def test_topk_matches_reference(T, E):
    cases = ((0.1, 1, None), (1.0, 2, math.ceil(2 * T / E)), (8.0, 3, 1), (1.0, 2, None))
    for i, (scale, k, C) in enumerate(cases):
        logits = random_logits(T, E, scale, seed=2000 * T + 10 * E + i)
        k = min(k, E)
        check_topk(logits, k, C)                                      # evaluation: plain top-k
        check_topk(logits, k, C, gumbel_noise_like(logits, gen(i)))   # training: noised choices


@pytest.mark.parametrize("T,E", [(7, 8), (300, 64)])
def test_switch_is_top1(T, E):
    logits = random_logits(T, E, 2.0, seed=T + E)
    for C in (None, 1, math.ceil(T / E)):
        rows = ref_topk_rows(logits, probs_of(logits), 1, None)
        d = assert_matches(lambda x: switch_route(x, C), logits, rows, C)
        assert d.experts_TK.shape == (T, 1)


def test_training_noise_changes_later_choices_not_weights():
    logits = random_logits(64, 8, 0.5, seed=3)
    noise = gumbel_noise_like(logits, gen(4))
    train = topk_route(logits, 2, None, noise)
    evalu = topk_route(logits, 2, None)
    assert torch.equal(train.experts_TK[:, 0], evalu.experts_TK[:, 0])
    assert not torch.equal(train.experts_TK[:, 1], evalu.experts_TK[:, 1])
    p = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(train.weights_TK, p.gather(1, train.experts_TK), rtol=0, atol=0)


# ----------------------------------------------------------------------------- adversarial logits

def test_all_equal_logits_take_lowest_indices():
    logits = torch.zeros(5, 8)                    # p = 1/8 exactly; prefix sums exact
    d = check_threshold(logits, 0.5, None)
    assert (d.experts_TK == torch.arange(8)).all()
    assert d.wanted_TK.sum(1).tolist() == [4] * 5  # 0.375 < 0.5 takes the 4th; 0.5 stops
    assert d.aux_loss.item() == pytest.approx(8.0 * (1 / 8) * 1.0)  # all firsts on expert 0
    d = check_topk(logits, 3, None)
    assert (d.experts_TK == torch.arange(3)).all()
    check_topk(logits, 3, None, noise=torch.zeros(5, 8))   # noised ties: lower index first


def test_pair_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, -1.0], [1.0, 1.0, 5.0, 5.0]])
    d = check_threshold(logits, 0.9, None)
    assert d.experts_TK.tolist() == [[1, 3, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]]
    d = check_topk(logits, 2, None)
    assert d.experts_TK.tolist() == [[1, 3], [0, 1], [2, 3]]
    d = check_topk(logits, 2, None, noise=torch.zeros(3, 4))   # training: tied first choices
    assert d.experts_TK[:, 0].tolist() == [1, 0, 2]
    check_threshold(logits, 0.9, 1)


def test_one_hot_and_threshold_one():
    E = 8
    logits = 1e4 * torch.eye(E)[torch.arange(6) % E]         # p = one-hot exactly in fp32
    d = check_threshold(logits, 1.0, None)
    assert d.wanted_TK.sum(1).tolist() == [1] * 6            # prefix 1.0 is not < 1.0
    assert d.experts_TK[:, 0].tolist() == list(range(6))
    uniform = torch.zeros(3, E)
    d = check_threshold(uniform, 1.0, None)
    assert d.wanted_TK.all()                                 # 7/8 < 1.0: all E experts
    check_threshold(random_logits(64, 8, 1.0, seed=5), 1.0, None)


@pytest.mark.parametrize("T,E", [(7, 8), (64, 64), (300, 2)])
def test_tiny_threshold_and_below_top1_equal_switch(T, E):
    logits = random_logits(T, E, 3.0, seed=T * E)
    top1_min = torch.softmax(logits, -1).max(-1).values.min().item()
    for t in (1e-6, 0.999 * top1_min):
        for C in (None, 1, math.ceil(T / E)):
            thr, sw = threshold_route(logits, t, C), switch_route(logits, C)
            assert not thr.wanted_TK[:, 1:].any()
            assert torch.equal(thr.experts_TK[:, :1], sw.experts_TK)
            assert torch.equal(thr.kept_TK[:, :1], sw.kept_TK)
            assert torch.equal(thr.weights_TK[:, :1], sw.weights_TK)
            assert (thr.weights_TK[:, 1:] == 0).all()
            assert torch.equal(thr.tokens_per_expert_E, sw.tokens_per_expert_E)
            assert torch.equal(thr.aux_loss, sw.aux_loss) and torch.equal(thr.z_loss, sw.z_loss)


def test_capacity_overflow_keeps_most_confident_then_earliest():
    T, E, C = 10, 4, 3
    logits = torch.zeros(T, E)
    logits[:, 0] = 6.0
    logits[[2, 5, 7], 0] = 7.0                    # the three most confident tokens
    d = check_topk(logits, 2, C)
    assert d.kept_TK[:, 0].nonzero().flatten().tolist() == [2, 5, 7]
    assert d.tokens_per_expert_E.tolist() == [3, 3, 0, 0]   # expert 1 keeps 3 of 10 seconds
    # second choices: the less confident tokens give theirs more probability
    assert d.kept_TK[:, 1].nonzero().flatten().tolist() == [0, 1, 3]
    d = check_threshold(torch.zeros(T, E), 0.6, C)           # all ties: token order decides
    assert d.kept_TK[:, 0].nonzero().flatten().tolist() == [0, 1, 2]


def test_first_choices_outrank_second_choices():
    # Token 0's second choice (p ~ 0.49) beats token 1's first choice (p ~ 0.4) on probability,
    # but every first choice goes before any second choice.
    logits = torch.log(torch.tensor([[0.50, 0.49, 0.01], [0.30, 0.40, 0.30]]))
    d = check_topk(logits, 2, 1)
    assert d.experts_TK.tolist() == [[0, 1], [1, 0]]
    assert d.kept_TK.tolist() == [[True, False], [True, False]]


def test_min_capacity_bigger_than_tokens_is_dropless():
    config = MoEConfig(min_capacity=16)
    logits = random_logits(7, 8, 4.0, seed=6)
    d = route(logits, config, 8, training=True)
    assert d.capacity == 16 and torch.equal(d.kept_TK, d.wanted_TK)
    dropless = threshold_route(logits, config.threshold, None)
    assert torch.equal(d.weights_TK, dropless.weights_TK)


def test_zero_capacity_edges():
    # C = 0 keeps nothing; with min_capacity = 0 a non-empty batch still gets C = ceil(T/E*cf) >= 1
    logits = random_logits(7, 8, 1.0, seed=7)
    d = check_threshold(logits, 0.9, 0)
    assert not d.kept_TK.any() and (d.weights_TK == 0).all() and d.tokens_per_expert_E.sum() == 0
    config = MoEConfig(router="switch", min_capacity=0, train_capacity_factor=1e-3)
    d = route(logits, config, 8, training=True)
    assert d.capacity == 1
    firsts = d.experts_TK[:, 0]
    assert d.tokens_per_expert_E.tolist() == [int((firsts == e).any()) for e in range(8)]
    empty = route(torch.zeros(0, 8), MoEConfig(min_capacity=0), 8, training=True)
    assert empty.capacity == 0 and empty.experts_TK.shape == (0, 8)
    assert empty.aux_loss.item() == 0.0 and empty.z_loss.item() == 0.0
    with pytest.raises(ValueError, match="capacity"):
        apply_capacity(d.experts_TK, d.wanted_TK, d.probs_TK, 8, -1)


def test_max_experts_cap():
    logits = torch.zeros(4, 8)
    d = check_threshold(logits, 1.0, None, max_experts=3)
    assert d.experts_TK.shape == (4, 3) and d.wanted_TK.all()
    d = check_threshold(logits, 1.0, 2, max_experts=20)
    assert d.experts_TK.shape == (4, 8)
    with pytest.raises(ValueError, match="--threshold-max-experts"):
        threshold_route(logits, 0.5, None, max_experts=0)


def test_low_precision_logits_route_in_fp32():
    logits = random_logits(64, 8, 2.0, seed=8).bfloat16().requires_grad_(True)
    d = threshold_route(logits, 0.8, 10)
    ref = threshold_route(logits.detach().float(), 0.8, 10)
    assert d.weights_TK.dtype == torch.float32
    assert torch.equal(d.experts_TK, ref.experts_TK) and torch.equal(d.kept_TK, ref.kept_TK)
    assert torch.equal(d.weights_TK.detach(), ref.weights_TK)
    d.weights_TK.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- losses and noise

def test_loss_functions_and_aux_gradient():
    logits = random_logits(64, 8, 2.0, seed=9)
    a = logits.clone().requires_grad_(True)
    first = a.argmax(-1)
    aux = load_balancing_loss(torch.softmax(a, -1), first, 8)
    aux.backward()
    b = logits.clone().requires_grad_(True)
    frac = torch.stack([(first == e).double().mean() for e in range(8)])
    ref = 8 * sum(torch.softmax(b[t], -1).double() * frac for t in range(64)).div(64).sum()
    ref.backward()
    torch.testing.assert_close(aux.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-5, atol=1e-8)
    uniform = load_balancing_loss(torch.full((8, 8), 1 / 8), torch.arange(8), 8)
    assert uniform.item() == pytest.approx(1.0)
    z = router_z_loss(logits)
    assert z.item() == pytest.approx(torch.logsumexp(logits.double(), -1).square().mean().item(),
                                     rel=1e-6)


def test_gumbel_noise():
    x = torch.zeros(200, 500)
    n1, n2 = gumbel_noise_like(x, gen(0)), gumbel_noise_like(x, gen(0))
    assert torch.equal(n1, n2) and n1.dtype == torch.float32 and n1.shape == x.shape
    assert torch.isfinite(n1).all() and n1.min() > -5
    assert n1.mean().item() == pytest.approx(0.5772, abs=0.01)   # Euler-Mascheroni
    assert n1.var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.03)


# ----------------------------------------------------------------------------- hash routing

def test_hash_table_frozen_and_balanced():
    table = make_hash_table(50257, 64, seed=1234)
    assert table.dtype == torch.int64 and table.shape == (50257,)
    assert torch.equal(table, make_hash_table(50257, 64, seed=1234))
    assert not torch.equal(table, make_hash_table(50257, 64, seed=1235))
    counts = torch.bincount(table, minlength=64)
    assert counts.min() == 50257 // 64 and counts.max() == -(-50257 // 64)


def test_hash_route_matches_reference():
    E, V = 8, 100
    table = make_hash_table(V, E, seed=3)
    ids = torch.randint(0, V, (300,), generator=gen(10))
    for C in (None, 5, 0):
        d = hash_route(ids, table, E, C)
        check_invariants(d, E)
        rows = [([int(table[i])], 1) for i in ids.tolist()]
        kept = ref_capacity(rows, [[1.0] * E for _ in rows], E, C)
        assert d.experts_TK[:, 0].tolist() == [r[0][0] for r in rows]
        assert d.kept_TK[:, 0].tolist() == [(t, 0) in kept for t in range(300)]
        assert torch.equal(d.weights_TK, d.kept_TK.float()) and (d.probs_TK == 1).all()
        assert (d.top1_prob_T == 1).all() and d.aux_loss.item() == d.z_loss.item() == 0.0
        assert d.aux_loss.dtype == d.z_loss.dtype == torch.float32


# ----------------------------------------------------------------------------- dispatcher

def fields_equal(a: RoutingDecision, b: RoutingDecision):
    for name in RoutingDecision.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name


def test_route_dispatches_and_uses_capacity_factor():
    T, E = 64, 8
    logits = random_logits(T, E, 1.0, seed=11)
    base = dict(train_capacity_factor=2.0, eval_capacity_factor=0.5, min_capacity=0)
    for training, C in ((True, 16), (False, 4)):
        cfg = MoEConfig(router="threshold", threshold=0.7, threshold_max_experts=3, **base)
        fields_equal(route(logits, cfg, E, training=training), threshold_route(logits, 0.7, C, 3))
        cfg = MoEConfig(router="switch", **base)
        fields_equal(route(logits, cfg, E, training=training), switch_route(logits, C))
        cfg = MoEConfig(router="topk", topk=1, **base)
        fields_equal(route(logits, cfg, E, training=training), topk_route(logits, 1, C))
        cfg = MoEConfig(router="hash", vocab_size=100, **base)
        ids, table = torch.arange(T), make_hash_table(100, E, seed=1)
        fields_equal(route(None, cfg, E, training=training, token_ids_T=ids, hash_table_V=table),
                     hash_route(ids, table, E, C))
    cfg = MoEConfig(drop_tokens=False)
    assert route(logits, cfg, E, training=True).capacity is None
    with pytest.raises(ValueError, match="logits"):
        route(logits, cfg, E + 1, training=True)


def test_route_samples_noise_only_when_training_topk():
    logits = random_logits(64, 8, 0.3, seed=12)
    cfg = MoEConfig(router="topk", topk=2)
    C = cfg.capacity(64, 8, True)
    g = gen(42)
    noisy = route(logits, cfg, 8, training=True, generator=g)
    fields_equal(noisy, topk_route(logits, 2, C, gumbel_noise_like(logits, gen(42))))
    state = g.get_state()
    fields_equal(route(logits, cfg, 8, training=False, generator=g),
                 topk_route(logits, 2, cfg.capacity(64, 8, False)))
    top1 = MoEConfig(router="topk", topk=1)
    route(logits, top1, 8, training=True, generator=g)
    assert torch.equal(g.get_state(), state)          # eval and k = 1 draw nothing
    again = route(logits, cfg, 8, training=True, generator=gen(42))
    fields_equal(noisy, again)


# ----------------------------------------------------------------------------- errors, sync-free

def test_errors_name_the_flag():
    logits = torch.zeros(4, 8)
    for t in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="--threshold"):
            threshold_route(logits, t, None)
    for k in (0, 9):
        with pytest.raises(ValueError, match="--topk"):
            topk_route(logits, k, None)
    table = make_hash_table(10, 8, seed=0)
    with pytest.raises(ValueError, match="hash"):
        hash_route(None, table, 8, None)
    with pytest.raises(ValueError, match="hash"):
        hash_route(torch.arange(4), None, 8, None)
    with pytest.raises(ValueError, match="token ids"):
        hash_route(torch.tensor([3, 10]), table, 8, None)
    with pytest.raises(ValueError, match="hash"):
        route(None, MoEConfig(router="hash", vocab_size=10), 8, training=True)


def test_hot_path_is_sync_free():
    # Meta tensors have no values: any .item(), nonzero() or data-dependent shape would raise.
    logits = torch.empty(64, 8, device="meta")
    noise = torch.empty_like(logits)
    for d in (threshold_route(logits, 0.9, 8, 4), topk_route(logits, 2, 8, noise),
              switch_route(logits, 8),
              route(logits, MoEConfig(router="topk", topk=2), 8, training=True)):
        assert d.kept_TK.device.type == "meta"
