"""Profile a few training steps and say where their GPU kernel time goes (CPU op time on CPU).

Each CPU op's self device time is the kernels it launched itself, so summing it over the op
tree counts every kernel once; on CPU an op's self CPU time stands in for its kernels (the
record_function ranges below are left out there: their self time is Python, not ops).

Categories (CATEGORIES), eager only. Forward: a kernel belongs to the innermost range opened by
module hooks around the modules a caller names (`modules`: (module, category) pairs). Backward:
autograd numbers the nodes it creates in creation order (per thread, all forward ops run on
one), and the profiler records with each op the number the next node will get; a range's
nodes are numbered from what its first op records up to what the first op after it records
(exclusive: the range's own last record may be the next node's, created outside it), and a
node belongs to the category of the narrowest range holding its number (of equal ones, the
inner: a module whose forward only calls another holds the same nodes). Kernels under no
module range and no autograd node take the category of their phase (PHASE_CATEGORY);
autograd nodes created outside every range (gradient accumulation into .grad, a loss sum
outside the model) and kernels outside every phase are unattributed. Under torch.compile
kernels fuse across module boundaries and hooks would force recompiles: callers pass no
modules and get no categories.

Phases (PHASES), always: ranges opened by wrapping the callables a step calls (`phases`:
(owner, attribute name, phase) triples, patched for the profiled steps only; a missing
attribute is skipped), plus torch.optim's own "Optimizer.step#" ranges (the optimizer phase).
A kernel's phase is "backward" under an autograd node, else that of the innermost phase range
around it in time (autograd runs GPU backward on a thread of its own, so ancestry alone would
miss it), else "outside phases".

The MoE share (category "MoE layers"): router, dispatch, expert GEMMs, combine, aux loss and
statistics of each MoELayer forward, and their backward; gradient accumulation into DeepSpeed's
buffers and the optimizer do not count.

The all-to-all time (expert parallelism): the union of the time spans of NCCL's all-to-all
kernels on GPU (NCCL runs all_to_all_single as grouped send/recv: `ncclDevKernel_SendRecv`;
names with AllToAll / all_to_all count too), or of the c10d / gloo all-to-all ops on CPU (gloo
runs them on worker threads: the op's span is the exchange, peers' wait included). A union, so
that an op and the work it enqueued are counted once.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

EMBEDDING, ATTENTION, DENSE_FFN, MOE = ("embedding (word+position)", "attention", "dense FFN",
                                       "MoE layers")
OTHER, OUTPUT, GRAD_NORM, OPTIMIZER = ("other transformer ops", "output layer + loss",
                                       "gradient norm + clipping", "optimizer step")
ENGINE, UNATTRIBUTED = "DeepSpeed engine", "unattributed"
CATEGORIES = (EMBEDDING, ATTENTION, DENSE_FFN, MOE, OTHER, OUTPUT, GRAD_NORM, OPTIMIZER, ENGINE,
              UNATTRIBUTED)
PHASES = ("forward", "backward", "grad norm/clip", "optimizer", "engine", "outside phases")
# A kernel under a phase range but under no module range or autograd node: its category.
PHASE_CATEGORY = {"forward": OUTPUT, "backward": UNATTRIBUTED, "grad norm/clip": GRAD_NORM,
                  "optimizer": OPTIMIZER, "engine": ENGINE}

MODULE_RANGE = "step_profile/module/"
PHASE_RANGE = "step_profile/phase/"
TORCH_OPTIMIZER_RANGE = "Optimizer.step#"
AUTOGRAD_NODE = "autograd::engine::evaluate_function:"
ALL_TO_ALL = re.compile(r"all_?to_?all|sendrecv", re.IGNORECASE)


@dataclasses.dataclass
class StepProfile:
    """Per-step milliseconds over the profiled steps (CPU op time on CPU)."""

    steps: int                                   # profiled steps
    kernel_ms: float
    phases: Dict[str, float]                     # PHASES -> ms, sums to kernel_ms
    categories: Optional[Dict[str, float]]       # CATEGORIES -> ms (None when compiled)
    all_to_all_ms: float
    unlinked_ms: float = 0.0                     # GPU kernels linked to no CPU op (in kernel_ms)
    # GPU events (kernels, copies, sets) per step: each is followed by a short idle gap on the
    # GPU, so a step of many small kernels idles more between them (0 on CPU)
    kernels_per_step: float = 0.0

    @property
    def moe_ms(self) -> Optional[float]:
        return None if self.categories is None else self.categories[MOE]


def profile_steps(step: Callable[[], object], steps: int, device: torch.device,
                  modules: Optional[Sequence[Tuple[nn.Module, str]]],
                  phases: Sequence[Tuple[object, str, str]], print_table: bool = False,
                  name: str = "") -> StepProfile:
    """Profile `steps` calls of `step` with module ranges around `modules` (None: compiled, no
    categories) and phase ranges around `phases`, and say where the time went."""
    cuda = device.type == "cuda"
    prof = record(step, steps, device, modules or (), phases)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if print_table:
        print(f"--- top kernels, {name}, {steps} steps (times are totals over the steps)")
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    events = prof.events()
    categories, phase_us = attribute(events, cuda)
    total = sum(phase_us.values())
    # Kernels the profiler links to no CPU op (Triton's launches through the driver API, seen
    # on the H200 with torch 2.11) are in no op's self device time: counted from the GPU's own
    # kernel events, reported apart, and part of the total.
    unlinked = max(device_kernel_us(events) - total, 0.0) if cuda else 0.0

    def per_step(us: float) -> float:
        return us / 1e3 / steps

    return StepProfile(
        steps=steps, kernel_ms=per_step(total + unlinked), unlinked_ms=per_step(unlinked),
        phases={p: per_step(phase_us[p]) for p in PHASES},
        categories=None if modules is None else {c: per_step(categories[c]) for c in CATEGORIES},
        all_to_all_ms=per_step(all_to_all_us(events, cuda)),
        kernels_per_step=len(device_events(events)) / steps if cuda else 0.0)


def record(step: Callable[[], object], steps: int, device: torch.device,
           modules: Sequence[Tuple[nn.Module, str]], phases: Sequence[Tuple[object, str, str]]
           ) -> profile:
    """The torch.profiler of `steps` calls of `step` (CUDA kernels too on a GPU), run with the
    module and phase ranges in place; hooks and patches are removed after."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(modules), phase_ranges(phases):
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize(device)
    return prof


