"""Two CPU processes (gloo, ddp_spawn): dead counts, calibration and resampling agree across ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks import DeadFeatureTracker, EncoderBiasCalibration, Resampling
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

STEPS = 8
BATCH = 64
WINDOW = 3 * 2 * BATCH  # three steps of both ranks


class SaveRankState(Callback):
    """Writes what each rank holds to ``<directory>/rank<r>.pt``: the biases after calibration,
    the features resampled at step 4, the final tracker state and weights, the first batch seen."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.saved: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        self.saved["calibrated_b_enc"] = pl_module.b_enc.detach().clone()

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        if trainer.global_step == 0:
            self.saved["first_batch"] = batch[0].clone()
            pl_module.b_enc[:8] = -1000.0  # dead from the start: resampled at step 4
        if trainer.global_step == 4:
            self.saved["resampled"] = (pl_module.b_enc[:8] > -1000.0).nonzero().flatten()
            self.saved["b_enc_at_4"] = pl_module.b_enc.detach().clone()
            self.saved["W_dec_at_4"] = pl_module.W_dec.detach().clone()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tracker = next(callback for callback in trainer.callbacks if isinstance(callback, DeadFeatureTracker))
        self.saved["tracker"] = tracker.state_dict()
        self.saved["weights"] = {name: value.clone() for name, value in pl_module.state_dict().items()}
        torch.save(self.saved, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_ranks_agree(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    model = SparseAutoencoder(
        d_in=16, d_sae=32, penalties=[L1(0.1)], lr=3e-3, input_scale=data.input_scale, dead_after_tokens=WINDOW
    )
    callbacks = [
        DeadFeatureTracker(window_tokens=WINDOW),
        Resampling(steps=[4], sample_rows=1024, firing_rate=0.05, calibration_rows=1024),
        EncoderBiasCalibration(features_per_row=4, sample_rows=1024),
        SaveRankState(tmp_path),
    ]
    trainer = callback_trainer(STEPS, callbacks, strategy="ddp_spawn", devices=2)
    trainer.fit(model, data)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # the ranks read different rows
    assert ranks[0]["calibrated_b_enc"].abs().sum() > 0
    assert torch.equal(ranks[0]["calibrated_b_enc"], ranks[1]["calibrated_b_enc"])
    assert len(ranks[0]["resampled"]) == 8
    assert torch.equal(ranks[0]["b_enc_at_4"], ranks[1]["b_enc_at_4"])  # revived biases calibrated once
    assert torch.equal(ranks[0]["W_dec_at_4"], ranks[1]["W_dec_at_4"])
    for key, value in ranks[0]["tracker"].items():
        other = ranks[1]["tracker"][key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    # both ranks' rows are counted: 8 steps × 2 ranks × 64 rows = 2 windows of 384 rows + 256
    assert ranks[0]["tracker"]["window_rows"] == STEPS * 2 * BATCH - 2 * WINDOW
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], value), name
