"""Pretraining: data, model and DeepSpeed engine, the training loop, evaluation, checkpoints.

    pretrain(run, vocab_size)
      1. torch.distributed through DeepSpeed, device, Megatron's seeds
      2. GPTModel -> our AdamW groups -> deepspeed.initialize (no LR scheduler: ours is stepped
         here with the tokens of each step) -> LRScheduler
      3. datasets (rank 0 builds the index caches, the others load them), --load
      4. --eval-only: validation and test, then exit; else the loop below, a final save,
         validation (unless just done) and test.

One iteration is one global batch: every micro-batch runs forward (lm loss = mean over tokens,
plus the MoE aux loss) and `engine.backward`, `engine.step` on each (DeepSpeed steps the
optimizer at the accumulation boundary); then the LR scheduler advances unless the step was
skipped (fp16 overflow).

bf16 at ZeRO stage 0 does not go through DeepSpeed's mixed precision: the model is cast here
(routers kept fp32) and stepped by our master-weight AdamW (megatron/mixed_precision.py), which
removes ~150 host syncs per step. What follows describes DeepSpeed's path (fp16, ZeRO 1/2).

Mixed precision and the fp32 router: with bf16/fp16 enabled, DeepSpeed 0.19.8 casts EVERY
floating parameter of the module to the half dtype in `_configure_distributed_model`
(`_cast_module_mixed_precision`; its keep_in_fp32_modules setting covers buffers only), so the
router's `gate_weight`, created fp32, is stored in bf16/fp16 in the engine's module while the
optimizer keeps its fp32 master copy. `MoELayer.router_logits` upcasts the input and the weight
(`.float()`), so the router matmul, softmax and routing decisions still run in fp32, on weights
rounded to the half dtype once per step. Casting the weight back to fp32 after initialize would
detach it from the optimizer's half/master pairing (the router would stop training), so we do not.
fp16 needs ZeRO stage 1 or 2 with DeepSpeed 0.19.8 (see setup_model_and_optimizer); verified on
an H200: fp16 + ZeRO 1 trains, skipping overflowed steps while the loss scale falls from 2**32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron.arguments import RunConfig
from megatron.checkpointing import load_checkpoint, save_checkpoint
from megatron.config import TrainingConfig
from megatron.data.data_samplers import build_pretraining_data_loader
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.deepspeed_config import deepspeed_config_dict
from megatron.evaluation import evaluate, forward_lm
from megatron.expert_groups import (ExpertParallelGroups, attach_deepspeed_moe_marker,
                                    clip_gradients_, create_expert_parallel_groups,
                                    global_grad_norm, tag_expert_parameters)
from megatron.initialize import (barrier, initialize_distributed, is_rank_0, print_rank_0,
                                 set_random_seed)
from megatron.learning_rates import LRScheduler
from megatron.mixed_precision import cast_model_to_bf16
from megatron.model import GPTModel
from megatron.model.moe import shard_moe_layers_
from megatron.optimizer import build_optimizer
from megatron.training_log import (FlopsModel, IntervalStats, StepReport, TensorBoardWriter,
                                   eval_block, iteration_line, moe_lines, moe_stats_tensors)

logger = logging.getLogger(__name__)


def total_train_iters(t: TrainingConfig) -> int:
    """Iterations to run: --train-iters, or enough to reach --train-tokens (whichever first)."""
    candidates = []
    if t.train_iters is not None:
        candidates.append(t.train_iters)
    if t.train_tokens is not None:
        candidates.append(math.ceil(t.train_tokens / t.tokens_per_step))
    return min(candidates) if candidates else 0


def sample_counts(t: TrainingConfig, train_iters: int) -> tuple[int, int, int]:
    """Megatron's (train, valid, test) sample counts: every iteration's global batch, every
    evaluation's (train_iters // eval_interval + 1) * eval_iters batches, test_iters batches."""
    gbs = t.global_batch_size
    test_iters = t.eval_iters if t.test_iters is None else t.test_iters
    return (train_iters * gbs, (train_iters // t.eval_interval + 1) * t.eval_iters * gbs,
            test_iters * gbs)


def build_datasets(run: RunConfig, counts: tuple[int, int, int], vocab_size: Optional[int]):
    """(train, valid, test) datasets; rank 0 builds the index caches, then the others load.

    An error on rank 0 (bad data, bad --split) is sent to every rank, so all stop with it
    instead of the others waiting at the barrier.
    """
    d, t = run.data, run.training
    kwargs = dict(data_prefix=list(d.data_path), splits_string=d.split,
                  train_valid_test_num_samples=tuple(max(n, 1) for n in counts),
                  seq_length=t.seq_length, seed=t.seed, cache_dir=d.data_cache_path,
                  vocab_size=vocab_size)
    datasets, error = None, None
    if is_rank_0():
        try:
            datasets = build_train_valid_test_datasets(build=True, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    barrier()
    if datasets is None:
        datasets = build_train_valid_test_datasets(build=False, **kwargs)
    return datasets


def data_iterator(dataset, consumed_samples: int, t: TrainingConfig, num_workers: int
                  ) -> Optional[Iterator]:
    """An iterator over this rank's micro-batches from `consumed_samples` on (None: no data).

    Creating a DataLoader iterator draws a base seed from the global torch RNG; it is drawn
    inside fork_rng so that a resumed run's RNG stream matches the uninterrupted run's.
    """
    if dataset is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    loader = build_pretraining_data_loader(dataset, consumed_samples, t.micro_batch_size, rank,
                                           t.data_parallel_size, num_workers=num_workers)
    with torch.random.fork_rng(devices=[]):
        return iter(loader)


@dataclasses.dataclass
class Trainer:
    """The built pieces of a run and the loop over them (see the module docstring)."""

    run: RunConfig
    engine: Any                                 # deepspeed.DeepSpeedEngine
    model: GPTModel                             # engine.module
    scheduler: Optional[LRScheduler]           # None with --eval-only
    device: torch.device
    total_iters: int
    datasets: tuple
    iteration: int = 0
    consumed_samples: int = 0
    start_time: float = dataclasses.field(default_factory=time.time)
    expert_parallel: Optional[ExpertParallelGroups] = None

    def __post_init__(self) -> None:
        if self.expert_parallel is None and self.run.model.moe.expert_parallel_size > 1:
            self.expert_parallel = expert_parallel_groups(self.run)   # the existing groups
        moe = [layer for layer in self.model.transformer.layers if layer.is_moe]
        self.stats = IntervalStats([m.layer_number for m in moe], [m.num_experts for m in moe])
        t = self.run.training
        self.flops = FlopsModel.of_model(self.model, t.seq_length, t.checkpoint_activations)
        self.tensorboard = TensorBoardWriter(
            self.run.logging.tensorboard_dir if is_rank_0() else None,
            self.run.logging.tensorboard_log_interval)
        # fp32 without ZeRO: DeepSpeed clips without recording the norm; compute it ourselves.
        # With expert parallelism its norm there is wrong, and bf16 at stage 0 is ours
        # (see own_clipping): we clip too.
        self.own_grad_norm = not (t.fp16 or t.zero_stage > 0)
        self.own_clip = own_clipping(self.run, self.expert_parallel)
        self.train_iter = self.valid_iter = None

    # ------------------------------------------------------------------------------------------
    # one iteration

    def train_step(self) -> StepReport:
        t, engine = self.run.training, self.engine
        lr = self.scheduler.get_lr()
        lm_sum = aux_sum = fields_sum = loads_sum = own_norm = None
        for _ in range(t.gradient_accumulation_steps):
            lm_loss, out = forward_lm(engine, next(self.train_iter), self.device)
            engine.backward(lm_loss + out.moe_aux_loss)
            if self.own_grad_norm and engine.is_gradient_accumulation_boundary():
                own_norm = global_grad_norm(engine.module, self.expert_parallel)
                if self.own_clip:
                    clip_gradients_(engine.module, self.run.optimizer.clip_grad, own_norm)
            engine.step()
            lm_sum = _add(lm_sum, lm_loss.detach())
            aux_sum = _add(aux_sum, out.moe_aux_loss.detach())
            if out.moe_stats:
                fields, loads = moe_stats_tensors(out.moe_stats)
                fields_sum, loads_sum = _add(fields_sum, fields), _add(loads_sum, loads)
        applied = engine.was_step_applied()
        if applied:
            self.scheduler.step(1, tokens=t.tokens_per_step)
        grad_norm = engine.get_global_grad_norm()
        n = t.gradient_accumulation_steps
        return StepReport(
            iteration=self.iteration + 1, lm_loss=lm_sum / n, aux_loss=aux_sum / n,
            grad_norm=own_norm if grad_norm is None else grad_norm, learning_rate=lr,
            loss_scale=_loss_scale(engine) if t.fp16 else 1.0,
            skipped=not applied, moe_fields=None if fields_sum is None else fields_sum / n,
            moe_loads=None if loads_sum is None else loads_sum / n)

    # ------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> bool:
        """Train to total_iters; True when --exit-interval / --exit-duration-in-mins stopped it."""
        t, ckpt = self.run.training, self.run.checkpoint
        self.engine.train()
        self._interval_start, self._excluded = time.time(), 0.0
        while self.iteration < self.total_iters:
            self.stats.add(self.train_step())
            self.iteration += 1
            self.consumed_samples += t.global_batch_size
            exiting = self._should_exit()
            last = exiting or self.iteration == self.total_iters
            if self.iteration % self.run.logging.log_interval == 0 or last:
                self._log_interval()
            if self.iteration % t.eval_interval == 0:
                self._excluded += self._timed(self.evaluate_valid)
            saved = False
            if ckpt.save and (self.iteration % ckpt.save_interval == 0 or exiting):
                self._excluded += self._timed(self.save)
                saved = True
            if exiting:
                if ckpt.save and not saved:
                    self.save()
                print_rank_0(f"exiting program at iteration {self.iteration}")
                return True
        return False

    def _should_exit(self) -> bool:
        t = self.run.training
        if t.exit_interval is not None and self.iteration % t.exit_interval == 0:
            return True
        if t.exit_duration_in_mins is None:
            return False
        # Rank 0's clock decides, so that every rank stops at the same iteration.
        done = torch.tensor(
            [float(time.time() - self.start_time > 60.0 * t.exit_duration_in_mins)],
            device=self.device)
        if dist.is_initialized():
            dist.broadcast(done, src=0)
        return bool(done.item())

    @staticmethod
    def _timed(fn) -> float:
        start = time.time()
        fn()
        return time.time() - start

    def _log_interval(self) -> None:
        t = self.run.training
        summary = self.stats.reduce()               # collective: every rank
        elapsed = max(time.time() - self._interval_start - self._excluded, 1e-9)
        self._interval_start, self._excluded = time.time(), 0.0
        if not is_rank_0():
            return
        used = [layer.values["used_per_token"] for layer in summary.moe_layers]
        flops = self.flops.per_iteration(t.global_batch_size, used)
        per_iter = elapsed / len(summary.iterations)
        world = dist.get_world_size() if dist.is_initialized() else 1
        tflops = flops / (per_iter * world * 1e12)
        print(iteration_line(summary, self.total_iters, self.consumed_samples, elapsed,
                             t.global_batch_size, t.seq_length, tflops), flush=True)
        if self.run.logging.log_moe_stats:
            for line in moe_lines(summary):
                print(line, flush=True)
        else:
            summary = dataclasses.replace(summary, moe_layers=[])
        self.tensorboard.write_interval(summary, t.global_batch_size * t.seq_length / per_iter)

    # ------------------------------------------------------------------------------------------
    # evaluation and checkpoints

    def _evaluate(self, what: str, iterator: Optional[Iterator], num_iters: int) -> None:
        if iterator is None or num_iters <= 0:
            return
        loss = evaluate(self.engine, iterator, num_iters,
                        self.run.training.gradient_accumulation_steps, self.device)
        print_rank_0(eval_block(what, self.iteration, loss))
        if is_rank_0():
            self.tensorboard.write_eval(what, self.iteration, loss)
            self.tensorboard.flush()

    def evaluate_valid(self) -> None:
        self._evaluate("validation", self.valid_iter, self.run.training.eval_iters)

    def evaluate_test(self) -> None:
        t = self.run.training
        test_iters = t.eval_iters if t.test_iters is None else t.test_iters
        it = data_iterator(self.datasets[2], 0, t, self.run.data.num_workers)
        self._evaluate("test", it, test_iters)

    def save(self) -> None:
        c = self.run.checkpoint
        save_checkpoint(self.engine, self.iteration, self.consumed_samples, self.scheduler,
                        dataclasses.asdict(self.run), c.save, save_rng=not c.no_save_rng,
                        expert_parallel=self.expert_parallel)
        print_rank_0(f"saved checkpoint at iteration {self.iteration:7d} to {c.save}")

    def load(self) -> None:
        c = self.run.checkpoint
        if c.load is None:
            return
        loaded = load_checkpoint(self.engine, self.scheduler, c.load,
                                 load_optimizer=not c.no_load_optim, load_rng=not c.no_load_rng,
                                 finetune=c.finetune, expert_parallel=self.expert_parallel)
        if loaded is None:
            print_rank_0(f"no checkpoint found in {c.load}: training from scratch")
            return
        self.iteration, self.consumed_samples = loaded
        print_rank_0(f"loaded checkpoint from {c.load} at iteration {self.iteration} "
                     f"(consumed samples {self.consumed_samples})")

    def start_iterators(self, valid_consumed: int) -> None:
        t, workers = self.run.training, self.run.data.num_workers
        if self.iteration < self.total_iters:
            self.train_iter = data_iterator(self.datasets[0], self.consumed_samples, t, workers)
        self.valid_iter = data_iterator(self.datasets[1], valid_consumed, t, workers)


def _loss_scale(engine: Any) -> float:
    """The fp16 loss scale now (DeepSpeed's fp16 and ZeRO optimizers expose `loss_scale`)."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


def _add(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total + value


# ----------------------------------------------------------------------------------------------
# entry


def own_bf16(run: RunConfig) -> bool:
    """bf16 at ZeRO stage 0 runs on our master-weight AdamW, not DeepSpeed's bf16 wrapper
    (megatron/mixed_precision.py says why)."""
    return run.training.bf16 and run.training.zero_stage == 0


def own_clipping(run: RunConfig, ep: Optional[ExpertParallelGroups]) -> bool:
    """Whether we clip instead of DeepSpeed: with our own bf16 optimizer, and fp32 without ZeRO
    under expert parallelism, where DeepSpeed's clip_grad_norm_ averages per-rank norms that
    each see one expert shard (its ZeRO and mixed-precision optimizers sum the shards' squares
    correctly)."""
    t = run.training
    if run.optimizer.clip_grad <= 0:
        return False
    if own_bf16(run):
        return True
    return (ep is not None and ep.size > 1 and not (t.fp16 or t.bf16 or t.zero_stage > 0))


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
    if own_clipping(run, expert_parallel):
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


def pretrain(run: RunConfig, vocab_size: Optional[int] = None) -> None:
    """Train (or with --eval-only evaluate) the model `run` describes; see the module docstring.

    vocab_size: the tokenizer's vocabulary; a data token id outside it raises ValueError.
    """
    start_time = time.time()
    t = run.training
    _, device = initialize_distributed(t.distributed_backend, t.local_rank)
    set_random_seed(t.seed)
    total_iters = 0 if t.eval_only else total_train_iters(t)
    ep = expert_parallel_groups(run)
    engine, model, scheduler = setup_model_and_optimizer(run, device, total_iters, ep)
    counts = sample_counts(t, total_iters)
    datasets = build_datasets(run, counts, vocab_size)
    trainer = Trainer(run, engine, model, scheduler, device, total_iters, datasets,
                      start_time=start_time, expert_parallel=ep)
    print_rank_0(f"number of parameters: {model.num_parameters():,} "
                 f"(experts {model.parameter_counts()['expert']:,}); training for "
                 f"{total_iters} iterations of {t.global_batch_size} samples")
    if ep is not None:
        print_rank_0(f"expert-parallel size {ep.size}: each rank holds 1/{ep.size} of every MoE "
                     f"layer's experts; expert-data-parallel size {ep.data_parallel_size}")
    trainer.load()
    try:
        if t.eval_only:         # the first batches of each split: comparable across checkpoints
            trainer.start_iterators(valid_consumed=0)
            trainer.evaluate_valid()
            trainer.evaluate_test()
            return
        evaluations_done = trainer.iteration // t.eval_interval
        trainer.start_iterators(evaluations_done * t.eval_iters * t.global_batch_size)
        if trainer.train():     # stopped by --exit-interval / --exit-duration-in-mins
            return
        if trainer.iteration % t.eval_interval:         # Megatron's order: valid, save, test
            trainer.evaluate_valid()
        if (run.checkpoint.save and trainer.iteration > 0
                and trainer.iteration % run.checkpoint.save_interval):
            trainer.save()
        trainer.evaluate_test()
    finally:
        trainer.tensorboard.close()
