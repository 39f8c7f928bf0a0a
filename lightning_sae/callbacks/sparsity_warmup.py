"""``SparsityWarmup``: the sparsity coefficient rises linearly from 0 to its final value."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import Penalty


class SparsityWarmup(Callback):
    """λ(s) = λ · min(1, s / S) at optimizer step s, for the chosen penalties.

    Seed 000 (Anthropic, January 2025): "We vary λ_S during training, it is initially 0 and
    linearly increases to its final value over the entire training period", i.e. S = the run's
    total steps; ``steps`` sets a shorter S. The callback sets each penalty's ``factor``
    to min(1, s / S) from ``trainer.global_step`` before every batch, so a resumed run continues
    exactly; the model logs λ(s) as ``train/<name>_coefficient``.
    """

    def __init__(self, penalties: list[str] | None = None, steps: int | None = None) -> None:
        """
        Args:
            penalties: Names of the penalties to warm up, as logged (e.g. ``[tanh]``); None: every
                sparsity penalty (those with ``Penalty.sparsity``: L1, Tanh, L0).
            steps: Steps S over which λ rises to its final value; None: the whole run (seed 000).
        """
        if steps is not None and steps < 1:
            raise UserError(f"SparsityWarmup steps must be positive, got {steps}")
        self.penalties = penalties
        self.steps = steps
        self._warmed: list[Penalty] = []
        self._total = 1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the penalties by name; refuse one whose coefficient ``model.target_l0`` controls."""
        assert isinstance(pl_module, SparseAutoencoder)
        by_name = dict(zip(pl_module.penalty_names, pl_module.penalties))
        if self.penalties is None:
            self._warmed = [penalty for penalty in by_name.values() if penalty.sparsity]
        else:
            unknown = sorted(set(self.penalties) - set(by_name))
            if unknown:
                raise UserError(f"SparsityWarmup penalties {unknown} are not in the model's {sorted(by_name)}")
            self._warmed = [by_name[name] for name in self.penalties]
        if any(penalty is pl_module.controlled_penalty for penalty in self._warmed):
            raise UserError(
                "SparsityWarmup and model.target_l0 both set the sparsity coefficient: remove the callback "
                "(model.target_l0_warmup is the warmup of a target L0) or unset model.target_l0"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix S and apply the factor of the (possibly resumed) current step."""
        self._total = self.steps or max(1, int(trainer.estimated_stepping_batches))
        self._apply(trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply(trainer.global_step)

    def factor(self, step: int) -> float:
        """min(1, step / S)."""
        return min(1.0, step / self._total)

    def _apply(self, step: int) -> None:
        for penalty in self._warmed:
            penalty.factor = self.factor(step)
