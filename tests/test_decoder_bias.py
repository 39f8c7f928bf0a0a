"""``DecoderBiasInit``: b_dec at the geometric median (or mean) of the scaled targets, fresh fits only."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks.decoder_bias import DecoderBiasInit, geometric_median
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder


def test_geometric_median_minimises_the_sum_of_distances_and_ignores_outliers() -> None:
    points = torch.randn(500, 3, dtype=torch.float64)
    points[:50] += 100.0  # 10% far outliers pull the mean, not the median
    median = geometric_median(points)
    total = (points - median).norm(dim=1).sum()
    for _ in range(20):
        nudged = median + 0.05 * torch.randn(3, dtype=torch.float64)
        assert (points - nudged).norm(dim=1).sum() >= total
    assert median.norm() < 1.0 < points.mean(0).norm()


class KeepStart(Callback):
    """Copies the model at ``on_train_start``: after every ``on_fit_start``, before any step."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.model = copy.deepcopy(pl_module)


@pytest.mark.parametrize("method", ["geometric_median", "mean"])
def test_b_dec_starts_at_the_centre_of_the_scaled_rows(
    method: str, toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=32, input_scale=data.input_scale, center_input=True)
    keep = KeepStart()
    callback_trainer(1, [DecoderBiasInit(method=method, sample_rows=2048), keep]).fit(model, data)
    rows = torch.cat([x for x, _ in data.sample_batches(2048, seed=0)]).double() * data.input_scale
    expected = geometric_median(rows) if method == "geometric_median" else rows.mean(0)
    torch.testing.assert_close(keep.model.b_dec.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_resumed_fit_keeps_its_b_dec(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    first = callback_trainer(
        2, [DecoderBiasInit(sample_rows=2048)], enable_checkpointing=True, default_root_dir=tmp_path
    )
    first.fit(SparseAutoencoder(d_in=16, d_sae=32, input_scale=data.input_scale, center_input=True), data)
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]["b_dec"]
    keep = KeepStart()
    model = SparseAutoencoder(d_in=16, d_sae=32, input_scale=data.input_scale, center_input=True)
    callback_trainer(3, [DecoderBiasInit(sample_rows=2048), keep]).fit(model, toy_data(), ckpt_path=checkpoint)
    torch.testing.assert_close(keep.model.b_dec, saved)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UserError, match="method"):
        DecoderBiasInit(method="median")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="sample_rows"):
        DecoderBiasInit(sample_rows=0)
