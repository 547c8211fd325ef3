"""The model, optimizer and DeepSpeed engine of a run: precision, expert parallelism, compile.

    built = setup_model_and_optimizer(run, device, train_iters)
    built.engine, built.model, built.scheduler, built.expert_parallel, built.own_clipping

`BuiltRun` carries what the training loop needs, decided once here: the expert-parallel groups
and whether we clip (`own_clipping`), so `Trainer` re-derives nothing. `deepspeed_engine` builds
the model inside DeepSpeed 0.19.8's engine and is the one place that works around the engine
(its docstring lists each workaround and why).

Mixed precision and the fp32 router on DeepSpeed's own path (fp16, bf16 at ZeRO 1/2): with
bf16/fp16 enabled, DeepSpeed 0.19.8 casts EVERY floating parameter of the module to the half
dtype in `_configure_distributed_model` (`_cast_module_mixed_precision`; its
keep_in_fp32_modules setting covers buffers only), so the router's `gate_weight`, created fp32,
is stored in bf16/fp16 in the engine's module while the optimizer keeps its fp32 master copy.
`MoELayer.router_logits` upcasts the input and the weight (`.float()`; the Triton router GEMM of
bf16 runs reads the weight as fp32), so the router matmul, softmax and routing decisions still
run in fp32, on weights rounded to the half dtype once per step. Casting the weight back to fp32
after initialize would detach it from the optimizer's half/master pairing (the router would stop
training), so we do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from megatron.arguments import RunConfig
from megatron.deepspeed_config import deepspeed_config_dict
from megatron.expert_groups import (ExpertParallelGroups, attach_deepspeed_moe_marker,
                                    create_expert_parallel_groups, tag_expert_parameters)
from megatron.learning_rates import LRScheduler
from megatron.mixed_precision import cast_model_to_bf16
from megatron.model import GPTModel
from megatron.model.moe import shard_moe_layers_
from megatron.optimizer import build_optimizer


@dataclass(frozen=True)
class BuiltRun:
    """What `setup_model_and_optimizer` builds, and the policies the training loop follows."""

    engine: Any                                     # deepspeed.DeepSpeedEngine
    model: GPTModel                                 # engine.module
    scheduler: Optional[LRScheduler]                # None with --eval-only
    expert_parallel: Optional[ExpertParallelGroups]  # None without expert parallelism
    own_clipping: bool                              # we take the norm and clip (own_clipping)


def own_bf16(run: RunConfig) -> bool:
    """bf16 at ZeRO stage 0 runs on our master-weight AdamW, not DeepSpeed's bf16 wrapper
    (megatron/mixed_precision.py says why)."""
    return run.training.bf16 and run.training.zero_stage == 0


def own_clipping(run: RunConfig) -> bool:
    """Whether we compute the gradient norm and clip instead of DeepSpeed: whenever its ZeRO or
    fp16 optimizers are not in charge (fp32, and bf16 on our master-weight AdamW, at ZeRO 0).
    There DeepSpeed's fp32 clipping records no norm, and under expert parallelism averages
    per-rank norms that each see one expert shard; ours (expert_groups.global_grad_norm) counts
    every shard once. Its ZeRO and fp16 optimizers sum the shards' squares correctly."""
    t = run.training
    return not (t.fp16 or t.zero_stage > 0)


def compile_model(model: torch.nn.Module, backend: str) -> None:
    """torch.compile the model in place (--compile): the engine calls engine.module, whose
    forward is then the compiled one; parameter names and checkpoints are unchanged. Off CUDA
    the MoE experts step stays eager inside it (backend.prepare_for_compile)."""
    from megatron.model.moe.backend import prepare_for_compile

    prepare_for_compile()
    model.compile(backend=backend)


def expert_parallel_groups(run: RunConfig) -> Optional[ExpertParallelGroups]:
    """DeepSpeed's expert-parallel groups for --moe-expert-parallel-size > 1, else None."""
    size = run.model.moe.expert_parallel_size
    return create_expert_parallel_groups(size) if size > 1 else None


