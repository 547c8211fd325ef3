"""Profile a few training steps: GPU kernel time per step, and the part spent in MoE layers.

The MoE part: a forward kernel counts if it was launched under a record_function range opened
around each MoELayer's forward (module hooks); a backward kernel counts if it was launched by an
autograd node whose sequence number lies in the range of sequence numbers of the forward ops
under one of those ranges (autograd numbers nodes in creation order per thread, so these nodes
were created inside an MoE layer). Each CPU op's self device time is the kernels it launched
itself, so summing it over the op tree counts every kernel once. Router, dispatch, expert
GEMMs, combine, aux loss and statistics count; gradient accumulation into DeepSpeed's buffers
and the optimizer do not. Under torch.compile the kernels fuse across module boundaries (and
hooks would force recompiles), so only the total is measured there.

The all-to-all time (expert parallelism): the union of the time spans of NCCL's all-to-all
kernels on GPU (NCCL runs all_to_all_single as grouped send/recv: `ncclDevKernel_SendRecv`;
names with AllToAll / all_to_all count too), or of the c10d / gloo all-to-all ops on CPU (gloo
runs them on worker threads: the op's span is the exchange, peers' wait included). A union, so
that an op and the work it enqueued are counted once.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

MOE_RANGE = "moe_layer_"
ALL_TO_ALL = re.compile(r"all_?to_?all|sendrecv", re.IGNORECASE)


def profile_steps(trainer, steps: int, device: torch.device, print_table: bool, name: str,
                  compiled: bool) -> Tuple[float, Optional[float], float]:
    """(kernel ms per step, MoE-layer kernel ms per step or None when compiled, all-to-all ms
    per step) over `steps` profiled train steps (CPU time on CPU)."""
    layers = trainer.built.model.transformer.layers
    moe_layers = [] if compiled else [l.mlp for l in layers if l.is_moe]
    ranges, hooks = {}, []
    for layer in moe_layers:
        def enter(module, args, _n=layer.layer_number):
            ranges[_n] = record_function(f"{MOE_RANGE}{_n}")
            ranges[_n].__enter__()

        def leave(module, args, output, _n=layer.layer_number):
            ranges.pop(_n).__exit__(None, None, None)
        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        for h in hooks:
            h.remove()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if print_table:
        print(f"--- top kernels, {name}, {steps} steps (times are totals over the steps)")
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    # CPU ops only: each one's self device time is the kernels it launched itself, so the sum
    # over the op tree counts every kernel once (kernel events are listed besides them).
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    total_ms = sum(getattr(e, key) for e in events) / 1e3 / steps
    a2a_ms = all_to_all_us(prof.events(), cuda) / 1e3 / steps
    if compiled:
        return total_ms, None, a2a_ms
    seq_ranges = _moe_sequence_ranges(events)
    moe_ms = sum(getattr(e, key) for e in events if _in_moe(e, seq_ranges)) / 1e3 / steps
    return total_ms, moe_ms, a2a_ms


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


def _moe_sequence_ranges(events) -> List[Tuple[int, int]]:
    """[(first, last)] autograd sequence numbers of the forward ops under each MoE range."""
    by_range: Dict[int, List[int]] = {}
    for e in events:
        top = _moe_ancestor(e)
        if top is not None and e.sequence_nr >= 0:
            by_range.setdefault(top.id, []).append(e.sequence_nr)
    return [(min(s), max(s)) for s in by_range.values()]


def _moe_ancestor(e):
    while e is not None:
        if e.name.startswith(MOE_RANGE):
            return e
        e = e.cpu_parent
    return None


def _in_moe(e, seq_ranges: List[Tuple[int, int]]) -> bool:
    """Forward: under an MoE range. Backward: under an autograd node created inside one."""
    while e is not None:
        if e.name.startswith(MOE_RANGE):
            return True
        if e.name.startswith("autograd::engine::evaluate_function:"):
            return any(lo <= e.sequence_nr <= hi for lo, hi in seq_ranges)
        e = e.cpu_parent
    return False