# ----------------------------------------------------------------------------------------------
# the ranges


@contextlib.contextmanager
def module_ranges(modules: Sequence[Tuple[nn.Module, str]]) -> Iterator[None]:
    """A record_function range named after the category around every forward of each module."""
    hooks = []
    for module, category in modules:
        assert category in CATEGORIES, category
        open_ranges: List[record_function] = []     # a stack: a module may run re-entrantly

        def enter(m, args, _open=open_ranges, _name=MODULE_RANGE + category):
            _open.append(record_function(_name))
            _open[-1].__enter__()

        def leave(m, args, output, _open=open_ranges):
            _open.pop().__exit__(None, None, None)
        hooks += [module.register_forward_pre_hook(enter),
                  module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def phase_ranges(phases: Sequence[Tuple[object, str, str]]) -> Iterator[None]:
    """Replace owner.attribute by a wrapper that runs it inside a phase range, for each triple
    whose attribute exists (others: nothing to wrap); put the originals back after."""
    undo = []
    for owner, attribute, phase in phases:
        assert phase in PHASE_CATEGORY, phase
        original = getattr(owner, attribute, None)
        if original is None:
            continue
        in_dict = attribute in vars(owner)

        @functools.wraps(original)
        def wrapper(*args, _fn=original, _name=PHASE_RANGE + phase, **kwargs):
            with record_function(_name):
                return _fn(*args, **kwargs)
        setattr(owner, attribute, wrapper)
        undo.append((owner, attribute, original if in_dict else None))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(undo):
            if original is None:        # it was the class's: drop the instance attribute
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)


# ----------------------------------------------------------------------------------------------
# attribution


def attribute(events, cuda: bool) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({category: us}, {phase: us}) of the profiled CPU ops' self device (cuda) or CPU time;
    both sum to the same total."""
    categories = dict.fromkeys(CATEGORIES, 0.0)
    phases = dict.fromkeys(PHASES, 0.0)
    for event, us, category, phase in attributed_ops(events, cuda):
        categories[category] += us
        phases[phase] += us
    return categories, phases


def attributed_ops(events, cuda: bool) -> Iterator[Tuple[object, float, str, str]]:
    """(event, self time in us, category, phase) of every CPU op with self time."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    seq_ranges = _sequence_ranges(cpu)
    phase_spans = sorted(((e.time_range.start, e.time_range.end, _phase_of_range(e.name))
                          for e in cpu if _phase_of_range(e.name)),
                         key=lambda s: s[1] - s[0])         # narrowest first
    node_category: Dict[int, str] = {}
    for e in cpu:
        us = getattr(e, key)
        if us <= 0 or (not cuda and e.is_user_annotation):
            continue
        module_category, node = _innermost(e)
        phase = "backward" if _under_node(e) else _phase_at(e.time_range.start, phase_spans)
        if module_category is not None:
            category = module_category
        elif node is not None:
            if node.id not in node_category:
                node_category[node.id] = _narrowest(node.sequence_nr, seq_ranges)
            category = node_category[node.id]
        else:
            category = PHASE_CATEGORY.get(phase, UNATTRIBUTED)
        yield e, us, category, phase


