"""``lightning_sae report``: one table and the sparsity–fidelity plots of a grid's runs.

Reads every ``<run dir>/<point>/point.json`` written by ``lightning_sae grid`` and writes, into
the grid's folder (or ``--out``):

- ``results.csv`` and ``report.md``: one row per point (recipe, overrides, L0, FVU, ΔCE, KL, loss
  recovered, dead and dense shares of the features, training rows, wall time);
- ``frontier_fvu.png``: L0 (validation rows) against FVU, and, when the points were spliced into
  their language model, ``frontier_delta_ce.png`` and ``frontier_kl.png``: L0 (on the held-out
  text) against ΔCE and KL; one series per recipe with its Pareto frontier drawn, L0 log-scaled;
- ``dead_fraction.png``: the share of dead features of each point;
- ``effects.png``, for a grid with several seeds per variant (``seed_everything`` varied) and a
  reference variant (labelled ``full``, else the one without overrides): each variant's change of
  FVU (and ΔCE) from the reference, the mean over seeds paired by seed, with each seed's value;
- ``fvu_vs_<key>.png`` for every other numeric key that varies (e.g. ``d_sae``).

The Pareto frontier (:func:`pareto_front`) is the set of points that no other point of the same
series beats on both axes: none has an L0 and an error both at most theirs, one of them lower.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_sae.errors import UserError
from lightning_sae.files import written_atomically
from lightning_sae.grid import POINT_FILE, grid_out

SEED_KEY = "seed_everything"
REFERENCE_LABEL = "full"
COLUMNS = (
    "name", "recipe", "overrides", "l0", "fvu", "delta_ce", "kl", "loss_recovered", "l0_text",
    "dead_fraction", "dense_fraction", "train_rows", "wall_seconds",
)
"""Columns of results.csv."""


def report(run_dir: Path | None = None, grid: Path | None = None, out: Path | None = None) -> Path:
    """Tabulate and plot a grid's finished points: results.csv, report.md and PNG plots.

    Args:
        run_dir: Folder of the grid's run directories (as 'lightning_sae grid' wrote them).
        grid: The grid file instead of run_dir: its folder is read (its `out`, else
            logs/grids/<file name>).
        out: Where to write the report (default: run_dir).
    """
    if run_dir is None:
        if grid is None:
            raise UserError("give --run_dir (a grid's folder of runs) or --grid (its grid file)")
        run_dir = grid_out(grid)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} does not exist: run the grid first (make grid GRID=...)")
    points = load_points(run_dir)
    if not points:
        raise UserError(f"{run_dir} holds no finished point ({POINT_FILE}): run the grid first (make grid GRID=...)")
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = [result_row(point) for point in points]
    common = show_varied_overrides(rows)
    unfinished = sorted(path.name for path in run_dir.iterdir()
                        if path.is_dir() and not path.name.startswith(".") and not (path / POINT_FILE).is_file())
    _write_text(out / "results.csv", to_csv(rows))
    written = [name for name in plot_all(rows, points, out)]
    _write_text(out / "report.md", to_markdown(rows, unfinished, written, common))
    print(f"{len(rows)} finished points{f', {len(unfinished)} unfinished' if unfinished else ''}: "
          f"{out / 'report.md'}, {out / 'results.csv'}, {', '.join(written)}")
    return out / "report.md"


def load_points(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished point's record under ``run_dir``, by name."""
    return [json.loads(path.read_text()) for path in sorted(Path(run_dir).glob(f"*/{POINT_FILE}"))]


