"""``DeadFeatureTracker``: per-feature firing counts of the training rows, summed over ranks."""

from __future__ import annotations

from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_sae.errors import UserError
from lightning_sae.metrics import DEFAULT_DENSE_THRESHOLD, log10_feature_density
from lightning_sae.model import SparseAutoencoder


class DeadFeatureTracker(Callback):
    """Feature densities of the training rows over windows measured in tokens; logs dead and dense fractions.

    The firing counts are the model's own (:class:`~lightning_sae.firing.FiringCounter`, summed
    over ranks, so every rank holds the same state); this callback adds them up over consecutive
    windows of at least ``window_tokens`` rows. The density of feature i is
    d_i = #{rows of W where f_i > 0} / |W| over the last complete window W (before the first one
    completes: over the rows seen so far).

    Logged on the steps the logger writes: ``train/dead_fraction``, the share of features the
    model's counter calls dead (no firing in ``model.dead_after_tokens`` rows; Bricken et al. 2023,
    Gao et al. 2024), and ``train/dense_fraction`` = #{i : d_i > dense_threshold} / m; at the end of
    each window, a histogram of log10 d_i to TensorBoard (``train/log10_feature_density``).
    :meth:`feature_density` feeds the ``sparsity.safetensors`` of an export.
    """

    def __init__(self, window_tokens: int = 10_000_000, dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> None:
        """
        Args:
            window_tokens: Length of a density window in training rows (Gao et al. 2024 count
                firing over 10M tokens).
            dense_threshold: Density above which a feature counts as dense (Rajamanoharan et al. 2024: 0.1).
        """
        if window_tokens < 1:
            raise UserError(f"DeadFeatureTracker window_tokens must be positive, got {window_tokens}")
        if not 0 <= dense_threshold < 1:
            raise UserError(f"DeadFeatureTracker dense_threshold must be in [0, 1), got {dense_threshold}")
        self.window_tokens = window_tokens
        self.dense_threshold = dense_threshold
        self._restored: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Allocate the window counters on the training device (fitting only)."""
        if stage != "fit":
            return
        assert isinstance(pl_module, SparseAutoencoder)
        self.window_counts = torch.zeros(pl_module.d_sae, dtype=torch.long, device=trainer.strategy.root_device)
        self.window_rows = 0
        self.density: Tensor | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-apply the state loaded from a checkpoint."""
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        self.window_counts.copy_(state["window_counts"].to(self.window_counts.device))
        self.window_rows = int(state["window_rows"])
        self.density = None if state["density"] is None else state["density"].to(self.window_counts.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_counts": self.window_counts.cpu(),
            "window_rows": self.window_rows,
            "density": None if self.density is None else self.density.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ counting
    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Add the step's counts to the window, log, and close a full window."""
        assert isinstance(pl_module, SparseAutoencoder)
        firing = pl_module.firing
        self.window_counts += firing.step_counts
        self.window_rows += firing.step_rows
        if self.window_rows >= self.window_tokens:
            self.density = self.window_counts.double() / self.window_rows
            self.window_counts.zero_()
            self.window_rows = 0
            self._log_histogram(trainer, self.density)
        if not pl_module.logs_this_step():
            return
        pl_module.log("train/dead_fraction", firing.dead_mask().float().mean())
        density = self.feature_density()
        if density is not None:
            pl_module.log("train/dense_fraction", (density > self.dense_threshold).float().mean())

    def _log_histogram(self, trainer: Trainer, density: Tensor) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(
                    "train/log10_feature_density", log10_feature_density(density).cpu(), trainer.global_step
                )

    # ------------------------------------------------------------------ queries
    def feature_density(self) -> Tensor | None:
        """[m] firing frequency over the last complete window, else over the rows seen so far.

        None before any training row. Its log10 is SAELens' ``sparsity.safetensors``.
        """
        if self.density is not None:
            return self.density
        if self.window_rows == 0:
            return None
        return self.window_counts.double() / self.window_rows
