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
- `MasterWeightAdamW` keeps an fp32 master copy of every bf16 parameter: step = copy the bf16
  gradients into the masters' fp32 .grad (one foreach kernel), AdamW on the masters (torch's
  fused kernel on CUDA), copy the masters back into the bf16 parameters (one foreach kernel).
  No host sync. Gradient clipping happens before step, in megatron.training (global norm,
  foreach, on the device).

Gradient accumulation over micro-batches sums into the bf16 .grad (as DeepSpeed's bf16 wrapper
at stage 0 did). ZeRO 1/2 keep DeepSpeed's own bf16 optimizers (partitioned masters).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

STATE_FORMAT = "xmoe_master_weights_v1"
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")


def cast_model_to_bf16(model: nn.Module, keep_fp32: Optional[List[str]] = None) -> None:
    """bf16 parameters, except those whose name ends with one of keep_fp32 (default: the MoE
    routers' "gate_weight"). Buffers keep their dtype."""
    keep = tuple(keep_fp32 if keep_fp32 is not None else ["gate_weight"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not name.endswith(keep):
                p.data = p.data.to(torch.bfloat16)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW whose update runs on fp32 master copies of low-precision parameters.

    param_groups: the model's parameters (what DeepSpeed, the LR scheduler and clipping see),
    with the usual AdamW hyperparameters; they are copied into the inner optimizer's groups at
    every step. fp32 parameters are their own masters.
    """

    def __init__(self, param_groups: List[Dict[str, Any]], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: Optional[bool] = None):
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

    def _low_precision_pairs(self):
        """(params, masters) lists of the parameters with a separate master."""
        return self._params, self._masters

    @torch.no_grad()
    def step(self, closure=None):
        """Masters' .grad <- params' .grad (fp32); AdamW on the masters; params <- masters."""
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step does not take a closure")
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
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            for key in HYPERPARAMETERS:
                inner[key] = group[key]
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
