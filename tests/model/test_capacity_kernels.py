"""The sort-free capacity kernels (megatron/model/moe/kernels/capacity.py).

Integer decisions are compared exactly with a per-expert reference written here (Python
sorting by the documented priority: lower slot, then higher probability, then lower token)
and with the torch path (router.capacity_and_counts + dispatch.rows_by_scans). On CPU this
module runs under triton's interpreter in its own process (test_moe_kernels_interpreted.py);
on CUDA it runs compiled.
"""

import pytest
import torch

from megatron.config import MoEConfig
from megatron.model.mlp_gating import capacity_and_counts, route_with_capacity, torch_capacity
from megatron.model.moe.dispatch import capacity_with_rows
from megatron.model.moe.layer import routing_step

from tests.model.triton_kernels import CUDA_OR_INTERPRETER, DEVICE, NEEDS_TRITON, kernel_module

pytestmark = [NEEDS_TRITON, CUDA_OR_INTERPRETER]


@pytest.fixture(scope="module")
def cap():
    return kernel_module("kernels.capacity", "rows_kernel")


def reference(experts, wanted, probs, num_experts, capacity):
    """(kept [T, K], counts [E], rows [T, K] with -1 where dropped), by plain Python."""
    T, K = experts.shape
    e_l, w_l, p_l = experts.tolist(), wanted.tolist(), probs.tolist()
    kept = [[False] * K for _ in range(T)]
    for e in range(num_experts):
        pairs = [(k, -abs(p_l[t][k]), t) for t in range(T) for k in range(K)
                 if w_l[t][k] and e_l[t][k] == e]
        for k, _, t in sorted(pairs)[:len(pairs) if capacity is None else capacity]:
            kept[t][k] = True
    rows, counts, r = [[-1] * K for _ in range(T)], [], 0
    for e in range(num_experts):
        start = r
        for t in range(T):
            for k in range(K):
                if kept[t][k] and e_l[t][k] == e:
                    rows[t][k], r = r, r + 1
        counts.append(r - start)
    return torch.tensor(kept), torch.tensor(counts), torch.tensor(rows)


def random_pairs(T, E, K, gen, prefix=True):
    """Each token: K distinct experts; wanted a prefix of its slots (threshold-like) or random."""
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if prefix:
        wanted = torch.arange(K)[None, :] < torch.randint(1, K + 1, (T, 1), generator=gen)
    else:
        wanted = torch.rand(T, K, generator=gen) < 0.6
    probs = torch.rand(T, K, generator=gen)
    return experts, wanted, probs


def check(cap, experts, wanted, probs, E, capacity, scan_block=16):
    kept, counts, rows = cap.capacity_rows(experts.to(DEVICE), wanted.to(DEVICE),
                                           probs.to(DEVICE), E, capacity, scan_block=scan_block)
    want_kept, want_counts, want_rows = reference(experts, wanted, probs, E, capacity)
    assert torch.equal(kept.cpu(), want_kept)
    assert torch.equal(counts.cpu(), want_counts)
    assert torch.equal(torch.where(kept, rows.long(), -1).cpu(), want_rows)
    torch_kept, torch_counts = capacity_and_counts(experts, wanted, probs, E, capacity)
    assert torch.equal(torch_kept, want_kept) and torch.equal(torch_counts, want_counts)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix", [True, False])
def test_random_pairs_match_reference(cap, seed, prefix):
    gen = torch.Generator().manual_seed(seed)
    T, E = 40 + 23 * seed, 3 + 2 * seed
    K = 1 + (2 * seed) % E
    experts, wanted, probs = random_pairs(T, E, K, gen, prefix)
    for capacity in (None, 0, 1, T * K // (2 * E), T):
        check(cap, experts, wanted, probs, E, capacity, scan_block=32)


def test_ties_across_scan_blocks(cap):
    """Probabilities on a coarse grid: many pairs share the cut value, across blocks of 16
    tokens; the lowest-token ones must be kept, exactly as many as fit."""
    gen = torch.Generator().manual_seed(7)
    experts, wanted, probs = random_pairs(100, 4, 3, gen)
    probs = (probs * 3).round() / 3
    for capacity in (3, 17, 30, 41, 58):
        check(cap, experts, wanted, probs, 4, capacity)


def test_one_overfull_expert_and_capacity_between_slots(cap):
    """Expert 0 is every token's first choice; capacity exactly the pairs of the slots before
    the cut (nothing of the cut slot fits), one more, and one less."""
    T, E, K = 90, 5, 3
    gen = torch.Generator().manual_seed(3)
    experts = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long),
                                      1 + torch.randperm(E - 1, generator=gen)[:K - 1]])
                           for _ in range(T)])
    experts[::4] = experts[::4].roll(1, dims=1)           # some tokens want expert 0 second
    wanted = torch.ones(T, K, dtype=torch.bool)
    probs = torch.rand(T, K, generator=gen)
    first = int((experts[:, 0] == 0).sum())
    for capacity in (first - 1, first, first + 1, T - 1, T):
        check(cap, experts, wanted, probs, E, capacity)


