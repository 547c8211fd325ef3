"""Which implementation runs each step of an MoE layer: the one place that decides it.

Shapes: the letters of megatron/model/__init__.py.

Each MoELayer resolves MoEConfig.backend (--moe-backend) once, for its device (at construction
and again when the module is moved), into a `Backend`: a small strategy object holding the
implementation of each step that has more than one. Nothing downstream re-decides per call.

    step                 torch                                triton (ops.py over kernels/)
    router logits        fp32 F.linear                        Triton GEMM, fp32-accurate from
                                                              bf16 activations (router_gemm.py)
    threshold slots      stable sort, fp64 scan (router.     one ranking kernel
                         torch_threshold_slots)               (threshold.py)
    capacity + the       one sort (router.capacity_and_       sort-free kernels (capacity.py)
    plan's rows          counts), scans (dispatch.rows_by_
                         scans)
    experts              dispatch -> Experts (grouped_mm)     Triton row kernels (rows.py)
                         -> combine                           around grouped_mm

"auto" is triton on CUDA when triton imports, torch elsewhere. Off CUDA the torch backend's
experts step runs outside torch.compile graphs (torch_experts_untraced, prepare_for_compile).
With expert parallelism the experts step is dispatch -> all_to_all -> Experts -> all_to_all ->
combine (expert_parallel.py) on either backend. The per-expert loop is no backend: it is the
tests' reference (reference.py). The torch backend is also the Triton backend's test oracle.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron.config import MOE_BACKENDS
from megatron.model.moe.dispatch import DispatchPlan, capacity_with_rows, combine, dispatch
from megatron.model.moe.expert_parallel import expert_parallel_moe
from megatron.model.moe.experts import Experts
from megatron.model.moe.router import CapacityFn, ThresholdSlotsFn, torch_threshold_slots

# (x_TD, gate_ED) -> fp32 logits_TE
RouterLogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (x_TD, plan, experts, out_dtype) -> out_TD: dispatch, the experts and the weighted combine
ExpertsFn = Callable[[torch.Tensor, DispatchPlan, Experts, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """The implementations one MoE layer runs (see the table above)."""

    name: str                       # "torch" or "triton"
    router_logits: RouterLogitsFn
    threshold_slots: ThresholdSlotsFn   # the threshold router's ranked, wanted slots
    capacity: CapacityFn            # decisions and the plan's rows (dispatch.PlanRows)
    experts: ExpertsFn

    def __str__(self) -> str:
        return (f"{self.name} (router logits: {_name(self.router_logits)}, threshold slots: "
                f"{_name(self.threshold_slots)}, capacity: {_name(self.capacity)}, experts: "
                f"{_name(self.experts)})")


def torch_router_logits(x_TD: torch.Tensor, gate_ED: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, E]; .float() undoes a model-wide cast of the input or the weight."""
    return F.linear(x_TD.float(), gate_ED.float())


def torch_experts(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """dispatch -> Experts (two grouped GEMMs) -> combine, in torch ops."""
    y_PD = experts(dispatch(x_TD, plan), plan.group_offsets_E, valid_P=plan.valid_P)
    return combine(y_PD, plan, out_dtype)


def torch_experts_untraced(x_TD: torch.Tensor, plan: DispatchPlan, experts: Experts,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """torch_experts, run eagerly even inside a torch.compile'd model once prepare_for_compile
    ran: torch traces grouped_mm in bf16 only (its meta kernel), and off CUDA the experts
    compute in the weights' dtype (fp32 on CPU). On CUDA they cast to bf16, so there the step
    is traced (torch_experts)."""
    return _eager_experts(x_TD, plan, experts, out_dtype)


# What torch_experts_untraced calls: torch_experts until prepare_for_compile wraps it in
# torch.compiler.disable (a graph break around the step). Not at import: the decorator imports
# torch._dynamo, seconds of start-up for every process that builds an MoE model.
_eager_experts: ExpertsFn = torch_experts


def prepare_for_compile() -> None:
    """Call before torch.compile traces MoE layers off CUDA (megatron.engine.compile_model
    does): their experts step then runs eagerly inside the compiled model. Without it, tracing
    fails on grouped_mm in fp32 (loudly, not silently)."""
    global _eager_experts
    _eager_experts = torch.compiler.disable(torch_experts)


TORCH = Backend("torch", torch_router_logits, torch_threshold_slots, capacity_with_rows,
                torch_experts)
TORCH_OFF_CUDA = dataclasses.replace(TORCH, experts=torch_experts_untraced)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton and the Triton backend's kernels import (triton ships with CUDA builds of
    torch; a CPU install may lack it)."""
    try:
        from megatron.model.moe import ops  # noqa: F401
        return True
    except (ImportError, RuntimeError):     # no triton, or one that cannot load here
        return False


def resolve_backend(choice: str, device: torch.device,
                    expert_group: Optional["torch.distributed.ProcessGroup"] = None) -> Backend:
    """The Backend of --moe-backend `choice` for a layer on `device` (experts sharded over
    `expert_group` when given)."""
    assert choice in MOE_BACKENDS, choice          # MoEConfig validated it
    if choice == "triton" and not triton_available():
        raise RuntimeError("--moe-backend triton needs the triton package")
    backend = TORCH if device.type == "cuda" else TORCH_OFF_CUDA
    if choice == "triton" or (choice == "auto" and device.type == "cuda"
                              and triton_available()):
        from megatron.model.moe import ops       # resolved eagerly: never inside traced code

        backend = Backend("triton", ops.triton_router_logits, ops.triton_threshold_slots,
                          ops.triton_capacity, ops.triton_experts)
    if expert_group is not None:
        backend = dataclasses.replace(
            backend, experts=functools.partial(expert_parallel_moe, group=expert_group))
    return backend


def _name(fn: Any) -> str:
    """A strategy's function name (that of the wrapped function for a partial)."""
    return _name(fn.func) if isinstance(fn, functools.partial) else fn.__name__
