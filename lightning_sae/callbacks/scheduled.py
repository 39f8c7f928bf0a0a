"""``ScheduledIntervention``: a callback that changes the model at given steps of the run."""

from __future__ import annotations

from typing import Any

from lightning import Callback, LightningModule, Trainer

from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder


class ScheduledIntervention(Callback):
    """Calls :meth:`intervene` before the first batch of each scheduled optimizer step, once.

    The schedule is given as ``steps``, or as ``fractions`` of the run's total steps (recipes whose
    points scale with the run, such as seed 001's resampling at 20%, 50% and 75%). The last step
    acted on is the callback's state, so a resumed run acts exactly like an uninterrupted one.
    """

    def __init__(self, steps: list[int] | None = None, fractions: list[float] | None = None) -> None:
        """
        Args:
            steps: Optimizer steps at which to act.
            fractions: The same as fractions of the run's total steps.
        """
        name = type(self).__name__
        if (steps is None) == (fractions is None):
            raise UserError(f"{name} needs either steps or fractions")
        if any(step < 1 for step in steps or []):
            raise UserError(f"{name} steps must be positive, got {steps}")
        if any(not 0 < fraction < 1 for fraction in fractions or []):
            raise UserError(f"{name} fractions must be between 0 and 1, got {fractions}")
        self.steps = steps
        self.fractions = fractions
        self.last_step = -1

    def scheduled_steps(self, total_steps: int | float) -> set[int]:
        """The optimizer steps acted on in a run of ``total_steps``."""
        return set(self.steps or [max(1, round(fraction * total_steps)) for fraction in self.fractions or []])

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps = self.scheduled_steps(trainer.estimated_stepping_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Act before the first batch of each scheduled step (once, also when accumulating)."""
        step = trainer.global_step
        if step in self._steps and step != self.last_step:
            assert isinstance(pl_module, SparseAutoencoder)
            self.last_step = step
            self.intervene(trainer, pl_module)

    def intervene(self, trainer: Trainer, model: SparseAutoencoder) -> Any:
        raise NotImplementedError