def test_equal_probabilities_keep_earlier_tokens(cap):
    """Hash routing's case (K = 1, every probability 1.0), and -0.0 tying with 0.0."""
    gen = torch.Generator().manual_seed(5)
    experts = torch.randint(0, 6, (120, 1), generator=gen)
    wanted = torch.ones(120, 1, dtype=torch.bool)
    for capacity in (0, 5, 120):
        check(cap, experts, wanted, torch.ones(120, 1), 6, capacity)
    zeros = torch.zeros(120, 1)
    zeros[::3] = -0.0
    check(cap, experts, wanted, zeros, 6, 11)


def test_wide_blocks_match_narrow_blocks(cap):
    """The default scan block (one block at this T) agrees with blocks of 16."""
    gen = torch.Generator().manual_seed(11)
    experts, wanted, probs = random_pairs(300, 8, 8, gen)
    for capacity in (10, 40, None):
        check(cap, experts, wanted, probs, 8, capacity, scan_block=2048)


@pytest.mark.parametrize("router", ["threshold", "topk", "switch", "hash"])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_routing_step_plans_equal_torch_path(cap, router, drop_tokens):
    """routing_step with the Triton backend's capacity and threshold-slots strategies gives the
    same decision and the same dispatch plan, array for array, as the torch backend's sorts and
    grid scan."""
    from megatron.model.moe.ops import triton_capacity, triton_threshold_slots
    from megatron.model.moe.router import torch_threshold_slots

    T, E, D = 96, 8, 12
    gen = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.randn(T, E, generator=gen)
    token_ids = torch.randint(0, 50, (T,), generator=gen)
    config = MoEConfig(router=router, topk=2, threshold=0.8, drop_tokens=drop_tokens,
                       train_capacity_factor=0.6, vocab_size=50)
    table = torch.randint(0, E, (50,), generator=gen)
    noise = torch.zeros(T, E) if router == "topk" else None
    results, calls = [], []
    strategies = ((capacity_with_rows, torch_threshold_slots),
                  (triton_capacity, triton_threshold_slots))
    for capacity_fn, slots_fn in strategies:
        def spy(*args, fn=capacity_fn):
            calls.append(fn)
            return fn(*args)

        def slots_spy(*args, fn=slots_fn):
            calls.append(fn)
            return fn(*args)
        decision, core, _ = routing_step(logits.to(DEVICE), token_ids.to(DEVICE),
                                         table.to(DEVICE), None if noise is None
                                         else noise.to(DEVICE), config, E, True, 4 * D, spy,
                                         slots_spy)
        results.append((decision, core))
    (d0, c0), (d1, c1) = results
    if router == "threshold":                   # each strategy decided once
        assert calls == [torch_threshold_slots, capacity_with_rows, triton_threshold_slots,
                         triton_capacity]
    else:
        assert calls == [capacity_with_rows, triton_capacity]
    for name in ("experts_TK", "wanted_TK", "kept_TK", "tokens_per_expert_E"):
        assert torch.equal(getattr(d0, name), getattr(d1, name)), name
    assert torch.equal(d0.weights_TK, d1.weights_TK)
    for name in ("token_P", "weight_P", "offsets_E", "rows_J", "bag_offsets_T"):
        assert torch.equal(getattr(c0, name), getattr(c1, name)), name
    if drop_tokens and router != "hash":
        assert not torch.equal(d1.kept_TK, d1.wanted_TK)      # capacity did bind


def test_triton_capacity_with_no_tokens(cap):
    from megatron.model.moe.ops import triton_capacity

    experts = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    wanted = torch.zeros(0, 2, dtype=torch.bool, device=DEVICE)
    probs = torch.zeros(0, 2, device=DEVICE)
    kept, counts, rows = triton_capacity(experts, wanted, probs, 4, 3)
    assert kept.shape == (0, 2) and torch.equal(counts.cpu(), torch.zeros(4, dtype=torch.long))
    assert torch_capacity(experts, wanted, probs, 4, 3)[2] is None
    for got, want in zip(rows, capacity_with_rows(experts, wanted, probs, 4, 3)[2]):
        assert torch.equal(got, want)


def test_route_passes_capacity_fn():
    """route_with_capacity hands capacity to the given function (the layer passes its
    backend's) and returns what that function computed beside the decisions."""
    seen = []

    def spy(*args):
        seen.append(args[4])
        kept, counts, _ = torch_capacity(*args)
        return kept, counts, "plan rows"

    cfg = MoEConfig(router="threshold", drop_tokens=True, train_capacity_factor=1.0)
    _, extra = route_with_capacity(torch.randn(16, 4), cfg, 4, spy, training=True)
    assert seen == [cfg.capacity(16, 4, True)] and extra == "plan rows"
