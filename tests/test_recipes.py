"""Every shipped config learns the true features of a small toy model of superposition.

The fast version of ``benchmarks/recipe_quality.py``: each config at its own defaults, with only
its sparsity knob set to the data's true L0 (``k`` of a TopK encoder, else ``model.target_l0``),
a small dictionary and a few thousand steps of small batches.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sae.cli import SAECLI
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.synth import synth
from lightning_sae.model import SparseAutoencoder
from lightning_sae.recipes import sparsity_arguments

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
TRUE_L0 = 3.0


@pytest.fixture(scope="module")
def superposition_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """128 power-law features in 32 dimensions, three active per row, and a shared offset."""
    return synth(
        out=tmp_path_factory.mktemp("recipes") / "superposition.h5", n_rows=69_632, d_in=32, n_features=128,
        mean_active=TRUE_L0, exponent=0.4, min_magnitude=0.5, max_magnitude=1.5, offset=1.0, seed=3,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
def test_the_recipe_recovers_the_true_features(config: Path, superposition_file: Path, tmp_path: Path) -> None:
    steps = 2000
    cli = SAECLI(
        SparseAutoencoder,
        ActivationDataModule,
        args=[
            "fit", "--config", str(config), "--data.path", str(superposition_file), "--data.batch_size", "1024",
            "--data.val_rows", "4096", "--data.buffer_rows", "65536", "--model.d_sae", "256",
            "--trainer.max_steps", str(steps), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
            *sparsity_arguments(config, TRUE_L0),
        ],
    )
    metrics = cli.trainer.callback_metrics
    assert metrics["val/mmcs"].item() >= 0.9, {name: round(value.item(), 3) for name, value in metrics.items()}
    assert metrics["val/l0"].item() == pytest.approx(TRUE_L0, rel=0.35)
