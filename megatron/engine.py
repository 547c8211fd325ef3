"""The model, optimizer and DeepSpeed engine of a run: precision, expert parallelism, compile.

    setup_model_and_optimizer(run, device, train_iters) -> (engine, model, LRScheduler)

bf16 at ZeRO stage 0 does not go through DeepSpeed's mixed precision: the model is cast here
(routers kept fp32) and stepped by our master-weight AdamW (megatron/mixed_precision.py), which
removes ~150 host syncs per step. What follows describes DeepSpeed's path (fp16, ZeRO 1/2).

Mixed precision and the fp32 router: with bf16/fp16 enabled, DeepSpeed 0.19.8 casts EVERY
floating parameter of the module to the half dtype in `_configure_distributed_model`
(`_cast_module_mixed_precision`; its keep_in_fp32_modules setting covers buffers only), so the
router's `gate_weight`, created fp32, is stored in bf16/fp16 in the engine's module while the
optimizer keeps its fp32 master copy. `MoELayer.router_logits` upcasts the input and the weight
(`.float()`; the Triton router GEMM of bf16 runs reads the weight as fp32), so the router matmul, softmax and routing decisions still run in fp32, on weights
rounded to the half dtype once per step. Casting the weight back to fp32 after initialize would
detach it from the optimizer's half/master pairing (the router would stop training), so we do not.
fp16 needs ZeRO stage 1 or 2 with DeepSpeed 0.19.8 (see setup_model_and_optimizer); verified on
an H200: fp16 + ZeRO 1 trains, skipping overflowed steps while the loss scale falls from 2**32.
"""

from __future__ import annotations

from typing import Optional

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
    forward is then the compiled one; parameter names and checkpoints are unchanged."""
    model.compile(backend=backend)


def expert_parallel_groups(run: RunConfig) -> Optional[ExpertParallelGroups]:
    """DeepSpeed's expert-parallel groups for --moe-expert-parallel-size > 1, else None."""
    size = run.model.moe.expert_parallel_size
    return create_expert_parallel_groups(size) if size > 1 else None


def setup_model_and_optimizer(run: RunConfig, device: torch.device, train_iters: int,
                              expert_parallel: Optional[ExpertParallelGroups] = None):
    """(engine, model, LRScheduler or None with --eval-only): GPTModel on `device`, our AdamW,
    DeepSpeed's engine; the schedule's default horizon is train_iters.

    With expert parallelism (`expert_parallel`, from `expert_parallel_groups`) every rank builds
    the whole model from the same seed, keeps its shard of each MoE layer's experts and tags
    them for DeepSpeed (see megatron/expert_groups.py).
    """
    import deepspeed  # heavy; imported where the engine is built

    t = run.training
    if t.fp16 and t.zero_stage == 0:
        # DeepSpeed 0.19.8's engine.backward scales the loss only for ZeRO optimizers, but its
        # stage-0 fp16 optimizer still divides the gradients by the loss scale (2**32 at first):
        # updates vanish and the loss stalls (seen on an H200; deepspeedai/DeepSpeed#8393).
        raise ValueError(f"--fp16 with ZeRO stage 0 does not train with DeepSpeed "
                         f"{deepspeed.__version__} (the loss is never scaled, the gradients are "
                         "unscaled; deepspeedai/DeepSpeed#8393): use --bf16, or --fp16 with "
                         "--zero-stage 1 or 2")
    if run.model.moe.expert_parallel_size > 1 and expert_parallel is None:
        expert_parallel = expert_parallel_groups(run)
    model = GPTModel(run.model).to(device)
    ds_config = deepspeed_config_dict(run)
    if own_bf16(run):
        cast_model_to_bf16(model)                       # routers stay fp32
        ds_config["bf16"] = {"enabled": False}          # DeepSpeed adds no optimizer wrapper
        ds_config.pop("bfloat16", None)
    if expert_parallel is not None:
        shard_moe_layers_(model, expert_parallel.group)
        tag_expert_parameters(model, expert_parallel.name)
        attach_deepspeed_moe_marker(model, expert_parallel)
    if own_clipping(run):
        ds_config["gradient_clipping"] = 0.0            # Trainer.train_step clips
    optimizer = build_optimizer(model, run.optimizer,
                                expert_group_name=expert_parallel and expert_parallel.name,
                                master_weights=own_bf16(run))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if t.compile is not None:
        compile_model(engine.module, t.compile)
    if engine.dp_world_size == 1 and expert_parallel is None and t.zero_stage == 0:
        # One rank: nothing to reduce, but the engine would still flatten, "all-reduce" and
        # copy back every gradient at each boundary (~6 ms of host time per step on an H200).
        engine.enable_backward_allreduce = False
    if t.eval_only:         # nothing is stepped; the checkpoint's schedule is not needed
        return engine, engine.module, None
    scheduler = LRScheduler(optimizer, run.optimizer, train_iters=train_iters,
                            global_batch_size=t.global_batch_size, seq_length=t.seq_length)
    return engine, engine.module, scheduler
