"""``SparsityWarmup``: λ(s) = λ·min(1, s/S), for the chosen penalties, also after a resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim import Optimizer

from lightning_sae.callbacks.sparsity_warmup import SparsityWarmup
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1, PreAct, Tanh


class RecordCoefficients(Callback):
    """The coefficient each penalty had in each optimizer step's loss, by step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        self.by_step[trainer.global_step] = {
            name: penalty.current_coefficient for name, penalty in zip(pl_module.penalty_names, pl_module.penalties)
        }


def make_model(input_scale: float) -> SparseAutoencoder:
    return SparseAutoencoder(d_in=16, d_sae=32, penalties=[Tanh(2.0), PreAct(0.5)], lr=1e-3, input_scale=input_scale)


def test_coefficient_rises_linearly_over_the_whole_run(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    record = RecordCoefficients()
    trainer = callback_trainer(10, [SparsityWarmup(), record], log_every_n_steps=5)
    trainer.fit(make_model(data.input_scale), data)
    assert sorted(record.by_step) == list(range(10))
    for step, coefficients in record.by_step.items():
        assert coefficients["tanh"] == pytest.approx(2.0 * step / 10)
        assert coefficients["pre_act"] == 0.5  # not a sparsity penalty: not warmed up by default
    assert trainer.callback_metrics["train/tanh_coefficient"].item() == pytest.approx(2.0 * 9 / 10)


def test_named_penalties_over_configured_steps(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    record = RecordCoefficients()
    trainer = callback_trainer(8, [SparsityWarmup(penalties=["pre_act"], steps=4), record])
    trainer.fit(make_model(data.input_scale), data)
    for step, coefficients in record.by_step.items():
        assert coefficients["pre_act"] == pytest.approx(0.5 * min(1.0, step / 4))
        assert coefficients["tanh"] == 2.0


def test_default_warms_every_sparsity_penalty(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=8, penalties=[L1(1.0), L1(3.0), PreAct(1.0)], input_scale=data.input_scale)
    record = RecordCoefficients()
    callback_trainer(3, [SparsityWarmup(steps=2), record]).fit(model, data)
    assert record.by_step[1] == {"l1": 0.5, "l1_2": 1.5, "pre_act": 1.0}


def test_unknown_penalty_and_bad_steps_are_refused() -> None:
    model = SparseAutoencoder(d_in=4, d_sae=8, penalties=[Tanh()])
    with pytest.raises(UserError, match="l1"):
        SparsityWarmup(penalties=["l1"]).setup(Trainer(logger=False, accelerator="cpu"), model, "fit")
    with pytest.raises(UserError, match="positive"):
        SparsityWarmup(steps=0)


def test_coefficients_after_resume_follow_the_same_line(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    trainer = callback_trainer(10, [SparsityWarmup(), checkpoints], enable_checkpointing=True)
    trainer.fit(make_model(data.input_scale), data)
    record = RecordCoefficients()
    resumed = callback_trainer(10, [SparsityWarmup(), record])
    torch.manual_seed(1)
    resumed.fit(make_model(data.input_scale), toy_data(), ckpt_path=tmp_path / "epoch=0-step=5.ckpt")
    assert sorted(record.by_step) == list(range(5, 10))
    for step, coefficients in record.by_step.items():
        assert coefficients["tanh"] == pytest.approx(2.0 * step / 10)
