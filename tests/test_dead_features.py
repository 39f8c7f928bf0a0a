"""``DeadFeatureTracker``: counts against a recount, windows, logging, what it ignores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from lightning_sae.callbacks.dead_features import DeadFeatureTracker
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

BATCH = 64


class Recount(Callback):
    """Recounts each training batch's firings with the weights the training step uses.

    Runs the encoder in eval mode (identical for a ReLU) so the tracker's hook ignores it.
    """

    def __init__(self) -> None:
        self.fired: list[Tensor] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        pl_module.encoder.eval()
        self.fired.append(pl_module.encode(batch[0]) > 0)
        pl_module.encoder.train()


def relu_model(input_scale: float, silenced: int = 6) -> SparseAutoencoder:
    """A ReLU SAE whose first ``silenced`` features can never fire (b_enc = −1000)."""
    model = SparseAutoencoder(
        d_in=16, d_sae=32, penalties=[L1(0.1)], lr=3e-3, input_scale=input_scale, dead_after_tokens=4 * BATCH
    )
    with torch.no_grad():
        model.b_enc[:silenced] = -1000.0
    return model


def test_counts_match_a_recount(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    tracker = DeadFeatureTracker(window_tokens=4 * BATCH)
    recount = Recount()
    trainer = callback_trainer(10, [tracker, recount], val_check_interval=3, limit_val_batches=2, log_every_n_steps=5)
    model = relu_model(data.input_scale)
    trainer.fit(model, data)
    fired = torch.stack(recount.fired)  # [steps, rows, m]
    # windows close after steps 4 and 8; rows 8-9 are the open window
    torch.testing.assert_close(tracker.density, fired[4:8].flatten(0, 1).double().mean(0))
    assert tracker.window_rows == 2 * BATCH
    assert torch.equal(tracker.window_counts, fired[8:].flatten(0, 1).sum(0))
    fired_per_step = fired.any(1)
    last_fired = torch.where(fired_per_step.any(0), 9 - fired_per_step.int().flip(0).argmax(0), -1)
    rows_since = torch.where(last_fired >= 0, (9 - last_fired) * BATCH, 10 * BATCH)
    assert torch.equal(model.firing.rows_since_fired, rows_since)
    assert torch.equal(model.firing.dead_mask(), rows_since >= 4 * BATCH)
    assert model.firing.dead_mask()[:6].all()
    dead = model.firing.dead_mask().float().mean().item()
    assert trainer.callback_metrics["train/dead_fraction"].item() == pytest.approx(dead)
    dense = (tracker.density > 0.1).float().mean().item()
    assert trainer.callback_metrics["train/dense_fraction"].item() == pytest.approx(dense)


def test_density_before_the_first_window_covers_the_rows_so_far(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    tracker = DeadFeatureTracker(window_tokens=1_000_000)
    model = relu_model(data.input_scale)
    callback_trainer(3, [tracker]).fit(model, data)
    density = tracker.feature_density()
    assert density is not None and tracker.density is None
    torch.testing.assert_close(density, tracker.window_counts.double() / (3 * BATCH))
    assert not model.firing.dead_mask().any()  # nothing can be dead before dead_after_tokens rows


def test_histogram_goes_to_tensorboard(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = callback_trainer(6, [DeadFeatureTracker(window_tokens=2 * BATCH)], logger=logger)
    trainer.fit(relu_model(data.input_scale), data)
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Histograms("train/log10_feature_density")
    assert [event.step for event in histograms] == [2, 4, 6]
    assert histograms[0].histogram_value.num == 32
    assert histograms[0].histogram_value.min == pytest.approx(-10.0)  # the silenced features


def test_state_round_trips() -> None:
    tracker = DeadFeatureTracker(window_tokens=8)
    model = SparseAutoencoder(d_in=4, d_sae=5)
    tracker.setup(Trainer(logger=False, accelerator="cpu"), model, "fit")
    tracker.window_counts.copy_(torch.tensor([1, 0, 0, 0, 2]))
    tracker.window_rows = 4
    state = tracker.state_dict()
    restored = DeadFeatureTracker(window_tokens=8)
    restored.setup(Trainer(logger=False, accelerator="cpu"), model, "fit")
    restored.load_state_dict(state)
    restored.on_fit_start(Trainer(logger=False, accelerator="cpu"), model)
    torch.testing.assert_close(restored.feature_density(), torch.tensor([0.25, 0, 0, 0, 0.5], dtype=torch.float64))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UserError, match="window_tokens"):
        DeadFeatureTracker(window_tokens=0)
    with pytest.raises(UserError, match="dense_threshold"):
        DeadFeatureTracker(dense_threshold=1.0)
