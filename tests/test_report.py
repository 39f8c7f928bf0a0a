"""The grid report: the Pareto frontier on hand-made numbers, the table, the plots and the seed effects."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lightning_sae.cli import main
from lightning_sae.grid import POINT_FILE
from lightning_sae.report import pareto_front, report, result_row, seed_effects


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes() -> None:
    points = [(16, 0.30), (32, 0.20), (24, 0.35), (64, 0.25), (128, 0.10), (32, 0.20), (8, math.nan)]
    # (24, 0.35) is beaten by (16, 0.30); (64, 0.25) by (32, 0.20); the second (32, 0.20) equals the first
    assert pareto_front(points) == [0, 1, 4]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([]) == []
    # equal L0, the lower error wins; equal error, the lower L0 wins
    assert pareto_front([(10, 0.5), (10, 0.4), (20, 0.4)]) == [1]


def write_point(run_dir: Path, name: str, recipe: str, val_l0: float, fvu: float, delta_ce: float | None = None,
                **overrides: Any) -> None:
    """A hand-made point.json: dead 25%, dense 1%, 102,400 rows, 90 s of fit and 30 s of evaluation."""
    folder = run_dir / name
    folder.mkdir(parents=True)
    downstream = None if delta_ce is None else {
        "delta_ce": delta_ce, "kl": delta_ce * 1.5, "loss_recovered": 1 - delta_ce, "l0": val_l0 * 1.2, "seconds": 30.0,
    }
    record = {
        "name": name, "recipe": recipe, "overrides": overrides,
        "metrics": {"val/l0": val_l0, "val/fvu": fvu, "val/dead_fraction": 0.5},
        "step": 100, "train_rows": 102400,
        "density": {"dead_fraction": 0.25, "dense_fraction": 0.01, "d_sae": 64},
        "downstream": downstream, "fit_seconds": 90.0,
    }
    (folder / POINT_FILE).write_text(json.dumps(record))


def test_report_writes_the_table_and_the_frontier_plots(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for recipe, fvus in (("topk", (0.3, 0.2, 0.15)), ("relu-l1", (0.4, 0.25, 0.3))):
        for l0, fvu in zip((16, 32, 64), fvus):
            write_point(runs, f"config={recipe},l0={l0}", recipe, l0, fvu, delta_ce=fvu / 2, l0=l0)
    (runs / "config=topk,l0=128").mkdir()  # started, not finished
    path = report(run_dir=runs)
    with (runs / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    first = next(row for row in rows if row["name"] == "config=topk,l0=16")
    assert float(first["fvu"]) == 0.3 and float(first["delta_ce"]) == 0.15 and float(first["dead_fraction"]) == 0.25
    assert float(first["wall_seconds"]) == 120.0
    markdown = path.read_text()
    header = (
        "| recipe | overrides | L0 | FVU | ΔCE | KL | loss recovered | L0 (text) | dead | dense | tokens | wall time |"
    )
    row = "| topk | l0=16 | 16.0 | 0.3000 | 0.1500 | 0.2250 | 85.0% | 19.2 | 25.0% | 1.0% | 102,400 | 2.0 min |"
    assert header in markdown and row in markdown
    assert "Unfinished (no point.json yet): config=topk,l0=128." in markdown
    for plot in ("frontier_fvu.png", "frontier_delta_ce.png", "frontier_kl.png", "dead_fraction.png"):
        assert (runs / plot).read_bytes()[:4] == b"\x89PNG"
        assert f"({plot})" in markdown
    assert not (runs / "effects.png").exists()  # no seeds


def test_seed_effects_are_paired_by_seed_against_the_full_recipe(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fvu = {("full", 0): 0.20, ("full", 1): 0.22, ("no-resampling", 0): 0.25, ("no-resampling", 1): 0.30,
           ("no-shuffle", 0): 0.19, ("no-shuffle", 1): 0.22}
    for (label, seed), value in fvu.items():
        write_point(runs, f"{label},seed_everything={seed}", "relu-l1", 32, value, label=label, seed_everything=seed)
    rows = [result_row(json.loads(path.read_text())) for path in sorted(runs.glob(f"*/{POINT_FILE}"))]
    effects = seed_effects(rows, "fvu")
    assert effects is not None
    assert effects["no-resampling"] == pytest.approx([0.05, 0.08])
    assert effects["no-shuffle"] == pytest.approx([-0.01, 0.0])
    assert "full" not in effects
    assert seed_effects(rows, "delta_ce") is None  # no downstream figures
    report(run_dir=runs)
    assert (runs / "effects.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_folder_without_finished_points_is_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--run_dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lightning_sae: error: ") and "holds no finished point" in error and "\n" not in error
