"""The lightning_sae command: an end-to-end fit on synthetic data, the export, and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lightning_sae.cli import main
from lightning_sae.data.format import ACTIVATIONS
from lightning_sae.model import SparseAutoencoder

CONFIGS = Path(__file__).parents[1] / "configs"


def fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    """A short ReLU + L1 fit on the toy file (two features active per row), logged under ``root``."""
    return [
        "fit", "--config", str(CONFIGS / "relu-l1.yaml"),
        "--data.path", str(data), "--data.batch_size", "256", "--data.val_rows", "1024", "--data.buffer_rows", "4096",
        "--model.d_sae", "64", "--model.lr", "3e-3", "--model.penalties.coefficient", "1.0", "--model.target_l0", "2",
        "--trainer.max_steps", "600", "--trainer.val_check_interval", "600",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.default_root_dir", str(root),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(toy_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of one fit on the toy file."""
    root = tmp_path_factory.mktemp("fit")
    main(fit_args(toy_file, root))
    (run,) = (root / "relu-l1").iterdir()
    return run


def sae_lens_forward(export_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """SAELens' 'standard' SAE written out from its formulas: relu(x W_enc + b_enc) W_dec + b_dec."""
    weights = load_file(export_dir / "sae_weights.safetensors")
    features = torch.relu(x @ weights["W_enc"] + weights["b_enc"])
    return features @ weights["W_dec"] + weights["b_dec"]


def test_fit_recovers_the_ground_truth_features(fitted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = list(fitted.glob("events.out.tfevents.*"))
    assert events, "TensorBoard logs are written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(fitted)).Reload().Tags()["scalars"]
    for tag in ("val/mmcs", "val/fvu", "val/l0", "val/dead_fraction", "train/loss", "train/mse", "train/l1", "train/lr", "train/l1_coefficient"):
        assert tag in scalars, tag
    mmcs = EventAccumulator(str(fitted)).Reload().Scalars("val/mmcs")[-1].value
    assert mmcs >= 0.9


def test_export_reproduces_the_model_on_raw_activations(fitted: Path, toy_file: Path) -> None:
    export_dir = fitted / "sae"
    config = json.loads((export_dir / "cfg.json").read_text())
    assert config["architecture"] == "standard" and config["d_in"] == 16 and config["d_sae"] == 64
    assert config["normalize_activations"] == "none"
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    model = SparseAutoencoder.from_checkpoint(checkpoint).eval()
    assert model.input_scale.item() != pytest.approx(1.0), "the scaling is really folded in"
    with h5py.File(toy_file) as file:
        x = torch.from_numpy(file[ACTIVATIONS][:512])
    with torch.no_grad():
        torch.testing.assert_close(sae_lens_forward(export_dir, x), model(x), atol=1e-5, rtol=1e-5)
    weights = load_file(export_dir / "sae_weights.safetensors")
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(64))


def test_export_command_matches_the_fit_end_export(fitted: Path, tmp_path: Path) -> None:
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    main(["export", "--ckpt", str(checkpoint), "--out", str(tmp_path / "again")])
    first, again = load_file(fitted / "sae" / "sae_weights.safetensors"), load_file(tmp_path / "again" / "sae_weights.safetensors")
    for name in first:
        torch.testing.assert_close(first[name], again[name], atol=1e-6, rtol=1e-6)


def test_synth_command_writes_a_file(tmp_path: Path) -> None:
    main(["synth", "--out", str(tmp_path / "s.h5"), "--n_rows", "100", "--d_in", "4", "--n_features", "8", "--mean_active", "1"])
    with h5py.File(tmp_path / "s.h5") as file:
        assert file[ACTIVATIONS].shape == (100, 4)


def test_a_file_written_by_plain_h5py_trains(tmp_path: Path, write_raw) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16)
    path = write_raw(tmp_path / "plain.h5", activations=x)
    main([*fit_args(path, tmp_path), "--trainer.max_steps", "20", "--trainer.val_check_interval", "20"])
    (run,) = (tmp_path / "relu-l1").iterdir()
    config = json.loads((run / "sae" / "cfg.json").read_text())
    assert config["d_in"] == 16


def expect_user_error(args: list[str], capsys: pytest.CaptureFixture[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_user_error(fit_args(tmp_path / "absent.h5", tmp_path), capsys, "activation file not found")


def test_file_without_activations(tmp_path: Path, write_raw, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_raw(tmp_path / "x.h5", features=np.ones((10, 4), np.float32))
    expect_user_error(fit_args(path, tmp_path), capsys, "no 'activations' dataset")


def test_nan_rows(tmp_path: Path, write_raw, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    x[3000, 5] = np.nan
    path = write_raw(tmp_path / "nan.h5", activations=x)
    expect_user_error(fit_args(path, tmp_path), capsys, "row 3000 holds NaN or Inf")


def test_k_larger_than_d_sae(toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = fit_args(toy_file, tmp_path)
    args[2] = str(CONFIGS / "topk.yaml")
    args.remove("--model.penalties.coefficient")
    args.remove("1.0")
    expect_user_error([*args, "--model.encoder.k", "65"], capsys, "TopK k=65 must be between 1 and d_sae=64")


def test_unknown_class_path(toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*fit_args(toy_file, tmp_path), "--model.encoder", "lightning_sae.encoders.NoSuchEncoder"])
    assert exit_info.value.code == 2
    assert "NoSuchEncoder" in capsys.readouterr().err


def test_resuming_on_data_of_another_width(fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_sae.data.synth import synth

    other = synth(out=tmp_path / "wide.h5", n_rows=4096, d_in=24, n_features=32, mean_active=2.0, chunk_rows=512)
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    expect_user_error([*fit_args(other, tmp_path), "--ckpt_path", str(checkpoint)], capsys, "checkpoint has d_in=16")


def test_overview_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    out = capsys.readouterr().out
    for command in ("fit", "synth", "export"):
        assert command in out


def test_a_fit_shorter_than_its_validation_interval_still_ends_with_validation(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([*fit_args(toy_file, tmp_path), "--trainer.max_steps", "30", "--trainer.val_check_interval", "5000"])
    out = capsys.readouterr().out
    metrics = out.split("final validation metrics:")[1].split("TensorBoard logs:")[0]
    for name in ("val/fvu", "val/l0", "val/loss", "val/mmcs", "val/recovered"):
        assert name in metrics, out


def test_a_plugin_without_a_saelens_form_trains_and_says_why_there_is_no_export(
    readme_plugins: Any, toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = ["--model.encoder", "my_plugins.SoftplusGate"]
    # relu-l1.yaml folds the decoder norms at the end: refused before any training
    expect_user_error([*fit_args(toy_file, tmp_path), *plugin], capsys, "SoftplusGate does not implement rescale_")
    main([*fit_args(toy_file, tmp_path), "--trainer.max_steps", "10", *plugin, "--trainer.callbacks=[]"])
    assert "SAELens export:   not written: SoftplusGate has no exact SAELens form" in capsys.readouterr().out
    run = max((tmp_path / "relu-l1").iterdir())
    assert not (run / "sae").exists()
    model = SparseAutoencoder.from_checkpoint(run / "checkpoints" / "final.ckpt")
    assert type(model.encoder).__name__ == "SoftplusGate"
