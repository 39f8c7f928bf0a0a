"""``DeadFeatureTracker``: per-feature firing counts of the training rows, summed over ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_sae.errors import UserError
from lightning_sae.metrics import DEFAULT_DENSE_THRESHOLD, log10_feature_density
from lightning_sae.model import SparseAutoencoder


class DeadFeatureTracker(Callback):
    """Counts how often each feature fires on the training rows, over windows measured in tokens.

    Feature i fires on a row when f_i > 0. With r_i the training rows (all ranks together) since
    feature i last fired, feature i is *dead* when r_i ≥ ``window_tokens``: it has not fired on
    any of the last ``window_tokens`` rows (Bricken et al. 2023, "Towards Monosemanticity";
    Gao et al. 2024 call a latent dead after 10M tokens without firing). Training is also cut
    into consecutive windows of at least ``window_tokens`` rows; the density of feature i is
    d_i = #{rows of W where f_i > 0} / |W| over the last complete window W (before the first one
    completes: over the rows seen so far).

    Logged on the steps the logger writes: ``train/dead_fraction`` = #{i : r_i ≥ window_tokens} / m and
    ``train/dense_fraction`` = #{i : d_i > dense_threshold} / m; at the end of each window, a
    histogram of log10 d_i to TensorBoard (``train/log10_feature_density``).

    The features are those of the training step itself, read by a forward hook on the model's
    encoder (no second forward pass). Each step's counts are summed over ranks with one
    ``all_reduce``, so every rank holds the same state. :meth:`dead_mask` feeds the resampling
    callback and :meth:`feature_density` the ``sparsity.safetensors`` of an export.
    """

    def __init__(self, window_tokens: int = 10_000_000, dense_threshold: float = DEFAULT_DENSE_THRESHOLD) -> None:
        """
        Args:
            window_tokens: Rows without firing after which a feature counts as dead, and the length of
                a density window (Gao et al. 2024: 10M tokens).
            dense_threshold: Density above which a feature counts as dense (Rajamanoharan et al. 2024: 0.1).
        """
        if window_tokens < 1:
            raise UserError(f"DeadFeatureTracker window_tokens must be positive, got {window_tokens}")
        if not 0 <= dense_threshold < 1:
            raise UserError(f"DeadFeatureTracker dense_threshold must be in [0, 1), got {dense_threshold}")
        self.window_tokens = window_tokens
        self.dense_threshold = dense_threshold
        self._restored: dict[str, Any] | None = None
        self._hook: RemovableHandle | None = None
        self._in_batch = False

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Allocate the counters on the training device and hook the encoder (fitting only)."""
        if stage != "fit":
            return
        assert isinstance(pl_module, SparseAutoencoder)
        zeros = torch.zeros(pl_module.d_sae, dtype=torch.long, device=trainer.strategy.root_device)
        self.rows_since_fired = zeros.clone()
        self.window_counts = zeros.clone()
        self.window_rows = 0
        self.density: Tensor | None = None
        self._step_counts = zeros.clone()
        self._step_rows = torch.zeros((), dtype=torch.long, device=zeros.device)
        self._hook = pl_module.encoder.register_forward_hook(self._record)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-apply the state loaded from a checkpoint."""
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        device = self.rows_since_fired.device
        self.rows_since_fired.copy_(state["rows_since_fired"].to(device))
        self.window_counts.copy_(state["window_counts"].to(device))
        self.window_rows = int(state["window_rows"])
        self.density = None if state["density"] is None else state["density"].to(device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows_since_fired": self.rows_since_fired.cpu(),
            "window_counts": self.window_counts.cpu(),
            "window_rows": self.window_rows,
            "density": None if self.density is None else self.density.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    # ------------------------------------------------------------------ counting
    @torch.no_grad()
    def _record(self, encoder: nn.Module, inputs: tuple[Any, ...], features: Tensor) -> None:
        """Forward hook: add the training step's firings (not validation's, nor other callers')."""
        if self._in_batch and encoder.training:
            fired = features.reshape(-1, features.shape[-1]) > 0
            self._step_counts += fired.sum(0)
            self._step_rows += fired.shape[0]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_batch = True

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Sum the step's counts over ranks, update the counters, log, and close a full window."""
        self._in_batch = False
        step = torch.cat([self._step_counts, self._step_rows.view(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)
        self._step_counts.zero_()
        self._step_rows.zero_()
        counts, rows = step[:-1], int(step[-1])
        self.rows_since_fired.add_(rows).masked_fill_(counts > 0, 0)
        self.window_counts += counts
        self.window_rows += rows
        if self.window_rows >= self.window_tokens:
            self.density = self.window_counts.double() / self.window_rows
            self.window_counts.zero_()
            self.window_rows = 0
            self._log_histogram(trainer, self.density)
        if not pl_module.logs_this_step():
            return
        pl_module.log("train/dead_fraction", self.dead_mask().float().mean())
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
    def dead_mask(self) -> Tensor:
        """[m] bool: features that fired on none of the last ``window_tokens`` training rows."""
        return self.rows_since_fired >= self.window_tokens

    def revive_(self, indices: Tensor) -> None:
        """Restart the count of rows without firing of ``indices`` (features just resampled)."""
        self.rows_since_fired[indices] = 0

    def feature_density(self) -> Tensor | None:
        """[m] firing frequency over the last complete window, else over the rows seen so far.

        None before any training row. Its log10 is SAELens' ``sparsity.safetensors``.
        """
        if self.density is not None:
            return self.density
        if self.window_rows == 0:
            return None
        return self.window_counts.double() / self.window_rows
