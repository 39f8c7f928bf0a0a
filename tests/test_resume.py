"""N steps straight = N/2 steps, checkpoint, resume, N/2 steps: same weights, every callback on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae.callbacks import (
    DeadFeatureTracker,
    DecoderNormFolding,
    EncoderBiasCalibration,
    Resampling,
    SparsityWarmup,
)
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import JumpReLU
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import PreAct, Tanh

STEPS = 16
BATCH = 64


class Silence(Callback):
    """Makes features dead at given steps (b_enc = −1000), so both halves have some to resample."""

    def __init__(self, at: dict[int, slice]) -> None:
        self.at = at

    @torch.no_grad()
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.at:
            assert isinstance(pl_module, SparseAutoencoder)
            pl_module.b_enc[self.at[trainer.global_step]] = -1000.0


class CountResampled(Callback):
    """How many features have b_enc = θ exactly (just resampled) when steps 4 and 12 start.

    Listed after ``Resampling``, whose ``on_train_batch_start`` therefore runs first.
    """

    def __init__(self) -> None:
        self.resampled: dict[int, int] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        if trainer.global_step in (4, 12):
            thresholds = pl_module.encoder.threshold(pl_module.decoder_norms())
            self.resampled[trainer.global_step] = int((pl_module.b_enc == thresholds).sum())


def run(
    toy_data: Callable[..., ActivationDataModule],
    callback_trainer: Callable[..., Trainer],
    directory: Path,
    ckpt_path: Path | None,
    **trainer_kwargs: Any,
) -> tuple[SparseAutoencoder, Trainer, CountResampled]:
    data = toy_data()
    torch.manual_seed(123 if ckpt_path else 0)  # a resumed run must not depend on its initialisation
    model = SparseAutoencoder(
        d_in=16,
        d_sae=48,
        encoder=JumpReLU,
        penalties=[Tanh(2.0), PreAct()],
        lr=3e-3,
        lr_warmup_steps=2,
        lr_rewarmup_steps=3,
        input_scale=data.input_scale,
        dead_after_tokens=3 * BATCH,
    )
    count = CountResampled()
    callbacks = [
        SparsityWarmup(),
        DeadFeatureTracker(window_tokens=3 * BATCH),
        Resampling(steps=[4, 12], sample_rows=1024),
        EncoderBiasCalibration(features_per_row=4, sample_rows=1024),
        DecoderNormFolding(),
        Silence({1: slice(0, 8), 6: slice(8, 16)}),
        count,
        ModelCheckpoint(dirpath=directory, every_n_train_steps=STEPS // 2, save_top_k=-1),
    ]
    trainer = callback_trainer(STEPS, callbacks, enable_checkpointing=True, **trainer_kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer, count


def test_resumed_run_equals_straight_run(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    straight, straight_trainer, straight_count = run(toy_data, callback_trainer, tmp_path / "straight", None)
    checkpoint = tmp_path / "straight" / f"epoch=0-step={STEPS // 2}.ckpt"
    resumed, resumed_trainer, resumed_count = run(toy_data, callback_trainer, tmp_path / "resumed", checkpoint)

    assert straight_count.resampled[4] >= 8 and straight_count.resampled[12] >= 8  # both resamplings did work
    assert resumed_count.resampled == {12: straight_count.resampled[12]}
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    torch.testing.assert_close(resumed.decoder_norms(), torch.ones(48))
    trackers = [
        next(callback for callback in trainer.callbacks if isinstance(callback, DeadFeatureTracker))
        for trainer in (straight_trainer, resumed_trainer)
    ]
    for key, value in trackers[0].state_dict().items():
        other = trackers[1].state_dict()[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    states = [trainer.optimizers[0].state_dict()["state"] for trainer in (straight_trainer, resumed_trainer)]
    for number, state in states[0].items():
        for key, value in state.items():
            assert torch.equal(states[1][number][key], value), (number, key)
    assert resumed_trainer.lr_scheduler_configs[0].scheduler.state_dict() == (
        straight_trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )


@pytest.mark.cuda
def test_a_resumed_cuda_run_ends_where_the_straight_run_does(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    """On the GPU summation order may differ between runs, so the weights agree closely, not exactly."""
    straight, _, _ = run(toy_data, callback_trainer, tmp_path / "straight", None, accelerator="gpu")
    checkpoint = tmp_path / "straight" / f"epoch=0-step={STEPS // 2}.ckpt"
    resumed, _, _ = run(toy_data, callback_trainer, tmp_path / "resumed", checkpoint, accelerator="gpu")
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-4, rtol=1e-4, msg=name)
