"""Expert parallelism on 2 CPU ranks (gloo) equals the single-process MoE layer.

Each rank routes and plans its OWN batch, exchanges rows with the other rank, runs its half of the
experts (a slice of the full layer's stacked weights) and combines. Against the full layer run in
one process on the same per-rank batch: outputs and dL/dx per rank, dL/d(router) per rank (the
router is replicated; data parallelism would all-reduce it), and dL/d(local expert weights) =
the sum over BOTH ranks' batches of the full layer's gradient slice (a rank's experts see both
ranks' tokens).
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.config import MoEConfig
from megatron.model.moe import MoELayer
from megatron.model.moe.expert_parallel import expert_range, local_order
from megatron.model.moe.reference import use_reference_experts
from tests.helpers import free_port, grouped_mm_cpu_ok

WORLD, T, D, FH, V = 2, 20, 16, 8, 50

# name: (router, num_experts, drop_tokens, topk, hash experts allowed (None: the full table))
CASES = {
    "threshold_drops": ("threshold", 4, True, 2, None),
    "threshold_dropless": ("threshold", 8, False, 2, None),
    "topk_drops": ("topk", 8, True, 2, None),
    "topk_dropless": ("topk", 4, False, 3, None),
    "rank1_experts_idle": ("hash", 4, False, 1, (0, 1)),     # rank 1's experts get no rows
    "rank0_experts_idle": ("hash", 4, True, 1, (2, 3)),      # rank 0 receives nothing
}


def make_layer(router, num_experts, drop_tokens, topk, hash_experts, impl) -> MoELayer:
    """impl "loop": the experts as the per-expert reference loop; "grouped": the backend's."""
    cfg = MoEConfig(router=router, ffn_hidden_size=FH, threshold=0.7, topk=topk,
                    eval_capacity_factor=1.0, min_capacity=2, drop_tokens=drop_tokens,
                    vocab_size=V, z_loss_coeff=0.0)
    torch.manual_seed(0)
    layer = MoELayer(cfg, D, num_experts, init_std=0.5, output_init_std=0.3, layer_number=1)
    with torch.no_grad():
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
        if hash_experts is not None:
            allowed = torch.tensor(hash_experts)
            layer.hash_table.copy_(allowed[layer.hash_table % len(allowed)])
    if impl == "loop":
        use_reference_experts(layer)
    return layer.eval()       # eval: top-k without Gumbel noise, so both runs route alike


def batch(rank: int):
    """A different batch per rank: x [T, D], token ids [T], output cotangent [T, D]."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(T, D, generator=g), torch.randint(0, V, (T,), generator=g), \
        torch.randn(T, D, generator=g)


def reference(layer: MoELayer, rank: int):
    """Full layer, one process: output, dL/dx, dL/d(gate) and dL/d(expert params)."""
    x, ids, g = batch(rank)
    x.requires_grad_(True)
    out = layer(x, ids).output
    params = [p for _, p in layer.experts.named_parameters()]
    gate = [layer.gate_weight] if layer.gate_weight is not None else []
    grads = torch.autograd.grad((out * g).sum(), [x] + gate + params)
    return out.detach(), grads[0], grads[1:1 + len(gate)], grads[1 + len(gate):]


def expert_parallel(layer: MoELayer, rank: int, impl: str):
    """MoELayer.shard_experts_ over the 2 ranks: route + plan locally, experts across the
    group, combine locally."""
    sharded = copy.deepcopy(layer)
    sharded.shard_experts_(dist.group.WORLD)
    assert sharded.num_local_experts == layer.num_experts // WORLD
    assert sharded.num_expert_parameters() == sum(p.numel() for p in layer.experts.parameters())
    local = sharded.experts
    if impl == "loop":
        use_reference_experts(sharded)        # the loop between the all_to_alls
    x, ids, g = batch(rank)
    x.requires_grad_(True)
    out = sharded(x, ids).output
    decision = sharded.decide(x.detach(), ids)
    params = [p for _, p in local.named_parameters()]
    gate = [sharded.gate_weight] if sharded.gate_weight is not None else []
    grads = torch.autograd.grad((out * g).sum(), [x] + gate + params, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, [x] + gate + params)]
    return out.detach(), grads[0], grads[1:1 + len(gate)], grads[1 + len(gate):], decision


def check_case(name: str, rank: int, impl: str) -> None:
    router, E, drop, topk, hash_experts = CASES[name]
    layer = make_layer(router, E, drop, topk, hash_experts, impl)
    out, gx, ggate, gexp, decision = expert_parallel(layer, rank, impl)
    want_out, want_gx, want_ggate, _ = reference(layer, rank)
    first, last = expert_range(E, rank, WORLD)
    want_gexp = [a[first:last] + b[first:last]
                 for a, b in zip(reference(layer, 0)[3], reference(layer, 1)[3])]
    tol = dict(atol=1e-5, rtol=1e-5)
    msg = lambda what: (lambda m: f"[{name}/{impl} rank {rank}] {what}: {m}")   # noqa: E731
    torch.testing.assert_close(out, want_out, **tol, msg=msg("output"))
    torch.testing.assert_close(gx, want_gx, **tol, msg=msg("grad x"))
    for a, b in zip(ggate, want_ggate):
        torch.testing.assert_close(a, b, **tol, msg=msg("grad gate"))
    for pname, a, b in zip(("w1", "b1", "w2", "b2"), gexp, want_gexp):
        torch.testing.assert_close(a, b, **tol, msg=msg(f"grad {pname}"))
    # The cases exercise what their names claim.
    tokens_E = decision.tokens_per_expert_E
    if name.endswith("_drops"):
        assert bool((decision.wanted_TK & ~decision.kept_TK).any()), name
    if name == "rank1_experts_idle":
        assert int(tokens_E[2:].sum()) == 0 and int(tokens_E[:2].sum()) > 0
    if name == "rank0_experts_idle":
        assert int(tokens_E[:2].sum()) == 0 and int(tokens_E[2:].sum()) > 0


def _worker(rank: int, port: int, impls) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for impl in impls:
            for name in CASES:
                check_case(name, rank, impl)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_2_equals_1():
    """All cases in one spawn (process start-up dominates the runtime)."""
    impls = ["loop"] + (["grouped"] if grouped_mm_cpu_ok() else [])
    mp.spawn(_worker, args=(free_port(), impls), nprocs=WORLD, join=True)


def test_local_order_regroups_by_local_expert():
    """Source-major blocks (src, l) become local-expert-major (l, src); inverse undoes it."""
    recv_NL = [[2, 0, 1], [1, 3, 0]]        # 2 sources, 3 local experts
    perm, inverse, ends = local_order(recv_NL, torch.device("cpu"))
    # received rows: src0: e0 e0 e2 | src1: e0 e1 e1 e1 -> indices 0..6
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert ends == (3, 6, 7)
    assert torch.equal(perm[inverse], torch.arange(7))


def test_expert_range_rejects_uneven_split():
    assert expert_range(8, 1, 2) == (4, 8)
    with pytest.raises(ValueError, match="divisible"):
        expert_range(6, 0, 4)
