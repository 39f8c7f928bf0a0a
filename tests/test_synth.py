"""The synthetic toy-model-of-superposition file."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from faults import run_cli_on_a_full_disk

from lightning_sae.cli import main
from lightning_sae.data import format
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.synth import firing_probabilities, synth
from lightning_sae.errors import UserError


def test_rows_are_sparse_sums_of_the_stored_unit_features(tmp_path: Path) -> None:
    path = synth(out=tmp_path / "t.h5", n_rows=4000, d_in=8, n_features=20, mean_active=3.0, noise=0.0, chunk_rows=512)
    with h5py.File(path) as file:
        x = file[format.ACTIVATIONS][()]
        features = file[format.GROUND_TRUTH]["features"][()]
        probabilities = file[format.GROUND_TRUTH]["firing_probabilities"][()]
    assert x.shape == (4000, 8) and features.shape == (20, 8)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-6)
    assert probabilities.sum() == pytest.approx(3.0)
    assert np.all(np.diff(probabilities) < 0), "power-law: decreasing frequencies"
    # without noise every row lies in the span of the features with non-negative coefficients
    coefficients, *_ = np.linalg.lstsq(features.T, x.T, rcond=None)
    np.testing.assert_allclose(features.T @ coefficients, x.T, atol=1e-4)
    assert format.read_info(path).n_rows == 4000


def test_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    synth(out=tmp_path / "t.h5", n_rows=10, d_in=4, n_features=8, mean_active=1.0)
    with pytest.raises(UserError, match="exists"):
        synth(out=tmp_path / "t.h5", n_rows=10, d_in=4, n_features=8, mean_active=1.0)
    synth(out=tmp_path / "t.h5", n_rows=20, d_in=4, n_features=8, mean_active=1.0, overwrite=True)
    assert format.read_info(tmp_path / "t.h5").n_rows == 20


def test_impossible_firing_rates_are_refused() -> None:
    with pytest.raises(UserError, match="above 1"):
        firing_probabilities(4, mean_active=3.9, exponent=2.0)


def test_offset_and_magnitudes(tmp_path: Path) -> None:
    # fewer features than dimensions, so each row's coefficients are unique
    path = synth(out=tmp_path / "t.h5", n_rows=20_000, d_in=16, n_features=8, mean_active=2.0, exponent=0.0,
                 noise=0.0, min_magnitude=0.5, max_magnitude=1.5, offset=3.0)
    with h5py.File(path) as file:
        x = file[format.ACTIVATIONS][()]
        features = file[format.GROUND_TRUTH]["features"][()]
        offset = file[format.GROUND_TRUTH]["offset"][()]
        probabilities = file[format.GROUND_TRUTH]["firing_probabilities"][()]
    assert np.linalg.norm(offset) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(probabilities, 2.0 / 8)
    coefficients, *_ = np.linalg.lstsq(features.T, (x - offset).T, rcond=None)
    active = coefficients[np.abs(coefficients) > 1e-3]
    assert active.min() >= 0.5 - 1e-3 and active.max() <= 1.5 + 1e-3
    assert (np.abs(coefficients) > 1e-3).sum(0).mean() == pytest.approx(2.0, rel=0.05)


def test_bad_magnitudes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="magnitude"):
        synth(
            out=tmp_path / "t.h5", n_rows=10, d_in=4, n_features=8, mean_active=1.0, min_magnitude=2.0,
            max_magnitude=1.0,
        )


def _rows(path: Path) -> np.ndarray:
    with h5py.File(path, "r", locking=False) as file:
        return file[format.ACTIVATIONS][()]


def test_overwriting_a_file_a_run_reads_is_refused_and_the_file_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synth(out=tmp_path / "t.h5", n_rows=2048, d_in=4, n_features=8, mean_active=1.0, chunk_rows=256)
    before = _rows(path)
    reader = ActivationDataModule(str(path), batch_size=64, val_rows=256)
    reader.setup("fit")
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(path), "--n_rows", "100", "--d_in", "4", "--overwrite", "true"])
    assert exit_info.value.code == 2
    assert "in use by another process" in capsys.readouterr().err
    np.testing.assert_array_equal(_rows(path), before)
    reader.teardown("fit")
    main(["synth", "--out", str(path), "--n_rows", "100", "--d_in", "4", "--overwrite", "true"])
    assert format.read_info(path).n_rows == 100
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def test_a_killed_synth_leaves_no_file_that_reads_as_complete(tmp_path: Path) -> None:
    out = tmp_path / "t.h5"
    command = [sys.executable, "-m", "lightning_sae.cli", "synth", "--out", str(out), "--n_rows", "100000000"]
    child = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 1 << 20 for p in tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()
    with pytest.raises(UserError, match="not found"):
        format.read_info(out)


def test_a_full_disk_ends_synth_with_one_line_and_no_file(tmp_path: Path) -> None:
    done = run_cli_on_a_full_disk(["synth", "--out", "t.h5", "--n_rows", "100000"], 200_000, tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "lightning_sae: error: no space left on the disk to write t.h5; nothing was written (free space and rerun)"
    ]
    assert list(tmp_path.iterdir()) == []
