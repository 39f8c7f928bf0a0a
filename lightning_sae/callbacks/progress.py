"""``StepProgressBar``: one bar for the whole run, in optimizer steps of ``max_steps``."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Training progress as steps out of ``trainer.max_steps``, across epochs, updated every
    ``refresh_rate`` steps.

    SAE runs are set by ``max_steps`` over a stream read in many short epochs. Lightning's bars
    restart at every epoch and title it "Epoch 6/-2" (its ``max_epochs`` is −1 under
    ``max_steps``); this bar runs once from the resumed step to ``max_steps``. Updating it every
    step would cost more host time than a small SAE's whole step, so it updates every
    ``refresh_rate`` steps (and reads the metrics only then).
    """

    def __init__(self, refresh_rate: int = 10, process_position: int = 0) -> None:
        """
        Args:
            refresh_rate: Steps between updates of the bar (0: no bar).
            process_position: Line offset of the bars (for several trainers in one terminal).
        """
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.unit = "step"
        self.train_progress_bar.set_description("train")

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """One bar for the run: nothing restarts at an epoch."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar.disable or not self._should_update(trainer.global_step, bar.total or 0):
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The bar goes on into the next epoch."""
