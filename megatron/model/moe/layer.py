"""The MoE layer: route -> plan -> experts (dispatch, expert MLPs, combine).

Shapes: the letters of megatron/model/__init__.py. Which implementation runs each step is
the layer's `backend` (backend.py), resolved once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from megatron.config import DEFAULT_ACTIVATION, OVERRIDABLE_ROUTING, MoEConfig
from megatron.model.moe.backend import resolve_backend
from megatron.model.moe.dispatch import DispatchPlan, PlanCore, finish_plan, plan_core
from megatron.model.moe.expert_parallel import shard_experts
from megatron.model.moe.experts import Experts
from megatron.model.moe.router import (CapacityFn, RoutingDecision, ThresholdSlotsFn,
                                       gumbel_noise_like, make_hash_table, route,
                                       route_with_capacity, torch_threshold_slots)
from megatron.model.moe.stats import MoEStats, compute_stats, token_experts


@dataclass(frozen=True)
class MoEOutput:
    """output: like hidden_states; aux_loss: fp32 scalar (coefficients applied); stats: detached."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    stats: MoEStats


class MoELayer(nn.Module):
    """A mixture of `num_experts` GeLU MLPs of hidden `config.ffn_hidden_size`, replacing the FFN.

    `activation` is the experts' GeLU form (megatron/model/activations.py): the model's, since
    the XMoE fork's experts were copies of its dense ParallelMLP.

    The router weight `gate_weight` [E, D] is created and applied in fp32 whatever the params
    dtype (routing decisions are discontinuous in the logits; bf16 logits flip them). Hash
    routing has no gate: a frozen `hash_table` buffer maps token ids to experts instead.

    Expert parallelism: `shard_experts_(group)` keeps only this rank's E / W experts (a slice
    of the weights every rank initialised identically), and forward then runs the experts
    across `group` (all_to_all of the dispatch rows, see expert_parallel.py). Routing, capacity
    and combine stay local: they are the same as without expert parallelism.

    `backend` (backend.Backend, shown by print(layer)) holds the implementation of the router
    logits, capacity and experts: resolved from config.backend and the device at construction,
    again when the module moves (.to / .cuda) and when its experts are sharded.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, num_experts: int, init_std: float,
                 output_init_std: float, layer_number: int,
                 dense_ffn_hidden_size: Optional[int] = None,
                 params_dtype: torch.dtype = torch.float32,
                 activation: str = DEFAULT_ACTIVATION) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {num_experts}")
        self.config = config
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.layer_number = layer_number
        self.dense_ffn_hidden_size = dense_ffn_hidden_size or 4 * hidden_size
        if config.router == "hash":
            table = make_hash_table(config.vocab_size, num_experts, config.hash_seed)
            self.register_buffer("hash_table", table)   # saved with checkpoints; never trained
            self.gate_weight = None
        else:
            self.gate_weight = nn.Parameter(torch.empty(num_experts, hidden_size,
                                                        dtype=torch.float32))
            nn.init.normal_(self.gate_weight, mean=0.0, std=init_std)
            self.hash_table = None
        self.experts = Experts(num_experts, hidden_size, config.ffn_hidden_size, init_std,
                               output_init_std, bias=config.expert_bias,
                               params_dtype=params_dtype, activation=activation)
        self.expert_group: Optional["torch.distributed.ProcessGroup"] = None
        self.expert_parallel_rank, self.expert_parallel_size = 0, 1
        self.resolve_backend()

    def resolve_backend(self) -> None:
        """Choose `backend` for config.backend, the device of the weights and the expert group."""
        self.backend = resolve_backend(self.config.backend, self.experts.w1.device,
                                       self.expert_group)

    def _apply(self, fn, recurse=True):
        """.to() / .cuda() / .half() ...: the device may have changed, so resolve the backend
        again (nn.RNNBase refreshes its flat weights here alike)."""
        super()._apply(fn, recurse)
        self.resolve_backend()
        return self

    def extra_repr(self) -> str:
        return (f"layer_number={self.layer_number}, router={self.config.router}, "
                f"backend={self.backend}")

    def shard_experts_(self, group: "torch.distributed.ProcessGroup") -> None:
        """Keep this rank's experts [r * L, (r + 1) * L) of `group` (W ranks, L = E / W)."""
        import torch.distributed as dist

        if self.expert_group is not None:
            raise RuntimeError(f"MoE layer {self.layer_number}: experts already sharded")
        if self.config.sync_free:
            raise ValueError("sync-free dispatch cannot be combined with expert parallelism")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.experts = shard_experts(self.experts, rank, size)
        self.expert_group = group
        self.expert_parallel_rank, self.expert_parallel_size = rank, size
        self.resolve_backend()

    def set_routing(self, config: MoEConfig) -> None:
        """Route with `config` from now on. It may differ from the layer's config only in the
        routing settings (config.OVERRIDABLE_ROUTING: router among the gated ones, threshold,
        top-k, capacity), which the same parameters serve; anything else raises ValueError."""
        fixed = sorted(f.name for f in dataclasses.fields(MoEConfig)
                       if f.name not in OVERRIDABLE_ROUTING
                       and getattr(config, f.name) != getattr(self.config, f.name))
        if fixed:
            raise ValueError(f"MoE layer {self.layer_number}: only the routing settings "
                             f"({', '.join(OVERRIDABLE_ROUTING)}) can change on a built model, "
                             f"not {', '.join(fixed)}")
        if (config.router == "hash") != (self.config.router == "hash"):
            raise ValueError(f"MoE layer {self.layer_number}: router {self.config.router} -> "
                             f"{config.router}: hash routing reads a frozen token table, the "
                             "other routers the gate weights, so they do not interchange")
        self.config = config

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_experts

    def num_expert_parameters(self) -> int:
        """Expert parameters of the whole layer (all ranks' shards), router excluded."""
        return sum(p.numel() for p in self.experts.parameters()) * self.expert_parallel_size

    def router_logits(self, x_TD: torch.Tensor) -> Optional[torch.Tensor]:
        """fp32 logits [T, E] (None for hash routing: no gate)."""
        if self.gate_weight is None:
            return None
        return self.backend.router_logits(x_TD, self.gate_weight)

    def decide(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]) -> RoutingDecision:
        """Route the flattened tokens (train or eval capacity follows self.training; capacity by
        the torch sort, the reference of every backend's)."""
        return route(self.router_logits(x_TD), self.config, self.num_experts,
                     training=self.training, token_ids_T=token_ids_T,
                     hash_table_V=self.hash_table)

    def forward(self, hidden_states: torch.Tensor, token_ids: Optional[torch.Tensor] = None,
                record_experts: bool = False) -> MoEOutput:
        """hidden_states [..., D] (token_ids [...] for hash routing) -> MoEOutput; with
        record_experts its stats carry each token's experts (token_experts_TK, generation).

        1. route:    fp32 router logits -> RoutingDecision (experts, weights, capacity drops)
        2. plan:     kept (token, expert) pairs sorted by expert, with group offsets
                     (exact: one host sync; sync_free: static padded buffer, no sync)
        3. dispatch: gather each kept pair's token row into expert order
        4. experts:  per-expert Linear-GeLU-Linear over contiguous groups (grouped GEMM);
                     with expert parallelism the rows travel to the rank owning their expert
                     and back (all_to_all, uneven splits)
        5. combine:  weighted fp32 per-token sums back to tokens; all-dropped tokens get 0
        self.backend implements the logits, the capacity (with the plan's rows) and steps 3-5
        (see backend.py). Steps 1-2 after the logits, up to the sync, and the statistics run as
        one torch.compile'd function with config.compile_routing (static shapes: the many small
        ops become a few fused kernels).
        """
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)

        decision, plan, stats = self.route_and_plan(x_TD, token_ids_T)
        if isinstance(plan, PlanCore):
            plan = finish_plan(plan, sync_free=False)          # the exact plan's host sync
        out_TD = self.backend.experts(x_TD, plan, self.experts, hidden_states.dtype)

        aux_loss = self.weighted_losses(decision)
        stats = dataclasses.replace(
            stats, layer_number=self.layer_number,
            token_experts_TK=token_experts(decision) if record_experts else None)
        return MoEOutput(out_TD.reshape(shape), aux_loss, stats)

    def weighted_losses(self, decision: RoutingDecision) -> torch.Tensor:
        """aux coefficient * balance loss + z coefficient * z-loss (fp32 scalar). A term whose
        coefficient is 0 (the z-loss by default) is left out, not multiplied by 0: no backward
        pass through it, and no 0 * inf = NaN from a loss that does not count."""
        terms = [coeff * loss.float() for coeff, loss in
                 ((self.config.aux_loss_coeff, decision.aux_loss),
                  (self.config.z_loss_coeff, decision.z_loss)) if coeff]
        if not terms:
            return torch.zeros((), dtype=torch.float32, device=decision.aux_loss.device)
        return sum(terms[1:], terms[0])

    def route_and_plan(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]
                       ) -> Tuple[RoutingDecision, Union[DispatchPlan, PlanCore], MoEStats]:
        """Steps 1-2 without a host sync (the exact plan is finished by the caller), compiled
        with config.compile_routing (not for hash routing, whose id check reads the host)."""
        logits_TE = self.router_logits(x_TD)
        noise_TE = None
        step: Callable = routing_step
        if (self.config.compile_routing and logits_TE is not None
                and not torch.compiler.is_compiling()):       # (a compiled model inlines it)
            graphs = self.config.routing_cuda_graphs and logits_TE.is_cuda
            step = compiled_routing_step("reduce-overhead" if graphs else "default")
            if self.training and self.config.router == "topk" and self.config.topk > 1:
                # Drawn eagerly, as route() would: the same random stream as without compile.
                noise_TE = gumbel_noise_like(logits_TE)
        return step(logits_TE, token_ids_T, self.hash_table, noise_TE, self.config,
                    self.num_experts, self.training, self.dense_ffn_hidden_size,
                    self.backend.capacity, self.backend.threshold_slots)


