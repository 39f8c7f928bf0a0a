"""Shared fixtures: tiny activation files, CPU only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from lightning import Callback, Trainer

from lightning_sae.data import format
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.synth import synth


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run only where a CUDA device exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic file: 8,192 rows, d_in 16, 32 ground-truth features."""
    out = tmp_path_factory.mktemp("toy") / "toy.h5"
    return synth(out=out, n_rows=8192, d_in=16, n_features=32, mean_active=2.0, chunk_rows=512, seed=1)


@pytest.fixture(scope="session")
def transcoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small X != Y file: activations [2048, 12], targets [2048, 10] = a fixed linear map of x."""
    out = tmp_path_factory.mktemp("transcoder") / "transcoder.h5"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 12)).astype(np.float32)
    y = (x @ rng.standard_normal((12, 10)) / 3).astype(np.float32)
    with format.create(out, d_in=12, d_out=10, chunk_rows=256) as file:
        format.append(file, x, y)
    return out


def _write_raw(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as file:
        for name, value in datasets.items():
            file[name] = value
    return path


@pytest.fixture
def write_raw() -> Callable[..., Path]:
    """``write_raw(path, name=array, ...)``: an HDF5 file written with plain h5py, as another tool would."""
    return _write_raw


def _write_ids(
    path: Path, n_rows: int, d_in: int = 4, chunk_rows: int = 16, d_out: int | None = None, first_id: int = 0
) -> Path:
    """An activation file whose column 0 (of activations and targets) is the row's id ``first_id + i``.

    The other columns are standard normal, so the scale estimate has something to measure.
    """
    rng = np.random.default_rng(first_id)
    ids = np.arange(first_id, first_id + n_rows, dtype=np.float32)
    x = rng.standard_normal((n_rows, d_in)).astype(np.float32)
    x[:, 0] = ids
    y = None
    if d_out is not None:
        y = rng.standard_normal((n_rows, d_out)).astype(np.float32)
        y[:, 0] = ids
    with format.create(path, d_in=d_in, d_out=d_out, chunk_rows=chunk_rows) as file:
        format.append(file, x, y)
    return path


@pytest.fixture
def id_file(tmp_path: Path) -> Callable[..., Path]:
    """``id_file(name, n_rows, d_in=4, chunk_rows=16, d_out=None, first_id=0)``: a file in tmp_path whose
    column 0 is a global row id, so a test can tell which rows a batch holds."""
    return lambda name, n_rows, **kwargs: _write_ids(tmp_path / name, n_rows, **kwargs)


# ------------------------------------------------------------------- training-recipe callbacks
def _callback_trainer(max_steps: int, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    """A quiet CPU Trainer: no logger, checkpoints, progress bar, model summary nor validation."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "callbacks": callbacks,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
    }
    return Trainer(**{**options, **kwargs})


@pytest.fixture
def callback_trainer() -> Callable[..., Trainer]:
    """``callback_trainer(max_steps, callbacks, **trainer_kwargs)``: see ``_callback_trainer``."""
    return _callback_trainer


@pytest.fixture
def toy_data(toy_file: Path) -> Callable[..., ActivationDataModule]:
    """``toy_data(**kwargs)``: an ActivationDataModule over ``toy_file``, batches of 64 rows, 512 held out."""
    defaults: dict[str, int] = {"batch_size": 64, "val_rows": 512, "buffer_rows": 512, "scale_sample_rows": 1024}
    return lambda **kwargs: ActivationDataModule(str(toy_file), **{**defaults, **kwargs})


# ------------------------------------------------------------------- the README's own plug-in example
README = Path(__file__).parents[1] / "README.md"


@pytest.fixture
def readme_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The module ``my_plugins`` exactly as the README's plug-in example writes it, importable."""
    import importlib
    import re

    (code,) = re.findall(r"```python\n(# my_plugins\.py\n.*?)```", README.read_text(), flags=re.DOTALL)
    (tmp_path / "my_plugins.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "my_plugins", raising=False)
    return importlib.import_module("my_plugins")
