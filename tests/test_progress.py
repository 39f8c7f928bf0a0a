"""``StepProgressBar``: one bar over the run's steps, and the CLI's default bar."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from lightning import Trainer

from lightning_sae.callbacks.progress import StepProgressBar
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder

CONFIGS = Path(__file__).parents[1] / "configs"


def test_the_bar_counts_optimizer_steps_of_max_steps_across_epochs(
    toy_data: Callable[..., ActivationDataModule],
    callback_trainer: Callable[..., Trainer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = toy_data(val_rows=4096)  # the toy file's remaining rows make epochs of 56 batches of 64
    bar = StepProgressBar(refresh_rate=7)
    model = SparseAutoencoder(d_in=16, d_sae=32, input_scale=data.input_scale)
    trainer = callback_trainer(140, [bar], enable_progress_bar=True)
    trainer.fit(model, data)
    assert trainer.current_epoch >= 2, "the run crossed epochs"
    assert bar.train_progress_bar.total == 140 and bar.train_progress_bar.n == 140
    assert bar.train_progress_bar.desc.startswith("train")


def test_the_cli_shows_the_step_bar_unless_the_bar_is_off(toy_file: Path, tmp_path: Path) -> None:
    def fit(*extra: str) -> Trainer:
        from lightning_sae.cli import SAECLI

        args = [
            "--config", str(CONFIGS / "quickstart.yaml"), "--data.path", str(toy_file), "--data.val_rows", "1024",
            "--trainer.max_steps", "5",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path), *extra,
        ]
        return SAECLI(SparseAutoencoder, ActivationDataModule, run=False, args=args).trainer

    assert isinstance(fit().progress_bar_callback, StepProgressBar)
    assert fit("--trainer.enable_progress_bar", "false").progress_bar_callback is None
    named = fit("--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar").progress_bar_callback
    assert type(named).__name__ == "RichProgressBar"