def _category_of_range(name: str) -> Optional[str]:
    """The category a range stands for: its module's, or its phase's (None: not ours)."""
    if name.startswith(MODULE_RANGE):
        return name[len(MODULE_RANGE):]
    phase = _phase_of_range(name)
    return PHASE_CATEGORY[phase] if phase else None


def _phase_of_range(name: str) -> Optional[str]:
    if name.startswith(PHASE_RANGE):
        return name[len(PHASE_RANGE):]
    if name.startswith(TORCH_OPTIMIZER_RANGE):
        return "optimizer"
    return None


def _innermost(e) -> Tuple[Optional[str], Optional[object]]:
    """(category of the innermost module range, None) or (None, the innermost autograd node),
    whichever is nearer above `e` (itself included); (None, None) when neither is."""
    while e is not None:
        if e.name.startswith(MODULE_RANGE):
            return e.name[len(MODULE_RANGE):], None
        if e.name.startswith(AUTOGRAD_NODE):
            return None, e
        e = e.cpu_parent
    return None, None


def _under_node(e) -> bool:
    while e is not None:
        if e.name.startswith(AUTOGRAD_NODE):
            return True
        e = e.cpu_parent
    return False


def _phase_at(t: float, spans: List[Tuple[float, float, str]]) -> str:
    for start, end, phase in spans:                  # narrowest first: the innermost
        if start <= t < end:
            return phase
    return "outside phases"


def _sequence_ranges(cpu_events) -> List[Tuple[int, int, str]]:
    """[(first, last, category)] sequence numbers of the autograd nodes created under each of
    our ranges (module and phase ranges), narrowest (innermost) first.

    An op records the number the next node will get (ops that create no node record it too),
    so a range's nodes are numbered from what its first op records up to, not including, what
    the first op after the range records (a range's own last number could belong to the next
    node, created outside it). Only the forward thread's ops count, none under an autograd
    node (recomputation in backward numbers nodes on another thread).
    """
    forward: Dict[int, List[Tuple[float, int]]] = {}        # thread -> [(start, number)]
    ranges = []
    for e in cpu_events:
        if _category_of_range(e.name) and not _under_node(e):
            ranges.append(e)
        elif e.sequence_nr >= 0 and not _under_node(e):
            forward.setdefault(e.thread, []).append((e.time_range.start, e.sequence_nr))
    for ops in forward.values():
        ops.sort()
    starts_of = {thread: [t for t, _ in ops] for thread, ops in forward.items()}
    spans = []
    for r in ranges:
        ops, starts = forward.get(r.thread, []), starts_of.get(r.thread, [])
        i = bisect.bisect_left(starts, r.time_range.start)
        j = bisect.bisect_left(starts, r.time_range.end)
        if i >= j:                                          # no op with a number inside
            continue
        last = ops[j][1] - 1 if j < len(ops) else max(n for _, n in ops[i:j])
        if last >= ops[i][1]:
            # Equal spans (a range whose ops are all its child's: the engine's forward around
            # the model's) go to the inner range: the later start, then the deeper one.
            order = (last - ops[i][1], -r.time_range.start, -_depth(r))
            spans.append((order, (ops[i][1], last, _category_of_range(r.name))))
    return [span for _, span in sorted(spans, key=lambda s: s[0])]


def _depth(e) -> int:
    depth = 0
    while e.cpu_parent is not None:
        depth, e = depth + 1, e.cpu_parent
    return depth


def _narrowest(seq: int, spans: List[Tuple[int, int, str]]) -> str:
    for lo, hi, category in spans:                   # narrowest first
        if lo <= seq <= hi:
            return category
    return UNATTRIBUTED


def device_events(events) -> list:
    """Every GPU event (kernels, memcpy, memset), linked to an op or not; not the GPU-side
    copies of record_function ranges (user annotations), which span kernels."""
    return [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def device_kernel_us(events) -> float:
    """Summed duration of device_events."""
    return sum(e.time_range.elapsed_us() for e in device_events(events))


def all_to_all_us(events, cuda: bool) -> float:
    """Microseconds covered by all-to-all kernels (cuda) or CPU ops (else), overlaps once."""
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == kind and ALL_TO_ALL.search(e.name))
    total, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total
