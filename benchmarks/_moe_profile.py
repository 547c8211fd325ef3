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
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

MOE_RANGE = "moe_layer_"


def profile_steps(trainer, steps: int, device: torch.device, print_table: bool, name: str,
                  compiled: bool) -> Tuple[float, Optional[float]]:
    """(kernel ms per step, MoE-layer kernel ms per step or None when compiled) over `steps`
    profiled train steps (CPU time on CPU)."""
    layers = trainer.model.transformer.layers
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
    if compiled:
        return total_ms, None
    seq_ranges = _moe_sequence_ranges(events)
    moe_ms = sum(getattr(e, key) for e in events if _in_moe(e, seq_ranges)) / 1e3 / steps
    return total_ms, moe_ms


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