def deepspeed_engine(run: RunConfig, device: torch.device,
                     expert_parallel: Optional[ExpertParallelGroups]
                     ) -> Tuple[Any, torch.optim.Optimizer]:
    """(engine, our optimizer): GPTModel on `device` (sharded over `expert_parallel` when
    given) and our AdamW inside DeepSpeed 0.19.8's engine, with these workarounds:

    1. fp16 at ZeRO stage 0 is refused, before anything is built: the engine's backward scales
       the loss only for ZeRO optimizers, but its stage-0 fp16 optimizer still divides the
       gradients by the loss scale (2**32 at first): updates vanish and the loss stalls (seen
       on an H200; deepspeedai/DeepSpeed#8393). fp16 with ZeRO 1 or 2 trains (verified on an
       H200: it skips overflowed steps while the loss scale falls from 2**32).
    2. bf16 at ZeRO 0 (`own_bf16`) does not go through DeepSpeed's mixed precision: the model
       is cast here (routers kept fp32), DeepSpeed's bf16 is switched off so that it adds no
       optimizer wrapper, and our master-weight AdamW steps (megatron/mixed_precision.py); this
       removes ~150 host syncs per step.
    3. Expert parallelism: every rank builds the whole model from the same seed, keeps its
       shard of each MoE layer's experts and tags them for DeepSpeed; the engine honours the
       tags only if the model holds a module of its own MoE class, so a parameterless marker
       is attached (megatron/expert_groups.py).
    4. DeepSpeed's gradient clipping is off (gradient_clipping 0) when `own_clipping`: there it
       records no norm and, under expert parallelism, averages per-rank norms of different
       expert shards; Trainer.train_step takes the global norm and clips instead.
    5. The backward all-reduce is off on one rank (no data or expert parallelism, ZeRO 0):
       nothing to reduce, but the engine would still flatten, "all-reduce" and copy back every
       gradient at each boundary (~6 ms of host time per step on an H200).
    """
    import deepspeed  # heavy; imported where the engine is built

    t = run.training
    if t.fp16 and t.zero_stage == 0:                                        # 1
        raise ValueError(f"--fp16 with ZeRO stage 0 does not train with DeepSpeed "
                         f"{deepspeed.__version__} (the loss is never scaled, the gradients are "
                         "unscaled; deepspeedai/DeepSpeed#8393): use --bf16, or --fp16 with "
                         "--zero-stage 1 or 2")
    model = GPTModel(run.model).to(device)
    ds_config = deepspeed_config_dict(run)
    if own_bf16(run):                                                       # 2
        cast_model_to_bf16(model)                       # routers stay fp32
        ds_config["bf16"] = {"enabled": False}          # DeepSpeed adds no optimizer wrapper
        ds_config.pop("bfloat16", None)
    if expert_parallel is not None:                                         # 3
        shard_moe_layers_(model, expert_parallel.group)
        tag_expert_parameters(model, expert_parallel.name)
        attach_deepspeed_moe_marker(model, expert_parallel)
    if own_clipping(run):                                                   # 4
        ds_config["gradient_clipping"] = 0.0            # Trainer.train_step clips
    optimizer = build_optimizer(model, run.optimizer,
                                expert_group_name=expert_parallel and expert_parallel.name,
                                master_weights=own_bf16(run))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine.dp_world_size == 1 and expert_parallel is None and t.zero_stage == 0:   # 5
        engine.enable_backward_allreduce = False
    return engine, optimizer


def setup_model_and_optimizer(run: RunConfig, device: torch.device, train_iters: int
                              ) -> BuiltRun:
    """The run's engine (`deepspeed_engine`), compiled with --compile, its expert-parallel
    groups (created here, once, when --moe-expert-parallel-size > 1; every rank must call),
    our LR scheduler (None with --eval-only; its default horizon is train_iters) and the
    clipping policy."""
    t = run.training
    expert_parallel = expert_parallel_groups(run)
    engine, optimizer = deepspeed_engine(run, device, expert_parallel)
    if t.compile is not None:
        compile_model(engine.module, t.compile)
    scheduler = None        # --eval-only: nothing is stepped, the checkpoint's schedule unused
    if not t.eval_only:
        scheduler = LRScheduler(optimizer, run.optimizer, train_iters=train_iters,
                                global_batch_size=t.global_batch_size, seq_length=t.seq_length)
    return BuiltRun(engine=engine, model=engine.module, scheduler=scheduler,
                    expert_parallel=expert_parallel, own_clipping=own_clipping(run))
