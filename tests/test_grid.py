"""Grid files and running them: a tiny grid end to end through `make grid` and `make report`,
resuming, and grid files refused before anything runs."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_sae import grid as grid_module
from lightning_sae.cli import main
from lightning_sae.errors import UserError
from lightning_sae.grid import (
    METRICS_FILE,
    POINT_FILE,
    argument_value,
    load_grid,
    point_name,
    run_point,
)
from lightning_sae.run_summary import HPARAMS_DIR

ROOT = Path(__file__).parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY = {
    "data.batch_size": 256, "data.val_rows": 1024, "data.buffer_rows": 4096,
    "trainer.max_steps": 12, "trainer.val_check_interval": 12, "trainer.accelerator": "cpu",
}
"""Overrides that make a quickstart fit on the toy file take a second or two."""


def write_grid(path: Path, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ran(
    toy_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """A two-by-two grid (d_sae × L0) of a few steps on the toy file, run by `make grid JOBS=2`,
    then reported by `make report`."""
    folder = tmp_path_factory.mktemp("grid")
    grid_file = write_grid(
        folder / "tiny.yaml", config=str(QUICKSTART), set=TINY,
        axes={"model.d_sae": [32, 64], "l0": [2, 4]},
    )
    out = folder / "runs"
    made = subprocess.run(
        ["make", "-C", str(ROOT), "grid", f"GRID={grid_file}", f"DATA={toy_file}", f"OUT={out}", "JOBS=2"],
        capture_output=True, text=True, timeout=600,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    reported = subprocess.run(
        ["make", "-C", str(ROOT), "report", f"GRID={grid_file}", f"OUT={out}"],
        capture_output=True, text=True, timeout=600,
    )
    assert reported.returncode == 0, reported.stdout + reported.stderr
    return grid_file, out, made


def test_make_grid_runs_every_point_in_a_directory_named_after_its_overrides(ran: Any) -> None:
    _, out, made = ran
    names = {"d_sae=32,l0=2", "d_sae=32,l0=4", "d_sae=64,l0=2", "d_sae=64,l0=4"}
    assert {path.name for path in out.iterdir() if path.is_dir()} == names
    for name in names:
        run = out / name
        point = json.loads((run / POINT_FILE).read_text())
        assert point["recipe"] == "quickstart"
        assert point["overrides"]["model.d_sae"] == int(name.split(",")[0].split("=")[1])
        assert point["step"] == 12 and point["train_rows"] == 12 * 256
        assert 0 <= point["metrics"]["val/fvu"] <= 2
        # TopK sets the L0 exactly: the `l0` key reached the recipe's k
        assert point["metrics"]["val/l0"] == pytest.approx(point["overrides"]["l0"], abs=1e-4)
        assert point["density"]["d_sae"] == point["overrides"]["model.d_sae"]
        assert sum(point["density"]["histogram_counts"]) == point["density"]["d_sae"]
        assert point["downstream"] is None  # the toy file records no language model
        assert (run / "sae" / "cfg.json").is_file()
        assert any((run / HPARAMS_DIR).glob("events.out.tfevents.*"))
    assert "all 4 points finished" in made.stdout


def test_make_report_writes_the_table_and_the_plots(ran: Any) -> None:
    _, out, _ = ran
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4
    assert {row["recipe"] for row in rows} == {"quickstart"}
    assert sorted(float(row["l0"]) for row in rows) == pytest.approx([2.0, 2.0, 4.0, 4.0])
    markdown = (out / "report.md").read_text()
    assert "| recipe | overrides | L0 | FVU |" in markdown
    assert markdown.count("| quickstart |") == 4
    for plot in ("frontier_fvu.png", "dead_fraction.png", "fvu_vs_d_sae.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "frontier_delta_ce.png").exists()  # no downstream figures without a model


def test_a_second_run_skips_the_finished_points(ran: Any, toy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_file, out, _ = ran
    stamps = {path: path.stat().st_mtime_ns for path in out.glob(f"*/{POINT_FILE}")}
    main(["grid", "--grid", str(grid_file), "--data", str(toy_file), "--out", str(out)])
    assert "4 finished, 0 to run" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in out.glob(f"*/{POINT_FILE}")} == stamps


def test_another_data_file_is_refused_in_the_same_folder(ran: Any, tmp_path: Path) -> None:
    from lightning_sae.data.synth import synth

    grid_file, out, _ = ran
    other = synth(out=tmp_path / "other.h5", n_rows=4096, d_in=16, n_features=32, chunk_rows=512)
    with pytest.raises(UserError, match="give another --out"):
        grid_module.grid(grid=grid_file, data=other, out=out)


def test_an_interrupted_point_continues_from_its_newest_checkpoint(toy_file: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_grid(write_grid(tmp_path / "g.yaml", config=str(QUICKSTART), data=str(toy_file), set=TINY,
                                  axes={"model.d_sae": [32, 64]}), out=tmp_path / "runs")
    calls: list[list[str]] = []

    def fake_run(command: list[str], log: Path, env: dict[str, str], point: Any) -> None:
        calls.append(command)
        (loaded.out / point.name / METRICS_FILE).write_text(json.dumps({"metrics": {}, "step": 1, "train_rows": 1}))

    monkeypatch.setattr(grid_module, "_run", fake_run)
    first, second = loaded.points
    checkpoints = loaded.out / first.name / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "epoch=0-step=5.ckpt").write_bytes(b"old")
    (checkpoints / "epoch=1-step=10.ckpt").write_bytes(b"new")
    (checkpoints / ".epoch=2-step=15.ckpt.123.tmp").write_bytes(b"half")
    (loaded.out / second.name).mkdir()  # started, but wrote no checkpoint
    run_point(loaded, first, None, {})
    run_point(loaded, second, None, {})
    assert calls[0][calls[0].index("--ckpt_path") + 1] == str(checkpoints / "epoch=1-step=10.ckpt")
    assert "--overwrite" not in calls[0]
    assert calls[1][calls[1].index("--overwrite") + 1] == "true" and "--ckpt_path" not in calls[1]
    assert "--trainer.logger.init_args.version" in calls[1]
    # a fit that finished (metrics.json there) is not run again: only its point.json is written
    (loaded.out / first.name / POINT_FILE).unlink()
    run_point(loaded, first, None, {})
    assert len(calls) == 2 and (loaded.out / first.name / POINT_FILE).is_file()


def test_points_axes_and_paired_keys(toy_file: Path, tmp_path: Path) -> None:
    loaded = load_grid(write_grid(
        tmp_path / "g.yaml", config=str(QUICKSTART), data=str(toy_file), set=TINY,
        points=[{"label": "full"}, {"label": "no-folding", "without": ["DecoderNormFolding"]}],
        axes={"pair": {"model.d_sae": [32, 64], "model.lr": [0.001, 0.002]}, "seed_everything": [0, 1]},
    ))
    assert [point.name for point in loaded.points] == [
        "full,d_sae=32,lr=0.001,seed_everything=0", "full,d_sae=32,lr=0.001,seed_everything=1",
        "full,d_sae=64,lr=0.002,seed_everything=0", "full,d_sae=64,lr=0.002,seed_everything=1",
        "no-folding,d_sae=32,lr=0.001,seed_everything=0", "no-folding,d_sae=32,lr=0.001,seed_everything=1",
        "no-folding,d_sae=64,lr=0.002,seed_everything=0", "no-folding,d_sae=64,lr=0.002,seed_everything=1",
    ]
    without = loaded.points[4].fit_args
    callbacks = json.loads(without[without.index("--trainer.callbacks") + 1])
    assert [c["class_path"].rpartition(".")[2] for c in callbacks] == ["DecoderBiasInit", "DeadFeatureTracker"]
    assert "--trainer.callbacks" not in loaded.points[0].fit_args
    assert loaded.out == Path("logs") / "grids" / "g"


def test_shipped_grids_parse(tmp_path: Path, toy_file: Path) -> None:
    """Every grid under grids/ names existing configs and keys fit knows (checked on the toy file)."""
    counts = {}
    for path in sorted((ROOT / "grids").glob("*.yaml")):
        counts[path.stem] = len(load_grid(path, data=toy_file).points)
    assert counts == {"recipes": 16, "tricks": 21, "width": 5}


def test_names_and_values() -> None:
    assert point_name({"config": "configs/topk.yaml", "l0": 16}) == "config=topk,l0=16"
    assert point_name({"label": "no shuffle", "data.shuffle": False}) == "no_shuffle,shuffle=false"
    assert point_name({}) == "base"
    assert argument_value(None) == "null" and argument_value(True) == "true"
    assert argument_value([0.2, 0.5]) == "[0.2, 0.5]"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"axes": {"model.bogus": [1, 2]}}, "unrecognized arguments: --model.bogus"),
        ({"axes": {"config": ["configs/nope.yaml"]}}, "config not found: configs/nope.yaml"),
        ({"axes": {"pair": {"model.d_sae": [32, 64], "model.lr": [0.001]}}},
         "need equally many values (model.d_sae has 2, model.lr has 1)"),
        ({"axes": {"model.d_sae": ["wide"]}}, 'Parser key "model.d_sae"'),
        ({"sett": {}}, "unknown key 'sett'"),
        ({"points": [{"label": "a"}, {"label": "a", "l0": 2}]}, "two points are both named a"),
        ({"points": [{"without": ["Resampling"]}]}, "without Resampling"),
    ],
)
def test_bad_grids_fail_before_any_run_with_one_line(
    spec: dict[str, Any], message: str, toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid_file = write_grid(tmp_path / "bad.yaml", config=str(QUICKSTART), data=str(toy_file), set=TINY, **spec)
    with pytest.raises(SystemExit) as exit_info:
        main(["grid", "--grid", str(grid_file), "--out", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lightning_sae: error: ") and "\n" not in error
    assert message in error
    assert not (tmp_path / "runs").exists()


def test_a_point_running_in_another_process_is_not_run_twice(toy_file: Path, tmp_path: Path) -> None:
    loaded = load_grid(write_grid(tmp_path / "g.yaml", config=str(QUICKSTART), data=str(toy_file), set=TINY),
                       out=tmp_path / "runs")
    loaded.out.mkdir()
    (point,) = loaded.points
    with grid_module.point_lock(loaded.out, point) as held:
        assert held
        with grid_module.point_lock(loaded.out, point) as again:
            assert not again
        assert grid_module.grid(grid=tmp_path / "g.yaml", out=loaded.out) == [loaded.out / "base"]
        assert not (loaded.out / "base").exists()  # skipped, not run
    with grid_module.point_lock(loaded.out, point) as released:
        assert released
