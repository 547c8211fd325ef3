"""The language-model forward of one micro-batch, shared by training (megatron/training.py),
evaluation (megatron/evaluation.py) and the benchmarks: the batch's tokens become inputs and
labels, and the model returns the mean lm loss with its GPTOutput."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

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
