"""Pretraining: data, model and DeepSpeed engine, the training loop, evaluation, checkpoints.

    pretrain(run, vocab_size)
      1. torch.distributed through DeepSpeed, device, Megatron's seeds
      2. GPTModel -> our AdamW groups -> deepspeed.initialize (no LR scheduler: ours is stepped
         here with the tokens of each step) -> LRScheduler
      3. datasets (rank 0 builds the index caches, the others load them), --load
      4. --eval-only: validation and test, then exit; else the loop below, a final save,
         validation (unless just done) and test. Each evaluation prints Megatron's loss block
         and, per MoE layer and their mean, experts per token wanted / used, dropped %, expert
         FLOPs vs every expert and vs the dense FFN, load balance (megatron/evaluation.py);
         --eval-only --use-checkpoint-args --threshold T evaluates a checkpoint at another
         threshold (megatron/run_config.py says which flags may differ from it).

One iteration is one global batch: every micro-batch runs forward (lm loss = mean over tokens,
plus the MoE aux loss) and `engine.backward`, `engine.step` on each (DeepSpeed steps the
optimizer at the accumulation boundary); then the LR scheduler advances unless the step was
skipped (fp16 overflow).

Building the model, optimizer and DeepSpeed engine (precision, expert parallelism, compile)
and deciding the policies the loop follows (expert-parallel groups, who clips):
megatron/engine.py, whose BuiltRun the Trainer takes. The forward of one micro-batch:
megatron/lm_forward.py.
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
from megatron.checkpointing import load_checkpoint, prepare_save_dir, save_checkpoint
from megatron.config import TrainingConfig
from megatron.data.data_samplers import build_pretraining_data_loader
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.engine import BuiltRun, setup_model_and_optimizer
from megatron.evaluation import evaluate
from megatron.expert_groups import clip_gradients_, global_grad_norm
from megatron.initialize import (barrier, initialize_distributed, is_rank_0, print_rank_0,
                                 set_random_seed)
from megatron.lm_forward import forward_lm
from megatron.mixed_precision import MasterWeightAdamW
from megatron.training_log import (FlopsModel, IntervalStats, StepReport, TensorBoardWriter,
                                   eval_block, eval_moe_lines, iteration_line, moe_lines,
                                   moe_stats_tensors)

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
    built: BuiltRun             # engine, model, scheduler, expert-parallel groups, who clips
    device: torch.device
    total_iters: int
    datasets: tuple
    iteration: int = 0
    consumed_samples: int = 0
    start_time: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        moe = [layer for layer in self.built.model.transformer.layers if layer.is_moe]
        self.stats = IntervalStats([m.layer_number for m in moe], [m.num_experts for m in moe])
        t = self.run.training
        self.flops = FlopsModel.of_model(self.built.model, t.seq_length,
                                         t.checkpoint_activations)
        self.tensorboard = TensorBoardWriter(
            self.run.logging.tensorboard_dir if is_rank_0() else None,
            self.run.logging.tensorboard_log_interval)
        self.train_iter = self.valid_iter = None

    # ------------------------------------------------------------------------------------------
    # one iteration

    def train_step(self) -> StepReport:
        t, built, engine = self.run.training, self.built, self.built.engine
        lr = built.scheduler.get_lr()
        lm_sum = aux_sum = fields_sum = loads_sum = own_norm = None
        for _ in range(t.gradient_accumulation_steps):
            lm_loss, out = forward_lm(engine, next(self.train_iter), self.device)
            engine.backward(lm_loss + out.moe_aux_loss)
            if built.own_clipping and engine.is_gradient_accumulation_boundary():
                own_norm = global_grad_norm(engine.module, built.expert_parallel)
                clip = self.run.optimizer.clip_grad
                if clip > 0 and isinstance(engine.optimizer, MasterWeightAdamW):
                    engine.optimizer.clip_at_step(clip, own_norm)   # inside its step
                elif clip > 0:
                    clip_gradients_(engine.module, clip, own_norm)
            engine.step()
            lm_sum = _add(lm_sum, lm_loss.detach())
            aux_sum = _add(aux_sum, out.moe_aux_loss.detach())
            if out.moe_stats:
                fields, loads = moe_stats_tensors(out.moe_stats)
                fields_sum, loads_sum = _add(fields_sum, fields), _add(loads_sum, loads)
        applied = engine.was_step_applied()
        if applied:
            built.scheduler.step(1, tokens=t.tokens_per_step)
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
        self.built.engine.train()
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
        result = evaluate(self.built.engine, iterator, num_iters,
                          self.run.training.gradient_accumulation_steps, self.device)
        print_rank_0(eval_block(what, self.iteration, result.lm_loss))
        if self.run.logging.log_moe_stats and result.moe_layers:
            print_rank_0("\n".join(eval_moe_lines(what, result)))
        if is_rank_0():
            self.tensorboard.write_eval(what, self.iteration, result)
            self.tensorboard.flush()

    def evaluate_valid(self) -> None:
        self._evaluate("validation", self.valid_iter, self.run.training.eval_iters)

    def evaluate_test(self) -> None:
        t = self.run.training
        test_iters = t.eval_iters if t.test_iters is None else t.test_iters
        it = data_iterator(self.datasets[2], 0, t, self.run.data.num_workers)
        self._evaluate("test", it, test_iters)

    def save(self) -> None:
        c, built = self.run.checkpoint, self.built
        save_checkpoint(built.engine, self.iteration, self.consumed_samples, built.scheduler,
                        dataclasses.asdict(self.run), c.save, save_rng=not c.no_save_rng,
                        expert_parallel=built.expert_parallel)
        print_rank_0(f"saved checkpoint at iteration {self.iteration:7d} to {c.save}")

    def load(self) -> None:
        """--load (refused before anything is read if the checkpoint is incomplete or was saved
        with other model flags), then the check that --save holds no checkpoint this run did
        not load and could overwrite (megatron/checkpoint_check.py)."""
        c, built = self.run.checkpoint, self.built
        loaded = None
        if c.load is not None:
            loaded = load_checkpoint(built.engine, built.scheduler, c.load,
                                     load_optimizer=not c.no_load_optim,
                                     load_rng=not c.no_load_rng, finetune=c.finetune,
                                     expert_parallel=built.expert_parallel,
                                     model_args=dataclasses.asdict(self.run.model))
            if loaded is None:
                print_rank_0(f"no checkpoint found in {c.load}: training from scratch")
            else:
                self.iteration, self.consumed_samples = loaded
                print_rank_0(f"loaded checkpoint from {c.load} at iteration {self.iteration} "
                             f"(consumed samples {self.consumed_samples})")
        if c.save is not None and not self.run.training.eval_only:
            prepare_save_dir(c.save, c.load, None if loaded is None else self.iteration)

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


def pretrain(run: RunConfig, vocab_size: Optional[int] = None) -> None:
    """Train (or with --eval-only evaluate) the model `run` describes; see the module docstring.

    vocab_size: the tokenizer's vocabulary; a data token id outside it raises ValueError.
    """
    start_time = time.time()
    t = run.training
    _, device = initialize_distributed(t.distributed_backend, t.local_rank)
    set_random_seed(t.seed)
    total_iters = 0 if t.eval_only else total_train_iters(t)
    built = setup_model_and_optimizer(run, device, total_iters)
    model, ep = built.model, built.expert_parallel
    counts = sample_counts(t, total_iters)
    datasets = build_datasets(run, counts, vocab_size)
    trainer = Trainer(run, built, device, total_iters, datasets, start_time=start_time)
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