def routing_step(logits_TE: Optional[torch.Tensor], token_ids_T: Optional[torch.Tensor],
                 hash_table_V: Optional[torch.Tensor], noise_TE: Optional[torch.Tensor],
                 config: MoEConfig, num_experts: int, training: bool,
                 dense_ffn_hidden_size: int, capacity_fn: CapacityFn,
                 threshold_slots: ThresholdSlotsFn = torch_threshold_slots
                 ) -> Tuple[RoutingDecision, Union[DispatchPlan, PlanCore], MoEStats]:
    """Router logits -> decision -> plan (finished if sync-free, else its sync-free core) and
    statistics (layer number 0: the layer sets its own). A pure function of its arguments;
    `capacity_fn` (the backend's) decides the kept pairs and hands their rows to the plan,
    `threshold_slots` (the backend's) ranks a threshold router's experts."""
    decision, rows = route_with_capacity(logits_TE, config, num_experts, capacity_fn,
                                         training=training, token_ids_T=token_ids_T,
                                         hash_table_V=hash_table_V, noise_TE=noise_TE,
                                         threshold_slots=threshold_slots)
    core = plan_core(decision, rows)
    plan = finish_plan(core, sync_free=True) if config.sync_free else core
    stats = compute_stats(decision, 0, config.topk, config.ffn_hidden_size,
                          dense_ffn_hidden_size)
    return decision, plan, stats


