"""The learning-rate schedule of the recipes, as a step-wise ``torch`` LR scheduler.

lr(s) = lr₀ · warmup(s) · rewarmup(s) · decay(s), where

- warmup: cosine from ``start_factor`` to 1 over ``warmup_steps`` (seed 001: 1/10 over 1000 steps);
- rewarmup: after each :meth:`WarmupDecaySchedule.restart_warmup` (a resampling), the same
  cosine ramp restarts from ``start_factor`` (seed 001: "times the learning rate by 1/10 and
  again warmup");
- decay: linear to zero over the last ``decay_fraction`` of ``total_steps`` (seed 000: 20%).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_ramp(progress: float, start_factor: float) -> float:
    """Cosine ramp from ``start_factor`` at progress 0 to 1 at progress ≥ 1."""
    if progress >= 1:
        return 1.0
    return start_factor + (1 - start_factor) * 0.5 * (1 - math.cos(math.pi * progress))


class WarmupDecaySchedule(LRScheduler):
    """Warmup, re-warmup after resampling, and linear decay to zero (see module docstring)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        rewarmup_steps: int = 0,
        decay_fraction: float = 0.2,
        start_factor: float = 0.1,
    ) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.rewarmup_steps = rewarmup_steps
        self.decay_fraction = decay_fraction
        self.start_factor = start_factor
        self.rewarmup_starts: list[int] = []
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at optimizer step ``step``."""
        value = 1.0
        if self.warmup_steps > 0:
            value *= cosine_ramp(step / self.warmup_steps, self.start_factor)
        if self.rewarmup_starts and self.rewarmup_steps > 0:
            value *= cosine_ramp((step - self.rewarmup_starts[-1]) / self.rewarmup_steps, self.start_factor)
        decay_steps = self.decay_fraction * self.total_steps
        if decay_steps > 0:
            value *= min(1.0, max(0.0, (self.total_steps - step) / decay_steps))
        return value

    def restart_warmup(self) -> None:
        """Start a re-warmup at the current step (called after a resampling)."""
        self.rewarmup_starts.append(self.last_epoch)
        self._set_lrs()

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def _set_lrs(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
