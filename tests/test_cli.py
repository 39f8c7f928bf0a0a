"""The lightning_sae command: an end-to-end fit on synthetic data, the export, and bad input."""

from __future__ import annotations

import errno
import json
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_sae.cli import main
from lightning_sae.data.format import ACTIVATIONS
from lightning_sae.model import SparseAutoencoder

CONFIGS = Path(__file__).parents[1] / "configs"


UNCORRECTED_CALLBACKS = json.dumps([
    callback for callback in yaml.safe_load((CONFIGS / "relu-l1.yaml").read_text())["trainer"]["callbacks"]
    if not callback["class_path"].endswith("ShrinkageCorrection")
])
"""relu-l1.yaml's callbacks but ShrinkageCorrection: the CLI's tests compare the fit-end export with
the checkpoints, which hold the SAE before the correction (tests/test_shrinkage.py tests it)."""


def fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    """A short ReLU + L1 fit on the toy file (two features active per row), logged under ``root``."""
    return [
        "fit", "--config", str(CONFIGS / "relu-l1.yaml"), "--trainer.callbacks", UNCORRECTED_CALLBACKS,
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
    validation = ("val/mmcs", "val/fvu", "val/l0", "val/dead_fraction")
    training = ("train/loss", "train/mse", "train/l1", "train/lr", "train/l1_coefficient")
    for tag in validation + training:
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
    first = load_file(fitted / "sae" / "sae_weights.safetensors")
    again = load_file(tmp_path / "again" / "sae_weights.safetensors")
    for name in first:
        torch.testing.assert_close(first[name], again[name], atol=1e-6, rtol=1e-6)


def test_synth_command_writes_a_file(tmp_path: Path) -> None:
    sizes = ["--n_rows", "100", "--d_in", "4", "--n_features", "8", "--mean_active", "1"]
    main(["synth", "--out", str(tmp_path / "s.h5"), *sizes])
    with h5py.File(tmp_path / "s.h5") as file:
        assert file[ACTIVATIONS].shape == (100, 4)


def test_a_file_written_by_plain_h5py_trains(tmp_path: Path, write_raw) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float16)
    path = write_raw(tmp_path / "plain.h5", activations=x)
    main([*fit_args(path, tmp_path), "--trainer.max_steps", "20", "--trainer.val_check_interval", "20"])
    (run,) = (tmp_path / "relu-l1").iterdir()
    config = json.loads((run / "sae" / "cfg.json").read_text())
    assert config["d_in"] == 16