def result_row(point: dict[str, Any]) -> dict[str, Any]:
    """One row of the table: the columns of :data:`COLUMNS` (None where unknown)."""
    metrics = point.get("metrics") or {}
    density = point.get("density") or {}
    downstream = point.get("downstream") or {}
    overrides = point.get("overrides") or {}
    seconds = [value for value in (point.get("fit_seconds"), downstream.get("seconds")) if value is not None]
    return {
        "name": point["name"],
        "recipe": point.get("recipe", ""),
        "overrides": "; ".join(f"{key}={_plain(value)}" for key, value in overrides.items()),
        "l0": metrics.get("val/l0"),
        "fvu": metrics.get("val/fvu"),
        "delta_ce": downstream.get("delta_ce"),
        "kl": downstream.get("kl"),
        "loss_recovered": downstream.get("loss_recovered"),
        "l0_text": downstream.get("l0"),
        "dead_fraction": density.get("dead_fraction", metrics.get("val/dead_fraction")),
        "dense_fraction": density.get("dense_fraction", metrics.get("val/dense_fraction")),
        "train_rows": point.get("train_rows"),
        "wall_seconds": sum(seconds) if seconds else None,
        "_overrides": overrides,
    }


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def show_varied_overrides(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Set each row's ``overrides`` column to the keys whose values differ between the rows (the
    grid's axes; all of them for a single row); returns the overrides the rows share."""
    keys = {key for row in rows for key in row["_overrides"]}
    missing = object()
    varied = {key for key in keys
              if len({json.dumps(row["_overrides"].get(key, missing), default=str) for row in rows}) > 1}
    if len(rows) == 1:
        varied = keys
    for row in rows:
        row["overrides"] = "; ".join(f"{key}={_plain(value)}" for key, value in row["_overrides"].items()
                                     if key in varied)
    return {key: value for key, value in rows[0]["_overrides"].items() if key not in varied}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (x, y) that no other point dominates (x' ≤ x and y' ≤ y, one strictly
    lower), in increasing x; of equal points, the first. Points with a NaN are never on it."""
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(finite, key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# --------------------------------------------------------------------------------------- tables


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``results.csv``: the :data:`COLUMNS` of every row (empty where unknown)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    return buffer.getvalue()


def to_markdown(rows: list[dict[str, Any]], unfinished: list[str], plots: list[str],
                common: dict[str, Any] | None = None) -> str:
    """``report.md``: the overrides every point shares, the table (sorted by recipe, then L0) and the plots."""
    downstream = any(row["delta_ce"] is not None for row in rows)
    header = ["recipe", "overrides", "L0", "FVU"]
    if downstream:
        header += ["ΔCE", "KL", "loss recovered", "L0 (text)"]
    header += ["dead", "dense", "tokens", "wall time"]
    lines = [
        "# Grid report",
        "",
        f"{len(rows)} finished points. L0 and FVU on the validation rows; ΔCE (CE with the SAE spliced in − "
        "clean CE), KL(clean ‖ spliced) in nats per token, loss recovered and L0 (text) on the held-out text; "
        "dead and dense: shares of the features that never fired, and that fired on more than 10% of the "
        "training rows; tokens: training rows; wall time: fit and evaluation.",
        "",
    ]
    if common:
        lines += ["Every point: " + ", ".join(f"`{key}={_plain(value)}`" for key, value in common.items()) + ".", ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    for row in sorted(rows, key=lambda row: (row["recipe"], _number(row["l0"]), row["name"])):
        cells = [row["recipe"], row["overrides"].replace("|", "\\|"), _fmt(row["l0"], ".1f"), _fmt(row["fvu"], ".4f")]
        if downstream:
            cells += [_fmt(row["delta_ce"], ".4f"), _fmt(row["kl"], ".4f"), _fmt(row["loss_recovered"], ".1%"),
                      _fmt(row["l0_text"], ".1f")]
        cells += [_fmt(row["dead_fraction"], ".1%"), _fmt(row["dense_fraction"], ".1%"),
                  _fmt(row["train_rows"], ","), _duration(row["wall_seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    if unfinished:
        lines += ["", f"Unfinished (no {POINT_FILE} yet): {', '.join(unfinished)}."]
    if plots:
        lines += [""] + [f"![{Path(name).stem}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> float:
    return float(value) if value is not None else math.inf


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _write_text(path: Path, text: str) -> None:
    with written_atomically(path) as temporary:
        temporary.write_text(text)


# ---------------------------------------------------------------------------------------- plots


def plot_all(rows: list[dict[str, Any]], points: list[dict[str, Any]], out: Path) -> list[str]:
    """Write every plot that the rows support; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UserError("the report's plots need matplotlib: pip install matplotlib") from error
    written = []
    for name, x, y, label in (
        ("frontier_fvu.png", "l0", "fvu", "FVU (validation rows)"),
        ("frontier_delta_ce.png", "l0_text", "delta_ce", "ΔCE, nats per token (held-out text)"),
        ("frontier_kl.png", "l0_text", "kl", "KL(clean ‖ spliced), nats per token"),
    ):
        if _frontier_plot(plt, rows, x, y, label, out / name):
            written.append(name)
    if _dead_plot(plt, rows, out / "dead_fraction.png"):
        written.append("dead_fraction.png")
    if _effects_plot(plt, rows, out / "effects.png"):
        written.append("effects.png")
    for key in varied_numeric_keys(rows):
        name = f"fvu_vs_{key.rpartition('.')[2]}.png"
        if _versus_plot(plt, rows, key, out / name):
            written.append(name)
    return written


def _series(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    """(x, y) of the rows with both, per recipe."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row.get(x) is not None and row.get(y) is not None:
            series[row["recipe"]].append((float(row[x]), float(row[y])))
    return series


def _save(plt: Any, figure: Any, path: Path) -> None:
    with written_atomically(path) as temporary, temporary.open("wb") as file:
        figure.savefig(file, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def _frontier_plot(plt: Any, rows: list[dict[str, Any]], x: str, y: str, ylabel: str, path: Path) -> bool:
    """One series per recipe: its points, and its Pareto frontier as a line."""
    series = _series(rows, x, y)
    if not series:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for recipe, values in sorted(series.items()):
        xs, ys = zip(*values)
        (dots,) = axes.plot(xs, ys, "o", alpha=0.5, label=recipe)
        front = [values[i] for i in pareto_front(values)]
        axes.plot([p[0] for p in front], [p[1] for p in front], "-", color=dots.get_color())
    _log2_axis(axes)
    axes.set_xlabel("L0 (log scale)" + (" on the held-out text" if x == "l0_text" else ", validation rows"))
    axes.set_ylabel(ylabel)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    axes.set_title("Sparsity–fidelity frontier (lines: Pareto frontier per recipe)", fontsize=9)
    _save(plt, figure, path)
    return True


def _log2_axis(axes: Any) -> None:
    """A log-scaled x axis with ticks at powers of two, written as plain numbers (16, 32, ...)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(NullFormatter())


def _dead_plot(plt: Any, rows: list[dict[str, Any]], path: Path) -> bool:
    known = [row for row in rows if row["dead_fraction"] is not None]
    if not known:
        return False
    known.sort(key=lambda row: (row["recipe"], _number(row["l0"]), row["name"]))
    figure, axes = plt.subplots(figsize=(max(6.4, 0.35 * len(known)), 4.4))
    axes.bar(range(len(known)), [100 * row["dead_fraction"] for row in known])
    axes.set_xticks(range(len(known)), [row["name"] for row in known], rotation=75, ha="right", fontsize=7)
    axes.set_ylabel("dead features, %")
    axes.set_title("Features that never fired during training", fontsize=9)
    _save(plt, figure, path)
    return True


def seed_effects(rows: list[dict[str, Any]], metric: str) -> dict[str, list[float]] | None:
    """Per variant (the overrides but the seed), the change of ``metric`` from the reference variant
    for each seed both ran; None without a seed axis or a reference."""
    seeded = [row for row in rows if SEED_KEY in row["_overrides"] and row.get(metric) is not None]
    if len({row["_overrides"][SEED_KEY] for row in seeded}) < 2:
        return None
    variants: dict[str, dict[Any, float]] = defaultdict(dict)
    for row in seeded:
        rest = {key: value for key, value in row["_overrides"].items() if key != SEED_KEY}
        name = str(rest.get("label") or "; ".join(f"{key}={_plain(value)}" for key, value in rest.items()) or "base")
        variants[f"{row['recipe']}: {name}" if _several_recipes(seeded) else name][row["_overrides"][SEED_KEY]] = float(
            row[metric]
        )
    reference = next((name for name in variants if name.endswith(REFERENCE_LABEL)), None)
    reference = reference or next((name for name in variants if name.endswith("base")), None)
    if reference is None:
        return None
    base = variants[reference]
    return {
        name: [values[seed] - base[seed] for seed in sorted(values, key=str) if seed in base]
        for name, values in variants.items()
        if name != reference
    }


def _several_recipes(rows: list[dict[str, Any]]) -> bool:
    return len({row["recipe"] for row in rows}) > 1


def _effects_plot(plt: Any, rows: list[dict[str, Any]], path: Path) -> bool:
    """Bars: mean change from the reference over seeds (error bar: their standard deviation; dots: each seed)."""
    metrics = [(metric, label) for metric, label in (("fvu", "Δ FVU"), ("delta_ce", "Δ ΔCE (nats)"))
               if seed_effects(rows, metric)]
    if not metrics:
        return False
    figure, all_axes = plt.subplots(len(metrics), 1, figsize=(7.0, 3.2 * len(metrics)), squeeze=False)
    for (metric, label), axes in zip(metrics, all_axes[:, 0]):
        effects = seed_effects(rows, metric) or {}
        names = sorted(effects)
        means = [statistics.fmean(effects[name]) if effects[name] else math.nan for name in names]
        spread = [statistics.stdev(effects[name]) if len(effects[name]) > 1 else 0.0 for name in names]
        axes.barh(range(len(names)), means, xerr=spread, alpha=0.6, capsize=3)
        for i, name in enumerate(names):
            axes.plot(effects[name], [i] * len(effects[name]), "k.", markersize=4)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_yticks(range(len(names)), names, fontsize=8)
        axes.set_xlabel(f"{label} against the full recipe (> 0: the trick helps)")
    figure.suptitle("Each trick switched off: change over seeds (bar: mean, line: ±1 sd, dots: seeds)", fontsize=9)
    _save(plt, figure, path)
    return True


def varied_numeric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys with numeric values that differ between rows, but the L0 and the seed."""
    values: dict[str, set[float]] = defaultdict(set)
    for row in rows:
        for key, value in row["_overrides"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("l0", SEED_KEY):
                values[key].add(float(value))
    return sorted(key for key, seen in values.items() if len(seen) > 1)


def _versus_plot(plt: Any, rows: list[dict[str, Any]], key: str, path: Path) -> bool:
    """FVU (and ΔCE) against one varied numeric key, one series per recipe, log-scaled x."""
    panels = [(metric, label) for metric, label in (("fvu", "FVU"), ("delta_ce", "ΔCE (nats)"))
              if any(row.get(metric) is not None and key in row["_overrides"] for row in rows)]
    if not panels:
        return False
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
    for (metric, label), axes in zip(panels, all_axes[0]):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in rows:
            if key in row["_overrides"] and row.get(metric) is not None:
                series[row["recipe"]].append((float(row["_overrides"][key]), float(row[metric])))
        for recipe, values in sorted(series.items()):
            values.sort()
            axes.plot([v[0] for v in values], [v[1] for v in values], "o-", label=recipe)
        _log2_axis(axes)
        axes.set_xlabel(f"{key} (log scale)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    _save(plt, figure, path)
    return True