COMPILED_ROUTING_STEPS: "dict[str, Callable]" = {}


def compiled_routing_step(mode: str = "default") -> Callable:
    """torch.compile(routing_step, mode=mode), built once per process and mode (shapes, config
    and the capacity function are guarded, so layers of one shape share the compiled code).

    mode "reduce-overhead" (config.routing_cuda_graphs) replays the step's kernels as CUDA
    graphs (torch's CUDA graph trees: one graph per call within a training step, i.e. per MoE
    layer, forward and backward), which pays where eager training is host-bound (measured in
    benchmarks/HISTORY.md). The graphs own their outputs: the next step's replay overwrites
    them (torch raises if an overwritten one is read)."""
    if mode not in COMPILED_ROUTING_STEPS:
        COMPILED_ROUTING_STEPS[mode] = torch.compile(routing_step, fullgraph=True,
                                                      dynamic=False, mode=mode)
    return COMPILED_ROUTING_STEPS[mode]


def shard_moe_layers_(model: nn.Module, group: "torch.distributed.ProcessGroup") -> int:
    """Expert parallelism for a whole model: shard every MoELayer's experts over `group`.

    Call after building the model with the same seed on every rank (each rank keeps its slice
    of identically initialised weights, so the sharded model equals the unsharded one) and
    before creating the optimizer. Returns the number of MoE layers sharded.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.shard_experts_(group)
    return len(layers)


def named_expert_parameters(model: nn.Module) -> "dict[str, nn.Parameter]":
    """{state-dict name: parameter} of every MoELayer's experts (routers excluded): the
    parameters expert parallelism shards, DeepSpeed reduces per expert group and MoE optimizer
    groups hold."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            for name, p in module.experts.named_parameters():
                out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = p
    return out
