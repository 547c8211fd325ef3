"""Megatron's learning-rate schedule: linear warmup from 0, then constant / linear / cosine decay
from --lr to --min-lr, then --min-lr.

Progress is counted in iterations, or in tokens when --lr-decay-tokens is set (Megatron-DeepSpeed's
token-based decay). In token mode the warmup is --lr-warmup-tokens, or --lr-warmup-iters /
--lr-warmup-fraction iterations; after an iteration warmup the decay starts from the tokens seen
when it ended (Megatron-DeepSpeed records them the same way), so it is part of the saved state.

Unlike Megatron's OptimizerParamScheduler, which counts steps in samples to support batch-size
ramp-up, this counts iterations (no ramp-up here). Weight decay is constant (no wd schedule).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

DECAY_STYLES = ("constant", "linear", "cosine")


class LRScheduler:
    """Sets `lr` on every param group of `optimizer` (times the group's `lr_mult`, default 1).

    config: an OptimizerConfig (lr, min_lr, lr_decay_style, lr_warmup_fraction, lr_warmup_iters,
    lr_warmup_tokens, lr_decay_iters, lr_decay_tokens). train_iters: the default decay horizon
    (None when training for a token budget). global_batch_size * seq_length: the tokens of one
    iteration, used by `step` when it is not told the tokens.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: Any, train_iters: Optional[int],
                 global_batch_size: int, seq_length: int) -> None:
        self.optimizer = optimizer
        self.max_lr = float(config.lr)
        self.min_lr = float(config.min_lr)
        self.decay_style = config.lr_decay_style
        self.tokens_per_iter = int(global_batch_size) * int(seq_length)
        self.token_mode = config.lr_decay_tokens is not None
        self._set_horizons(config, train_iters)
        self._validate()
        self.num_iters = 0
        self.num_tokens = 0
        # Token mode with an iteration warmup: tokens seen when the warmup ended (0 until then).
        self.decay_start_tokens = self.warmup_tokens if self.warmup_tokens is not None else 0
        self.step(0, tokens=0)

    def _set_horizons(self, config: Any, train_iters: Optional[int]) -> None:
        """decay_iters / decay_tokens, and the warmup in iterations or tokens."""
        if config.lr_warmup_fraction is not None and config.lr_warmup_iters:
            raise ValueError(f"--lr-warmup-fraction ({config.lr_warmup_fraction}) and "
                             f"--lr-warmup-iters ({config.lr_warmup_iters}) are exclusive")
        if config.lr_warmup_tokens is not None and not self.token_mode:
            raise ValueError(f"--lr-warmup-tokens ({config.lr_warmup_tokens}) needs "
                             f"--lr-decay-tokens (token-based decay)")
        if config.lr_warmup_tokens is not None and (config.lr_warmup_fraction is not None
                                                    or config.lr_warmup_iters):
            raise ValueError("--lr-warmup-tokens excludes --lr-warmup-iters and "
                             "--lr-warmup-fraction")
        self.decay_tokens = config.lr_decay_tokens
        self.decay_iters = (config.lr_decay_iters if config.lr_decay_iters is not None
                            else train_iters)
        self.warmup_tokens: Optional[float] = config.lr_warmup_tokens
        self.warmup_iters: float = float(config.lr_warmup_iters or 0)
        if config.lr_warmup_fraction is not None:
            if not 0.0 <= config.lr_warmup_fraction <= 1.0:
                raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got "
                                 f"{config.lr_warmup_fraction}")
            # A fraction of the decay horizon, in the unit progress is counted in.
            if self.token_mode:
                self.warmup_tokens = config.lr_warmup_fraction * self.decay_tokens
            else:
                if self.decay_iters is None:
                    raise ValueError("--lr-warmup-fraction needs --lr-decay-iters or --train-iters")
                self.warmup_iters = config.lr_warmup_fraction * self.decay_iters

    def _validate(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, "
                             f"got {self.decay_style!r}")
        if self.max_lr < 0.0:
            raise ValueError(f"--lr must be >= 0, got {self.max_lr}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"--min-lr must be in [0, --lr={self.max_lr}], got {self.min_lr}")
        if self.warmup_iters < 0 or (self.warmup_tokens is not None and self.warmup_tokens < 0):
            raise ValueError("--lr-warmup-iters / --lr-warmup-tokens must be >= 0")
        if self.token_mode:
            if self.decay_tokens <= 0:
                raise ValueError(f"--lr-decay-tokens must be > 0, got {self.decay_tokens}")
            horizon, flag, decay_flag = self.decay_tokens, "--lr-warmup-tokens", "--lr-decay-tokens"
            warmup = self.warmup_tokens or 0
            if self.warmup_tokens is None and self.warmup_iters > 0:
                return  # an iteration warmup against a token horizon: checked as it runs
        else:
            if self.decay_iters is None:
                raise ValueError("the LR decay needs --lr-decay-iters, --train-iters or "
                                 "--lr-decay-tokens")
            if self.decay_iters <= 0:
                raise ValueError(f"--lr-decay-iters must be > 0, got {self.decay_iters}")
            horizon, flag, decay_flag = self.decay_iters, "--lr-warmup-iters", "--lr-decay-iters"
            warmup = self.warmup_iters
        # Decay needs a non-empty range after warmup; constant has no decay range.
        too_long = warmup > horizon if self.decay_style == "constant" else warmup >= horizon
        if too_long:
            raise ValueError(f"{flag} (or --lr-warmup-fraction) gives a warmup of {warmup}, not "
                             f"shorter than the decay horizon {decay_flag} / --train-iters = "
                             f"{horizon}")

    def get_lr(self) -> float:
        """The learning rate for the current progress (Megatron's formulas)."""
        if self.warmup_tokens is not None:
            if self.warmup_tokens > 0 and self.num_tokens <= self.warmup_tokens:
                return self.max_lr * self.num_tokens / self.warmup_tokens
        elif self.warmup_iters > 0 and self.num_iters <= self.warmup_iters:
            return self.max_lr * self.num_iters / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if self.token_mode:
            done, start, end = self.num_tokens, self.decay_start_tokens, self.decay_tokens
        else:
            done, start, end = self.num_iters, self.warmup_iters, self.decay_iters
        if done > end or end <= start:
            return self.min_lr
        ratio = (done - start) / (end - start)
        assert 0.0 <= ratio <= 1.0, ratio
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment_iters: int = 1, tokens: Optional[int] = None) -> float:
        """Advance by `increment_iters` iterations and `tokens` tokens (default: increment_iters
        * global_batch_size * seq_length), set the lr on the optimizer and return it."""
        before = self.num_iters
        self.num_iters += increment_iters
        self.num_tokens += increment_iters * self.tokens_per_iter if tokens is None else tokens
        if (self.token_mode and self.warmup_tokens is None and self.warmup_iters > 0
                and before < self.warmup_iters <= self.num_iters):
            self.decay_start_tokens = self.num_tokens
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> Dict[str, Any]:
        """Progress counters (restored) and the schedule's shape (compared on load)."""
        return {"num_iters": self.num_iters, "num_tokens": self.num_tokens,
                "decay_start_tokens": self.decay_start_tokens, **self._shape()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume the progress exactly; the shape comes from the current config (the command
        line), as Megatron does by default, with a warning where the checkpoint's differs."""
        for key, value in self._shape().items():
            if key in state and state[key] != value:
                logger.warning("LR schedule %s changed on resume: checkpoint %r, now %r "
                               "(using the new value)", key, state[key], value)
        self.num_iters = int(state["num_iters"])
        self.num_tokens = int(state["num_tokens"])
        self.decay_start_tokens = state["decay_start_tokens"]
        self.step(0, tokens=0)

    def _shape(self) -> Dict[str, Any]:
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "decay_style": self.decay_style,
                "warmup_iters": self.warmup_iters, "warmup_tokens": self.warmup_tokens,
                "decay_iters": self.decay_iters, "decay_tokens": self.decay_tokens}
