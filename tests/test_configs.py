"""Config hub: every YAML in configs/ parses and instantiates (litgpt style)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_sae.cli import SAECLI
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert {"anthropic-jan2025.yaml", "jumprelu-l0.yaml", "topk.yaml", "relu-l1.yaml", "quickstart.yaml"} <= {
        config.name for config in CONFIGS
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_config_instantiates(config: Path, toy_file: Path, tmp_path: Path) -> None:
    cli = SAECLI(
        SparseAutoencoder,
        ActivationDataModule,
        run=False,
        args=["--config", str(config), "--data.path", str(toy_file), "--data.val_rows", "512",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu", "--model.d_sae", "64"],
    )
    assert isinstance(cli.model, SparseAutoencoder)
    assert cli.model.d_in == 16 and cli.model.d_sae == 64
    assert cli.model.input_scale.item() == pytest.approx(cli.datamodule.input_scale)
    assert cli.trainer.max_steps > 0
