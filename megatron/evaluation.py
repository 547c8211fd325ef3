"""The language-model forward shared by training and evaluation, and the evaluation pass."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist

from megatron.model import GPTOutput


def get_batch(batch: Dict[str, torch.Tensor], device: torch.device
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """{"text": int64 [b, s+1]} -> (input ids [b, s], labels [b, s]) on `device`.

    Every label counts (loss mask of ones): no EOD masking and no attention reset at document
    boundaries, Megatron's defaults (--eod-mask-loss, --reset-* are off).
    """
    tokens = batch["text"].to(device, non_blocking=True)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward_lm(model: torch.nn.Module, batch: Dict[str, torch.Tensor], device: torch.device
               ) -> Tuple[torch.Tensor, GPTOutput]:
    """(mean lm loss over the micro-batch's tokens, fp32 scalar; the model's GPTOutput)."""
    input_ids, labels = get_batch(batch, device)
    out = model(input_ids, labels=labels)
    return out.loss.mean(), out


def evaluate(model: torch.nn.Module, data_iterator: Iterator, num_iters: int,
             micro_batches_per_iter: int, device: torch.device) -> float:
    """Mean lm loss over num_iters global batches (no grad, dropout off, eval capacity).

    Each rank averages its micro-batches; the result is the mean over data-parallel ranks
    (one all-reduce, one host copy). All ranks must call it.
    """
    # A DeepSpeed engine forwards train()/eval() to its module but keeps its own flag stale.
    was_training = getattr(model, "module", model).training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = num_iters * micro_batches_per_iter
    with torch.no_grad():
        for _ in range(count):
            lm_loss, _ = forward_lm(model, next(data_iterator), device)
            total += lm_loss.float()
    if was_training:
        model.train()
    total = total / max(count, 1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return float(total.cpu())