def expect_user_error(args: list[str], capsys: pytest.CaptureFixture[str], message: str) -> str:
    """Run ``args``: exit status 2, no traceback, one error line holding ``message``; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("lightning_sae: error: ")]
    return line


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


# ------------------------------------------------------------------- never lose or corrupt a file
def short_fit_args(data: Path, root: Path, *extra: str) -> list[str]:
    """:func:`fit_args` for 20 steps, validated and checkpointed at the last."""
    return fit_args(data, root, "--trainer.max_steps", "20", "--trainer.val_check_interval", "20", *extra)


def contents(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included), by relative path."""
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_a_run_from_a_checkpoint_refuses_model_arguments_other_than_the_checkpoints(
    fitted: Path, toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    args = [*fit_args(toy_file, tmp_path), "--ckpt_path", str(checkpoint), "--model.lr", "0.5", "--model.d_sae", "128"]
    line = expect_user_error(args, capsys, f"{checkpoint} was trained with other model arguments: ")
    assert "d_sae=64 (given 128); lr=0.003 (given 0.5)." in line
    assert not (tmp_path / "relu-l1").exists(), "nothing is written"


def test_a_fit_into_a_used_logger_version_is_refused_unless_overwrite_replaces_it(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = ["--trainer.logger.init_args.version", "model.d_sae=64"]
    main(short_fit_args(toy_file, tmp_path, *version))
    run = tmp_path / "relu-l1" / "model.d_sae=64"
    before = contents(run)
    again = short_fit_args(toy_file, tmp_path, *version, "--model.d_sae", "32")
    expect_user_error(again, capsys, f"{run} holds another run (its logger version was used before)")
    assert contents(run) == before, "the first run's config, hparams, events and export are untouched"
    main([*again, "--overwrite", "true"])
    assert len(list(run.glob("events.out.tfevents.*"))) == 1, "the old run's events are gone, not mixed in"
    assert json.loads((run / "sae" / "cfg.json").read_text())["d_sae"] == 32
    config = (run / "config.yaml").read_text()
    assert "d_sae: 32" in config and "overwrite: false" in config, "running config.yaml again replaces nothing"


def test_a_fit_from_a_checkpoint_of_its_run_continues_in_its_directory(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = ["--trainer.logger.init_args.version", "v"]
    main(short_fit_args(toy_file, tmp_path, *version))
    run = tmp_path / "relu-l1" / "v"
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    resumed = [*version, "--ckpt_path", str(checkpoint), "--trainer.max_steps", "40"]
    expect_user_error([*short_fit_args(toy_file, tmp_path, *resumed), "--overwrite", "true"], capsys, "would delete")
    main([*short_fit_args(toy_file, tmp_path, *resumed), "--model.penalties.coefficient", "2.0"])
    from lightning_sae.checkpoint_io import read_checkpoint

    last = read_checkpoint(run / "checkpoints" / "epoch=1-step=40.ckpt")
    coefficient = last["plugins"]["penalties"][0]["init_args"]["coefficient"]
    assert coefficient == 2.0, "a penalty's coefficient applies as given"
    assert "coefficient: 2.0" in (run / "config.yaml").read_text()
    assert (run / "sae" / "cfg.json").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 2


def test_export_refuses_an_existing_export_and_overwrite_replaces_it_whole(
    fitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_sae.export import export, load_export

    density = torch.full((128,), -2.0)
    out = export(SparseAutoencoder(d_in=16, d_sae=128), tmp_path / "sae", log10_feature_density=density)
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    command = ["export", "--ckpt", str(checkpoint), "--out", str(out)]
    expect_user_error(command, capsys, f"{out} exists; pass --overwrite true to replace it")
    assert load_file(out / "sparsity.safetensors")["sparsity"].shape == (128,)
    main([*command, "--overwrite", "true"])
    assert not (out / "sparsity.safetensors").exists(), "no file of the earlier export is left beside the new one"
    assert load_export(out).d_sae == 64


def test_a_full_disk_during_fit_is_one_line_and_leaves_no_partial_checkpoint(toy_file: Path, tmp_path: Path) -> None:
    from faults import run_cli_on_a_full_disk

    # the checkpoint of d_sae 2048 (weights and Adam's state) is 768 KiB; the logs and config are smaller
    result = run_cli_on_a_full_disk(short_fit_args(toy_file, tmp_path, "--model.d_sae", "2048"), 256 * 1024, tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("lightning_sae: error: ")]
    assert "cannot write the checkpoint" in line and "File too large" in line
    (run,) = (tmp_path / "relu-l1").iterdir()
    names = [path.name for path in run.rglob("*")]
    assert not [name for name in names if name.endswith(".ckpt") or name.startswith(".")], names
    assert not (run / "sae").exists()


def test_a_full_disk_at_the_fit_end_export_is_one_line_and_leaves_no_export(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_sae.export.save_file", full)
    line = expect_user_error(short_fit_args(toy_file, tmp_path), capsys, "cannot write the export")
    (run,) = (tmp_path / "relu-l1").iterdir()
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    assert f"lightning_sae export --ckpt {checkpoint} --out {run / 'sae'}" in line
    assert not (run / "sae").exists() and not [path for path in run.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
@pytest.mark.parametrize("command", ["export", "fit", "validate"])
def test_a_bad_checkpoint_is_one_line(
    command: str, kind: str, fitted: Path, toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    bad = tmp_path / "bad.ckpt"
    if kind == "truncated":
        bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    args = {
        "export": ["export", "--ckpt", str(bad), "--out", str(tmp_path / "sae")],
        "fit": [*fit_args(toy_file, tmp_path), "--ckpt_path", str(bad)],
        "validate": ["validate", *fit_args(toy_file, tmp_path)[1:], "--ckpt_path", str(bad)],
    }[command]
    message = "checkpoint not found" if kind == "missing" else f"cannot read the checkpoint {bad}"
    expect_user_error(args, capsys, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == (["bad.ckpt"] if kind != "missing" else [])


def test_a_read_only_output_folder_is_one_line(
    fitted: Path, toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    mkdir = os.mkdir

    def refuse_inside(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).is_relative_to(read_only):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse_inside)  # as a read-only folder does, even for root
    expect_user_error(fit_args(toy_file, read_only), capsys, "cannot create the run directory")
    (checkpoint,) = (fitted / "checkpoints").glob("*.ckpt")
    out = read_only / "sae"
    command = ["export", "--ckpt", str(checkpoint), "--out", str(out)]
    expect_user_error(command, capsys, f"cannot write {out}: Permission denied")


@contextmanager
def address_space_limit(headroom: int) -> Iterator[None]:
    """Allocations beyond ``headroom`` more bytes of address space fail, as on a machine without the memory."""
    status = Path("/proc/self/status").read_text().splitlines()
    (size,) = [int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize")]
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_an_sae_too_large_for_the_memory_is_one_line_and_leaves_no_run_directory(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with address_space_limit(512 << 20):
        expect_user_error(
            [*fit_args(toy_file, tmp_path), "--model.d_sae", "200000000"],
            capsys,
            "cannot allocate the SAE's weights: d_sae=200000000 needs 25.6 GB for W_enc and W_dec",
        )
    assert not (tmp_path / "relu-l1").exists()
