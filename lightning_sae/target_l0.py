"""``L0Controller``: find the sparsity coefficient that gives a chosen L0, while training."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_sae.errors import UserError


class L0Controller(nn.Module):
    """Holds a sparsity penalty at a target L0 by adapting its coefficient: λ_s = λ·φ_s.

    With L0_s the mean active features per row of training step s (all ranks together) and T the
    target:

    - ramp: φ_s = min(1, (s + 1)/W), W = ``warmup_fraction`` of the run's steps (seed 000's linear
      warmup of the sparsity coefficient from 0), until the ramp reaches 1 or L0 falls to T from
      above (L0_s ≤ T after a step with L0 > T), whichever comes first: a configured λ that is
      larger than needed is never reached, so it cannot overshoot the target and silence features
      for good. "From above": an SAE whose b_enc was calibrated to fire at the target starts at
      L0 ≤ T, and while λ ≈ 0 its L0 rises; ending the ramp at step 0 handed a search at φ = 1/W
      errors of log(637/11), and it multiplied λ by 10^7 within 100 steps (anthropic-jan2025 with
      b_enc calibrated to the target, wide-input set of docs/benchmarks.md, stop 35);
    - search: then an integral controller on log φ, with L̄_s an exponential moving average of L0
      over about 10 steps and e_s = log((L̄_s + 1) / (T + 1)),

        log φ ← log φ + ``gain`` · e_s,   except while L0 is already moving towards T fast enough,

      so φ grows while the SAE is denser than asked and shrinks while it is sparser. L0's pace is
      v_s = (log(L̄_s + 1) − log(L̂_s + 1))/lag, with L̂ a slower average (about 50 steps; the
      step-to-step change is dominated by the batches' noise) that trails L̄ by ``lag`` steps on a
      steady trend; "fast enough" is v_s·e_s < 0 and |e_s| ≤ |v_s|·H, i.e. at its pace L0 reaches
      T within H = ``approach_horizon`` of the run. The exception matters because the thresholds
      integrate the penalty: L0 keeps falling for many steps after φ stops growing, and a
      controller that kept integrating all the way down to T overshot it by half on real
      activations (SmolLM2, JumpReLU + L0: L0 16 for a target of 32). The horizon matters
      because an L0 that drifts towards T too slowly to reach it must still be pushed: holding
      on any approach left ReLU + L1 at L0 6 for a target of 3 after 1,000 steps (mini-sparse
      set of docs/benchmarks.md).
      |log φ| stays below ``max_log_factor``, so an unreachable target ends the search instead of
      running λ·φ to 0 or infinity.
    - hold: for ``settle_fraction`` of the run after :meth:`hold` (called when features are
      revived), the search does not move φ (a ramp still rises) and only the averages move.
      Resampled features start firing on about half the rows (Bricken et al.'s b_enc = 0), so L0
      jumps for a while (6 to 143 with 2,218 revived); a search chasing the jump multiplied λ by
      300 within 50 steps, or killed 2/3 of the features (ReLU + L1 on the wide-sparse set of
      docs/benchmarks.md, stop 33).
    - glide (``glide`` G > 1, instead of the ramp): the search runs from the first step, from the
      configured λ (φ = 1), towards a target that falls geometrically over the warmup,
      T_s = T·G^(1 − (s + 1)/W), then stays at T. L0 then comes down from G·T at a pace set by the
      schedule rather than by how fast a ramp to the configured λ passes the λ the data needs
      (JumpReLU + L0 on the wide-sparse set of docs/benchmarks.md, stop 30).

    Without a glide, the penalty's configured λ is therefore the most the ramp gives, and where the
    search starts if the ramp ends without reaching the target. Everything runs on the device (no host
    synchronisation) and identically on every rank.
    """

    def __init__(
        self,
        target: float,
        warmup_fraction: float = 0.0,
        gain: float = 0.05,
        max_log_factor: float = 20.0,
        smoothing: tuple[float, float] = (0.9, 0.98),
        approach_horizon: float = 0.2,
        glide: float = 1.0,
        settle_fraction: float = 0.05,
    ) -> None:
        """
        Args:
            target: Target mean number of active features per row.
            warmup_fraction: Fraction W of the run over which the coefficient rises linearly from 0
                (seed 000), at most; 0: no ramp.
            gain: Change of log φ per step per unit of log((L0 + 1)/(T + 1)).
            max_log_factor: Bound on |log φ|.
            smoothing: Weights of the previous average in L̄ and in the slower average that gives
                L0's direction ((0, 0): the step's own L0, and the change since the last step).
            approach_horizon: Fraction H of the run within which L0, at its present pace, must reach the
                target for the search to hold φ instead of pushing it further.
            glide: The L0 asked for at the first step, as a multiple G of the target: the target is
                T_s = T·G^(1 − (s + 1)/W) during the warmup, falling geometrically to T (1: T throughout).
            settle_fraction: Fraction of the run after a :meth:`hold` during which the search does not move φ.
        """
        super().__init__()
        if target <= 0:
            raise UserError(f"target_l0 must be positive, got {target}")
        if not 0 <= warmup_fraction <= 1:
            raise UserError(f"target_l0_warmup must be in [0, 1], got {warmup_fraction}")
        if not 0 <= approach_horizon <= 1:
            raise UserError(f"the L0 controller's approach_horizon must be in [0, 1], got {approach_horizon}")
        if glide < 1:
            raise UserError(f"target_l0_glide must be at least 1, got {glide}")
        if not 0 <= settle_fraction <= 1:
            raise UserError(f"the L0 controller's settle_fraction must be in [0, 1], got {settle_fraction}")
        self.target = target
        self.glide = glide
        self.warmup_fraction = warmup_fraction
        self.gain = gain
        self.max_log_factor = max_log_factor
        self.smoothing = smoothing
        self.approach_horizon = approach_horizon
        self.settle_fraction = settle_fraction
        fast, slow = smoothing
        self.lag = max(1.0, slow / (1 - slow) - fast / (1 - fast))
        """Steps by which the slower average trails L̄ on a steady trend (at least the one step between updates)."""
        self.register_buffer("log_factor", torch.zeros(()))
        self.register_buffer("mean_l0", torch.tensor(-1.0))  # L̄; −1: no step yet
        self.register_buffer("slow_mean_l0", torch.tensor(-1.0))
        self.register_buffer("ramping", torch.tensor(warmup_fraction > 0 and glide == 1))
        self.register_buffer("held_until", torch.tensor(-1))  # the search holds φ up to this step
        self.register_buffer("was_above", torch.tensor(False))  # L0 has exceeded the target during the ramp

    def ramp(self, step: int, total_steps: int) -> float:
        """min(1, (s + 1)/W), or 1 without a warmup."""
        warmup_steps = self.warmup_fraction * total_steps
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    def target_at(self, step: int, total_steps: int) -> float:
        """T_s = T·G^(1 − (s + 1)/W) during the warmup, T afterwards."""
        remaining = 1.0 - self.ramp(step, total_steps)
        return self.target * self.glide**remaining

    def factor(self, step: int, total_steps: int) -> Tensor:
        """φ at step ``step``: the multiplier of the penalty's configured coefficient."""
        ramp = torch.full_like(self.log_factor, self.ramp(step, total_steps))
        return torch.where(self.ramping, ramp, self.log_factor.exp())

    def hold(self, step: int, total_steps: int) -> None:
        """Stop the search moving φ for the ``settle_fraction`` of the run that follows step ``step``."""
        self.held_until.fill_(step + round(self.settle_fraction * total_steps))

    @torch.no_grad()
    def update(self, step_l0: Tensor, step: int, total_steps: int) -> None:
        """Move φ after training step ``step`` of ``total_steps``, whose mean L0 was ``step_l0``."""
        step_l0 = step_l0.to(self.mean_l0.dtype)
        fast, slow = self.smoothing
        unset = self.mean_l0 < 0
        mean_before = torch.where(unset, step_l0, self.mean_l0)
        slow_before = torch.where(unset, step_l0, self.slow_mean_l0)
        self.mean_l0.copy_(fast * mean_before + (1 - fast) * step_l0)
        self.slow_mean_l0.copy_(slow * slow_before + (1 - slow) * step_l0)
        target = math.log1p(self.target_at(step, total_steps))
        error = torch.log1p(self.mean_l0) - target
        pace = (torch.log1p(self.mean_l0) - torch.log1p(slow_before)) / self.lag  # change of log(L0 + 1) per step
        horizon = self.approach_horizon * total_steps
        approaching = (error * pace < 0) & (error.abs() <= pace.abs() * horizon)
        above = torch.log1p(step_l0) > target
        ramp_continues = self.ramping & (above | ~self.was_above) & (self.ramp(step, total_steps) < 1)
        self.was_above.logical_or_(above)
        ramp = torch.full_like(self.log_factor, math.log(self.ramp(step, total_steps)))
        self.log_factor.copy_(torch.where(self.ramping, ramp, self.log_factor))
        searching = ~ramp_continues & ~approaching & (self.held_until < step)
        step_size = torch.where(searching, self.gain * error, torch.zeros_like(error))
        self.log_factor.add_(step_size).clamp_(-self.max_log_factor, self.max_log_factor)
        self.ramping.copy_(ramp_continues)
