"""``L0Controller``: find the sparsity coefficient that gives a chosen L0, while training."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_sae.errors import UserError


class L0Controller(nn.Module):
    """An integral controller on the log of a sparsity penalty's factor φ (coefficient in force λ·φ).

    After every training step s, with L0_s the step's mean active features per row (all ranks
    together) and T_s the target,

        log φ ← log φ + ``gain`` · log((L0_s + 1) / (T_s + 1)),

    so φ grows while the SAE is denser than asked and shrinks while it is sparser; |log φ| stays
    below ``max_log_factor``, so an unreachable target ends the search instead of running λ·φ to
    0 or infinity. T_s is ``target``, or during the first ``warmup_fraction`` of the run it falls
    geometrically (in L0 + 1) from the first step's L0 to ``target``: seed 000's sparsity warmup,
    expressed in L0. Everything runs on the device (no host synchronisation), identically on every
    rank; φ starts at 1, so the penalty's configured λ is where the search starts.
    """

    def __init__(self, target: float, warmup_fraction: float = 0.0, gain: float = 0.01, max_log_factor: float = 20.0) -> None:
        """
        Args:
            target: Target mean number of active features per row.
            warmup_fraction: Fraction of the run over which the target falls from the first step's
                L0 to ``target`` (0: the target holds from the start).
            gain: Change of log φ per step per unit of log((L0 + 1)/(T + 1)).
            max_log_factor: Bound on |log φ|.
        """
        super().__init__()
        if target <= 0:
            raise UserError(f"target_l0 must be positive, got {target}")
        if not 0 <= warmup_fraction <= 1:
            raise UserError(f"target_l0_warmup must be in [0, 1], got {warmup_fraction}")
        self.target = target
        self.warmup_fraction = warmup_fraction
        self.gain = gain
        self.max_log_factor = max_log_factor
        self.register_buffer("log_factor", torch.zeros(()))
        self.register_buffer("start_log_l0", torch.full((), float("nan")))
        """log(L0 + 1) of the run's first step (NaN until it is taken)."""

    def factor(self) -> Tensor:
        """φ, the multiplier of the penalty's configured coefficient."""
        return self.log_factor.exp()

    def log_target(self, step: int, total_steps: int) -> Tensor:
        """log(T_s + 1): log(target + 1), or during the warmup on the geometric way there."""
        final = math.log1p(self.target)
        warmup_steps = self.warmup_fraction * total_steps
        remaining = 1 - step / warmup_steps if step < warmup_steps else 0.0
        return final + remaining * (self.start_log_l0 - final)

    @torch.no_grad()
    def update(self, step_l0: Tensor, step: int, total_steps: int) -> None:
        """Move log φ after training step ``step`` of ``total_steps``, whose mean L0 was ``step_l0``."""
        log_l0 = torch.log1p(step_l0)
        self.start_log_l0.copy_(torch.where(self.start_log_l0.isnan(), log_l0, self.start_log_l0))
        error = log_l0 - self.log_target(step, total_steps)
        self.log_factor.add_(self.gain * error).clamp_(-self.max_log_factor, self.max_log_factor)
