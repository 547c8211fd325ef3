"""bf16 training without DeepSpeed's bf16 optimizer wrapper: fp32 master weights in our AdamW.

With `--bf16` and ZeRO stage 0, DeepSpeed 0.19.8 wraps the optimizer in its FP16_Optimizer
(bf16 mode), which checks every gradient for inf/NaN with one host sync per parameter and copies
masters parameter by parameter: ~150 host syncs and ~60 ms of host time per step on an H200
(measured by benchmarks/train_throughput.py; a plain PyTorch loop on the same model ran 2.2x
faster). bf16 needs no loss scaling, so none of that is needed. Instead:

- the model is cast to bf16 here, except the MoE routers' `gate_weight`, which stays fp32 (the
  router runs in fp32 anyway; DeepSpeed's cast rounded its weight to bf16 every step);
- DeepSpeed gets an fp32 config (it adds no wrapper and leaves the dtypes alone), so its engine
  only reduces gradients across data-parallel ranks and calls `MasterWeightAdamW.step`;
- `MasterWeightAdamW` keeps an fp32 master copy of every bf16 parameter. On CUDA its step is
  one Triton kernel per parameter group and variant (megatron/kernels/adamw.py): it reads the
  bf16 gradient, the master, exp_avg and exp_avg_sq and writes them back with the bf16
  parameter, 28 bytes per parameter instead of the 44 of clipping and the torch ops below
  (bytes counted in that module's docstring). Elsewhere (CPU, the reference): copy the bf16
  gradients into the masters' fp32 .grad (foreach), torch's AdamW on the masters, copy the
  masters back into the bf16 parameters (foreach). No host sync on either path.
- Gradient clipping: megatron.training takes the global norm (foreach, on the device) and hands
  it to `clip_at_step`; the next step scales the gradients by DeepSpeed's coefficient
  min(1, max_norm / (norm + 1e-6)): inside the kernel on the fp32 value of each bf16 gradient,
  or on the torch path in place on the gradients, as `expert_groups.clip_gradients_` does
  (so the CPU path is bit for bit what it was when the training loop clipped).

The optimizer state is torch's: the inner torch AdamW owns exp_avg / exp_avg_sq / step of every
master, and the kernel updates those tensors in place (allocating them as torch would at a
parameter's first step), so state_dict / load_state_dict, checkpoints and resumption are the
same on both paths and a checkpoint moves between them. The bias corrections need each
parameter's step count: the kernel path keeps it on the host (read from the state at
construction and load, then counted), so it never reads the device step tensors.

Gradient accumulation over micro-batches sums into the bf16 .grad (as DeepSpeed's bf16 wrapper
at stage 0 did). ZeRO 1/2 keep DeepSpeed's own bf16 optimizers (partitioned masters).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype

STATE_FORMAT = "xmoe_master_weights_v1"
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def cast_model_to_bf16(model: nn.Module, keep_fp32: Optional[List[str]] = None) -> None:
    """bf16 parameters, except those whose name ends with one of keep_fp32 (default: the MoE
    routers' "gate_weight"). Buffers keep their dtype."""
    keep = tuple(keep_fp32 if keep_fp32 is not None else ["gate_weight"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith(keep):
                p.data = p.data.to(torch.bfloat16)


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) on total_norm's device: DeepSpeed's rule, in
    the operations of torch.nn.utils.clip_grads_with_norm_."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def _kernel_importable() -> bool:
    try:
        from megatron.kernels import adamw  # noqa: F401
        return True
    except (ImportError, RuntimeError):     # no triton, or one that cannot load here
        return False


def use_kernel(params: List[torch.Tensor], kernel: Optional[bool]) -> bool:
    """Whether MasterWeightAdamW steps with the Triton kernel. kernel None: when every
    parameter is a bf16 or fp32 CUDA tensor and triton imports. kernel True (the tests): on
    CUDA, or on CPU under triton's interpreter (TRITON_INTERPRET=1); ValueError otherwise."""
    if kernel is False or not params:
        return False
    supported = all(p.dtype in KERNEL_DTYPES for p in params)
    if kernel is None:
        return supported and all(p.is_cuda for p in params) and _kernel_importable()
    if not supported:
        raise ValueError("the master-weight AdamW kernel takes bf16 and fp32 parameters only")
    if not all(p.is_cuda for p in params) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the master-weight AdamW kernel needs a CUDA device (on CPU only "
                         "under TRITON_INTERPRET=1, triton's interpreter, as the tests run it)")
    return True


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose update runs on fp32 master copies of low-precision parameters.

    param_groups: the model's parameters (what DeepSpeed, the LR scheduler and clipping see),
    with the usual AdamW hyperparameters; they are copied into the inner optimizer's groups at
    every step. fp32 parameters are their own masters. kernel: step with the Triton kernel
    (None: on CUDA, see `use_kernel`; False: torch's AdamW).
    """

    def __init__(self, param_groups: List[Dict[str, Any]], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: Optional[bool] = None,
                 kernel: Optional[bool] = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(param_groups, defaults)
        self.masters: List[List[torch.Tensor]] = []
        inner_groups = []
        for group in self.param_groups:
            masters = [p if p.dtype == torch.float32 else
                       p.detach().float().clone().requires_grad_(True) for p in group["params"]]
            self.masters.append(masters)
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": masters})
        on_cuda = all(m.is_cuda for ms in self.masters for m in ms)
        use_fused = on_cuda if fused is None else fused
        kwargs = dict(fused=True) if use_fused else dict(foreach=True)
        self.inner = torch.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay, **kwargs)
        # (params, masters) of the parameters with a separate master, fixed once.
        pairs = [(p, m) for group, ms in zip(self.param_groups, self.masters)
                 for p, m in zip(group["params"], ms) if m is not p]
        self._params = [p for p, _ in pairs]
        self._masters = [m for _, m in pairs]
        self._clip: Optional[Tuple[float, torch.Tensor]] = None
        everything = [p for group in self.param_groups for p in group["params"]]
        self.kernel = KernelStep(self) if use_kernel(everything, kernel) else None

    def _low_precision_pairs(self):
        """(params, masters) lists of the parameters with a separate master."""
        return self._params, self._masters

    def clip_at_step(self, max_norm: float, total_norm: torch.Tensor) -> None:
        """Have the next step scale every gradient by min(1, max_norm / (total_norm + 1e-6))
        (DeepSpeed's rule; total_norm: the global norm on the device, no host sync)."""
        self._clip = (max_norm, total_norm)

    @torch.no_grad()
    def step(self, closure=None):
        """Clip (if asked); AdamW on the masters of the parameters with a gradient; params <-
        masters. Kernel: all in one pass; torch: masters' .grad <- params' .grad (fp32),
        torch's AdamW, params <- masters."""
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step does not take a closure")
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            for key in HYPERPARAMETERS:
                inner[key] = group[key]
        clip, self._clip = self._clip, None
        if self.kernel is not None:
            self.kernel.step(None if clip is None else clip_coefficient(*clip))
        else:
            self._torch_step(clip)

    def _torch_step(self, clip: Optional[Tuple[float, torch.Tensor]]) -> None:
        if clip is not None:        # the bf16 gradients, as expert_groups.clip_gradients_
            torch.nn.utils.clip_grads_with_norm_(
                [p for group in self.param_groups for p in group["params"]], *clip)
        params, masters = self._low_precision_pairs()
        with_grad = [(p, m) for p, m in zip(params, masters) if p.grad is not None]
        for p, m in with_grad:
            if m.grad is None:
                m.grad = torch.empty_like(m)
        for p, m in zip(params, masters):
            if p.grad is None:
                m.grad = None           # no gradient this step: AdamW skips it, as for p
        if with_grad:
            torch._foreach_copy_([m.grad for _, m in with_grad], [p.grad for p, _ in with_grad])
        self.inner.step()
        if params:
            torch._foreach_copy_(params, masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.inner.zero_grad(set_to_none)

    @torch.no_grad()
    def refresh_fp32_params(self) -> None:
        """Masters <- params (after weights were loaded into the model only)."""
        params, masters = self._low_precision_pairs()
        if params:
            torch._foreach_copy_(masters, params)

    def state_dict(self) -> Dict[str, Any]:
        params, masters = self._low_precision_pairs()
        return {"format": STATE_FORMAT, "inner": self.inner.state_dict(),
                "masters": [m.detach().clone() for m in masters],
                "hyperparameters": [{k: g[k] for k in HYPERPARAMETERS}
                                    for g in self.param_groups]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("the checkpoint's optimizer state was not saved by "
                             "MasterWeightAdamW (bf16 with ZeRO 0 since this version); load it "
                             "with --no-load-optim")
        params, masters = self._low_precision_pairs()
        saved = state_dict["masters"]
        if len(saved) != len(masters) or any(a.shape != b.shape for a, b in zip(saved, masters)):
            raise ValueError("the checkpoint's fp32 master weights do not match the model")
        self.inner.load_state_dict(state_dict["inner"])
        for m, s in zip(masters, saved):
            m.copy_(s)
        for group, hyper in zip(self.param_groups, state_dict["hyperparameters"]):
            group.update(hyper)
        if self.kernel is not None:
            self.kernel = KernelStep(self)      # new state tensors, step counts from the state


class KernelStep:
    """MasterWeightAdamW.step on the Triton kernel (megatron/kernels/adamw.py).

    Each step, a group's parameters with a gradient are split by step count and variant (bf16
    with a master, fp32 self-master); normally that is one or two launches per group, whose
    address tables are built at the first step and reused while the parameters stay where
    they are (checked on the host each step: a moved parameter rebuilds its tables). Then one
    foreach add advances the stepped parameters' step tensors.
    """

    def __init__(self, opt: MasterWeightAdamW):
        self.opt = opt
        self.launches: Dict[Tuple[int, Tuple[int, ...]], Any] = {}
        self.counts = [[int(opt.inner.state[m]["step"]) if opt.inner.state.get(m) else 0
                        for m in masters] for masters in opt.masters]
        device = next(m for masters in opt.masters for m in masters).device
        self.one = torch.ones((), dtype=torch.float32, device=device)   # "no clipping"

    def step(self, clip_scale: Optional[torch.Tensor]) -> None:
        opt, scale = self.opt, self.one if clip_scale is None else clip_scale
        steps: List[torch.Tensor] = []
        for g, (group, masters) in enumerate(zip(opt.param_groups, opt.masters)):
            params, counts = group["params"], self.counts[g]
            buckets: Dict[Tuple[int, bool], List[int]] = {}
            for j, p in enumerate(params):
                if p.grad is not None:
                    buckets.setdefault((counts[j], masters[j] is p), []).append(j)
            beta1, beta2 = group["betas"]
            for (count, _), indices in buckets.items():
                launch, launch_steps = self._launch(g, tuple(indices))
                launch.step([params[j].grad for j in indices], scale, lr=group["lr"],
                            weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2,
                            eps=group["eps"], step=count + 1)
                for j in indices:
                    counts[j] += 1
                steps += launch_steps
        if steps:
            torch._foreach_add_(steps, 1)

    def _launch(self, g: int, indices: Tuple[int, ...]):
        """(MultiTensorAdamW, step tensors) of group g's parameters `indices`, built (and the
        state allocated) at first use or when a parameter moved."""
        params = [self.opt.param_groups[g]["params"][j] for j in indices]
        pointers = [p.data_ptr() for p in params]
        cached = self.launches.get((g, indices))
        if cached is not None and cached[0] == pointers:
            return cached[1], cached[2]
        from megatron.kernels.adamw import MultiTensorAdamW

        masters = [self.opt.masters[g][j] for j in indices]
        states = [self._state(g, m) for m in masters]
        launch = MultiTensorAdamW(masters, [s["exp_avg"] for s in states],
                                  [s["exp_avg_sq"] for s in states],
                                  None if masters[0] is params[0] else params)
        steps = [s["step"] for s in states]
        self.launches[(g, indices)] = (pointers, launch, steps)
        return launch, steps

    def _state(self, g: int, master: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The inner AdamW's state of `master`, created as torch's Adam._init_group does at a
        parameter's first step (step tensor on the device only when fused or capturable)."""
        state = self.opt.inner.state[master]
        if len(state) == 0:
            inner = self.opt.inner.param_groups[g]
            assert not inner["amsgrad"] and not inner["maximize"]
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=inner["fused"]),
                            device=master.device)
                if inner["capturable"] or inner["fused"]
                else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"))
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        return state
