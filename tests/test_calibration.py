"""``EncoderBiasCalibration``: firing rates on held-out rows, thresholds, fresh starts only."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_sae.callbacks.calibration import EncoderBiasCalibration
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.format import ACTIVATIONS, TARGETS
from lightning_sae.encoders import Encoder, JumpReLU, ReLU
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

VAL_ROWS = 2048


class KeepStart(Callback):
    """Copies the model at ``on_train_start``: after every ``on_fit_start``, before any step."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.model = copy.deepcopy(pl_module)


def held_out_rows(path: Path) -> Tensor:
    """The last VAL_ROWS rows of the file: the validation rows, never used for calibration."""
    with h5py.File(path, "r") as file:
        return torch.from_numpy(file[ACTIVATIONS][-VAL_ROWS:])


@pytest.mark.parametrize(
    ("encoder", "features_per_row", "max_rate", "rate"),
    [(ReLU, 10_000.0, 0.1, 0.1), (JumpReLU, 4.0, 0.5, 4 / 64), (ReLU, 16.0, 0.5, 0.25)],
    ids=["relu-capped", "jumprelu", "relu-uncapped"],
)
def test_firing_rates_match_the_target_on_held_out_rows(
    encoder: Callable[[int], Encoder],
    features_per_row: float,
    max_rate: float,
    rate: float,
    toy_file: Path,
    toy_data: Callable[..., ActivationDataModule],
    callback_trainer: Callable[..., Trainer],
) -> None:
    data = toy_data(val_rows=VAL_ROWS)
    model = SparseAutoencoder(d_in=16, d_sae=64, encoder=encoder, input_scale=data.input_scale)
    calibration = EncoderBiasCalibration(features_per_row=features_per_row, max_rate=max_rate, sample_rows=4096)
    keep = KeepStart()
    callback_trainer(1, [calibration, keep]).fit(model, data)
    assert calibration.target_rate(model) == pytest.approx(rate)
    with torch.no_grad():
        rates = (keep.model.encode(held_out_rows(toy_file)) > 0).float().mean(0)
    assert rates.mean().item() == pytest.approx(rate, abs=0.01)
    assert (rates - rate).abs().max().item() < 0.05


def test_jumprelu_threshold_is_accounted_for(toy_data: Callable[..., ActivationDataModule]) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=64, encoder=lambda d_sae: JumpReLU(d_sae, initial_log_threshold=1.0),
                              input_scale=data.input_scale)
    relu = SparseAutoencoder(d_in=16, d_sae=64, input_scale=data.input_scale)
    relu.load_state_dict(model.state_dict(), strict=False)
    x = torch.cat([x for x, _ in data.sample_batches(1024, seed=0)])
    calibration = EncoderBiasCalibration(features_per_row=8)
    torch.testing.assert_close(calibration.biases(model, x) - calibration.biases(relu, x), torch.full((64,), torch.e))


def test_sample_reads_fresh_rows_with_targets(transcoder_file: Path) -> None:
    data = ActivationDataModule(str(transcoder_file), batch_size=64, val_rows=256)
    batches = list(data.sample_batches(300, seed=3))
    assert sum(len(x) for x, _ in batches) == 300
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches if y is not None])
    with h5py.File(transcoder_file, "r") as file:
        rows = torch.from_numpy(file[ACTIVATIONS][:])
        targets = torch.from_numpy(file[TARGETS][:])
    index = torch.cdist(x, rows).argmin(1)
    torch.testing.assert_close(rows[index], x)
    torch.testing.assert_close(targets[index], y)
    assert (index < 2048 - 256).all() and len(set(index.tolist())) == 300
    assert not torch.equal(index, index.sort().values)  # shuffled
    again = torch.cat([x for x, _ in data.sample_batches(300, seed=3)])
    assert torch.equal(again, x)


def test_skipped_when_resuming(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    model = SparseAutoencoder(d_in=16, d_sae=32, lr=1e-2, input_scale=data.input_scale)
    trainer = callback_trainer(2, [EncoderBiasCalibration(sample_rows=1024), checkpoints], enable_checkpointing=True)
    trainer.fit(model, data)
    path = tmp_path / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=True)["state_dict"]["b_enc"]
    assert saved.abs().sum() > 0
    keep = KeepStart()
    fresh = SparseAutoencoder(d_in=16, d_sae=32, lr=1e-2, input_scale=data.input_scale)
    callback_trainer(3, [EncoderBiasCalibration(sample_rows=1024), keep]).fit(fresh, toy_data(), ckpt_path=path)
    assert torch.equal(keep.model.b_enc.detach(), saved)


def test_too_few_rows_for_the_rate_are_refused() -> None:
    model = SparseAutoencoder(d_in=4, d_sae=1000)
    with pytest.raises(UserError, match="sample_rows"):
        EncoderBiasCalibration(features_per_row=1, sample_rows=100).biases(model, torch.randn(100, 4))


def test_without_a_count_it_calibrates_to_the_model_target_l0(
    toy_file: Path, toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data(val_rows=VAL_ROWS)
    model = SparseAutoencoder(d_in=16, d_sae=64, penalties=[L1(0.1)], target_l0=8.0, input_scale=data.input_scale)
    keep = KeepStart()
    callback_trainer(1, [EncoderBiasCalibration(features_per_row=None, max_rate=0.5, sample_rows=4096), keep]).fit(
        model, data
    )
    with torch.no_grad():
        l0 = (keep.model.encode(held_out_rows(toy_file)) > 0).sum(-1).float().mean().item()
    assert l0 == pytest.approx(8.0, rel=0.15)
    with pytest.raises(UserError, match="needs model.target_l0"):
        callback_trainer(1, [EncoderBiasCalibration(features_per_row=None)]).fit(
            SparseAutoencoder(d_in=16, d_sae=64, input_scale=data.input_scale), toy_data(val_rows=VAL_ROWS)
        )
