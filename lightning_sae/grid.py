"""Grid files and running them: ``lightning_sae grid --grid grids/X.yaml``.

A grid file (YAML) names a base config, an activation file and the points to train::

    config: configs/topk.yaml        # base config; a point's `config` replaces it
    data: data/smollm2-l6.h5         # activation file (--data replaces it)
    text: held-out.txt               # optional: splice each SAE into its model (lightning_sae evaluate)
    eval_tokens: 6144                # optional: tokens of that text (default 6144)
    out: logs/grids/recipes          # optional: the grid's folder (default logs/grids/<file stem>)
    set: {model.d_sae: 2304}         # overrides for every point
    points:                          # optional: a list of points (default: one point, no overrides)
      - {label: full}
      - {label: no-resampling, without: [Resampling]}
    axes:                            # every point is crossed with the product of the axes
      config: [configs/topk.yaml, configs/relu-l1.yaml]   # an axis of one key: a list of values
      pair:                                               # an axis of keys varied together:
        model.d_sae: [512, 1024]                          # equally many values each
        model.lr: [1.0e-3, 7.0e-4]

Keys are ``fit`` arguments without the dashes (``model.d_sae``, ``seed_everything``,
``trainer.callbacks``), and four that the grid reads itself: ``config`` (the config file), ``l0``
(the recipe's sparsity knob: TopK's k or ``model.target_l0``, :func:`lightning_sae.recipes.sparsity_arguments`),
``without`` (callbacks of the config to leave out, by class name) and ``label`` (a name for the point).

Each point trains in its own run directory ``<out>/<name>``, named after its overrides. A point
is finished when that directory holds ``point.json`` (written last, from the fit's ``metrics.json``,
its export's feature densities and the downstream figures); finished points are skipped, an
interrupted fit continues from its newest checkpoint (or restarts when it wrote none). A point
is locked while it runs, so two runs of a grid on one folder never train a point twice. Every
point is checked (config, keys, values) before the first one starts.
"""

from __future__ import annotations

import fcntl
import functools
import glob as globlib
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_sae.errors import UserError
from lightning_sae.files import written_atomically
from lightning_sae.metrics import DEFAULT_DENSE_THRESHOLD
from lightning_sae.recipes import sparsity_arguments
from lightning_sae.run_summary import METRICS_FILE

GRID_KEYS = ("config", "data", "text", "eval_tokens", "out", "set", "points", "axes")
"""Top-level keys of a grid file."""
PSEUDO_KEYS = ("config", "l0", "without", "label")
"""Point keys the grid interprets instead of passing them to ``fit``."""
POINT_FILE = "point.json"
"""Everything known about a finished point; written last, so its presence means finished."""
EVALUATE_FILE = "evaluate.json"
TIMING_FILE = "grid_fit.json"
MANIFEST_FILE = "grid.json"
"""In the grid's folder: the grid file and data it ran, so that another data file is not mixed in."""
DEFAULT_EVAL_TOKENS = 6144
DEAD_LOG10_DENSITY = -9.5
"""log10 densities at or below this are features that never fired (the export stores log10(0 + 1e-10))."""


@dataclass
class Point:
    """One run of a grid: its name, config and overrides (pseudo-keys included)."""

    name: str
    config: Path
    overrides: dict[str, Any]
    fit_args: list[str] = field(default_factory=list)

    @property
    def recipe(self) -> str:
        """The config's name: the series a point belongs to in the report."""
        return self.config.stem


@dataclass
class Grid:
    """A loaded grid file: where it writes, what it trains on, and its points."""

    path: Path
    data: Path
    out: Path
    text: str | None
    eval_tokens: int
    points: list[Point]


def load_grid(path: Path, data: Path | None = None, out: Path | None = None, text: str | None = None) -> Grid:
    """Read and check a grid file: every point's config, keys and values, before anything runs.

    Raises:
        UserError: the file, a config or the data is missing, a key is unknown, a value does not
            parse, or the keys of an axis have unequal numbers of values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a grid file is a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (a grid file has {', '.join(GRID_KEYS)})")
    data = Path(data if data is not None else spec.get("data") or "")
    if not str(data) or str(data) == ".":
        raise UserError(f"{path} names no data file: add `data:` or pass --data")
    if not data.is_file():
        raise UserError(f"data file not found: {data}")
    fixed = spec.get("set") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: `set` must be a mapping of key: value")
    combos = _combinations(path, spec)
    base = spec.get("config")
    points = [_point(path, {**fixed, **combo}, base, varied) for combo, varied in combos]
    _check_unique(path, points)
    out = Path(out if out is not None else spec.get("out") or Path("logs") / "grids" / path.stem)
    text = text if text is not None else spec.get("text")
    eval_tokens = int(spec.get("eval_tokens") or DEFAULT_EVAL_TOKENS)
    grid = Grid(path, data, out, None if text is None else str(text), eval_tokens, points)
    check_arguments(grid)
    return grid


def _combinations(path: Path, spec: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """Each point's overrides and the keys that vary across points: ``points`` × the product of ``axes``."""
    listed = spec.get("points") or [{}]
    if not isinstance(listed, list) or not all(isinstance(point, dict) for point in listed):
        raise UserError(f"{path}: `points` must be a list of mappings of key: value")
    axes = spec.get("axes") or {}
    if not isinstance(axes, dict):
        raise UserError(f"{path}: `axes` must be a mapping of axis name to a list of values or of keys to lists")
    axis_values = [_axis(path, name, axis) for name, axis in axes.items()]
    axis_keys = [key for values in axis_values if len(values) > 1 for key in values[0]]
    combos = []
    for point in listed:
        # A listed point is named by its label, else by its keys (when there are several points).
        named = ["label"] if "label" in point else list(point) if len(listed) > 1 else []
        for values in itertools.product(*axis_values):
            merged = dict(point)
            for value in values:
                merged.update(value)
            combos.append((merged, [*named, *(key for key in axis_keys if key not in named)]))
    return combos


def _axis(path: Path, name: str, axis: Any) -> list[dict[str, Any]]:
    """An axis as a list of {key: value} mappings: one key's list, or several keys' lists paired."""
    if isinstance(axis, list):
        columns = {name: axis}
    elif isinstance(axis, dict) and all(isinstance(values, list) for values in axis.values()):
        columns = axis
    else:
        raise UserError(f"{path}: axis {name!r} must be a list of values or a mapping of keys to lists of values")
    lengths = {key: len(values) for key, values in columns.items()}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise UserError(f"{path}: the keys of axis {name!r} vary together and need equally many values ({counts})")
    if not columns or 0 in lengths.values():
        raise UserError(f"{path}: axis {name!r} has no values")
    n = next(iter(lengths.values()))
    return [{key: values[i] for key, values in columns.items()} for i in range(n)]


def _point(path: Path, overrides: dict[str, Any], base: Any, varied: list[str]) -> Point:
    """A point: its config (checked to exist) and its ``fit`` arguments from its overrides."""
    config_value = overrides.get("config", base)
    if config_value is None:
        raise UserError(f"{path}: no config: add `config:` at the top or to every point")
    config = Path(config_value)
    if not config.is_file():
        raise UserError(f"{path}: config not found: {config}")
    for key in overrides:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise UserError(f"{path}: {key!r} is not a key (dotted fit argument names, e.g. model.d_sae)")
    name = point_name({key: overrides[key] for key in varied})
    point = Point(name, config, overrides)
    point.fit_args = _fit_arguments(path, point)
    return point


def _fit_arguments(path: Path, point: Point) -> list[str]:
    """The point's ``fit`` arguments after ``--config``: its keys, its L0 and its callbacks."""
    args: list[str] = []
    for key, value in point.overrides.items():
        if key not in PSEUDO_KEYS and not (key == "trainer.callbacks" and "without" in point.overrides):
            args += [f"--{key}", argument_value(value)]
    if "l0" in point.overrides:
        l0 = point.overrides["l0"]
        if not isinstance(l0, (int, float)) or isinstance(l0, bool) or l0 <= 0:
            raise UserError(f"{path}: point {point.name}: l0 must be a positive number, got {l0!r}")
        args += sparsity_arguments(point.config, float(l0))
    if "without" in point.overrides:
        args += ["--trainer.callbacks", json.dumps(_callbacks_without(path, point))]
    return args


def _callbacks_without(path: Path, point: Point) -> list[Any]:
    """The point's callbacks (its ``trainer.callbacks`` or its config's) but those ``without`` names."""
    names = point.overrides["without"]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UserError(f"{path}: point {point.name}: `without` takes callback class names, e.g. [Resampling]")
    callbacks = point.overrides.get("trainer.callbacks")
    if callbacks is None:
        config = yaml.safe_load(point.config.read_text()) or {}
        callbacks = (config.get("trainer") or {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]

    def class_path(callback: Any) -> str:
        return str(callback.get("class_path", "") if isinstance(callback, dict) else callback)

    for name in names:
        if not any(class_path(callback).rpartition(".")[2] == name or class_path(callback) == name
                   for callback in callbacks):
            raise UserError(f"{path}: point {point.name}: without {name}: {point.config} has no such callback")
    return [callback for callback in callbacks
            if class_path(callback).rpartition(".")[2] not in names and class_path(callback) not in names]


def argument_value(value: Any) -> str:
    """A YAML value as a command-line value: true/false/null, numbers as written, else JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value)


def point_name(varied: dict[str, Any]) -> str:
    """The run directory's name: ``label`` first, then ``key=value`` for each varied key (the key's
    last part, the config's file stem), in a file-name-safe form; ``base`` when nothing varies."""
    parts = []
    if "label" in varied:
        parts.append(str(varied["label"]))
    for key, value in varied.items():
        if key == "label":
            continue
        if key == "config":
            shown = Path(str(value)).stem
        elif key == "without":
            shown = "+".join(value) if isinstance(value, list) else str(value)
        else:
            shown = argument_value(value)
        parts.append(f"{key.rpartition('.')[2]}={shown}")
    name = ",".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9=,.+_-]+", "_", name)[:200]


def _check_unique(path: Path, points: list[Point]) -> None:
    seen: dict[str, Point] = {}
    for point in points:
        if point.name in seen:
            raise UserError(f"{path}: two points are both named {point.name}: give them different values or labels")
        seen[point.name] = point


def check_arguments(grid: Grid) -> None:
    """Parse every point's ``fit`` command line as ``fit`` would, without running anything.

    Raises:
        UserError: naming the first point whose arguments ``fit`` refuses, and why.
    """
    parser = _fit_parser()
    checked: set[tuple[str, ...]] = set()
    for point in grid.points:
        argv = ["--config", str(point.config), "--data.path", str(grid.data), *point.fit_args]
        if tuple(argv) in checked:
            continue
        checked.add(tuple(argv))
        try:
            parser.parse_args(argv)
        except Exception as error:  # jsonargparse raises ArgumentError, and others for bad configs
            reason = " ".join(str(error).split())
            raise UserError(f"{grid.path}: point {point.name}: {reason}") from None


@functools.lru_cache(maxsize=1)
def _fit_parser() -> Any:
    """The parser of ``lightning_sae fit`` (no subcommand), raising instead of exiting on an error;
    built once per process."""
    from lightning_sae.cli import SAECLI
    from lightning_sae.data.datamodule import ActivationDataModule
    from lightning_sae.model import SparseAutoencoder

    class _Parsed(Exception):
        pass

    class ParserOnly(SAECLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _Parsed(parser)

    try:
        ParserOnly(SparseAutoencoder, ActivationDataModule, run=False, args=[],
                   parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        return parsed.args[0]
    raise RuntimeError("the fit parser was not built")


# ----------------------------------------------------------------------------------------- running


def grid(
    grid: Path,
    data: Path | None = None,
    jobs: int = 1,
    out: Path | None = None,
    text: str | None = None,
    dry_run: bool = False,
) -> list[Path]:
    """Train every point of a grid file, resumably: finished points are skipped.

    Args:
        grid: Grid file (YAML; see grids/*.yaml and the README's "Ablation grids").
        data: Activation file to train on (default: the grid file's `data`).
        jobs: Points run side by side: one per GPU where there are several, else processes on CPU
            sharing its cores.
        out: Folder of the grid's run directories (default: the grid file's `out`, else
            logs/grids/<grid file name>).
        text: Held-out text for the downstream figures (default: the grid file's `text`); used when
            the data file records its language model.
        dry_run: Print each point's fit command and whether it is finished, and run nothing.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    loaded = load_grid(grid, data, out, text)
    text = loaded.text if loaded.text and _records_model(loaded.data) else None
    if text is not None and not globlib.glob(text, recursive=True):
        raise UserError(f"held-out text not found: {text} (the grid's `text`, or --text)")
    if loaded.text and text is None:
        print(f"{loaded.data} records no language model: no downstream figures (ΔCE, KL)")
    if dry_run:
        for point in loaded.points:
            state = "finished" if is_finished(loaded.out / point.name) else "to run"
            print(f"{point.name}  [{state}]\n  lightning_sae fit {' '.join(fit_command(loaded, point, []))}")
        return []
    _claim_out(loaded)
    todo = [point for point in loaded.points if not is_finished(loaded.out / point.name)]
    print(f"grid {loaded.path}: {len(loaded.points)} points, {len(loaded.points) - len(todo)} finished, "
          f"{len(todo)} to run in {loaded.out} ({jobs} at a time)", flush=True)
    slots = _slots(jobs)
    failures: list[str] = []
    busy: list[str] = []

    def run(point: Point) -> None:
        slot = slots.get()
        try:
            with point_lock(loaded.out, point) as held:
                if not held:
                    busy.append(point.name)
                    print(f"skipped: {point.name} is running in another process", flush=True)
                    return
                if is_finished(loaded.out / point.name):  # finished meanwhile by another process
                    return
                run_point(loaded, point, text, slot)
            print(f"done: {point.name}", flush=True)
        except UserError as error:
            failures.append(f"{point.name} ({error})")
            print(f"failed: {point.name}: {error}", flush=True)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, todo))
    if failures:
        raise UserError(f"{len(failures)} of {len(todo)} points failed: {'; '.join(failures)}")
    if busy:
        print(f"{len(busy)} points were running in another process; run the grid again once it ends")
        return [loaded.out / point.name for point in loaded.points]
    report = f"lightning_sae report --run_dir {loaded.out}"
    print(f"all {len(loaded.points)} points finished in {loaded.out}; report: {report}")
    return [loaded.out / point.name for point in loaded.points]


def _records_model(data: Path) -> bool:
    """Whether the activation file names the language model it came from."""
    from lightning_sae.data.format import read_info

    attrs = read_info(data).attrs
    return bool(attrs.get("model") or attrs.get("gguf_file"))


def _claim_out(loaded: Grid) -> None:
    """Create the grid's folder and record its grid file and data; refuse one that ran other data."""
    loaded.out.mkdir(parents=True, exist_ok=True)
    manifest = loaded.out / MANIFEST_FILE
    record = {"grid": str(loaded.path), "data": str(loaded.data.resolve()), "text": loaded.text}
    if manifest.exists():
        earlier = json.loads(manifest.read_text())
        if earlier.get("data") != record["data"]:
            raise UserError(
                f"{loaded.out} holds this grid's runs on {earlier.get('data')}, not {record['data']}: "
                "give another --out"
            )
    with written_atomically(manifest) as temporary:
        temporary.write_text(json.dumps(record, indent=1) + "\n")


def _slots(jobs: int) -> queue.Queue[dict[str, str]]:
    """Environment additions of the ``jobs`` worker slots: a GPU each where there are several,
    else a share of the CPU threads."""
    import torch

    slots: queue.Queue[dict[str, str]] = queue.Queue()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for slot in range(jobs):
        if gpus > 1:
            slots.put({"CUDA_VISIBLE_DEVICES": str(slot % gpus)})
        elif jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            slots.put({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))})
        else:
            slots.put({})
    return slots


@contextmanager
def point_lock(out: Path, point: Point) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``<out>/.<name>.lock`` for the block; yields False (and holds
    nothing) when another process holds it: two grid runs on one folder never run a point twice."""
    descriptor = os.open(out / f".{point.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(descriptor)


def is_finished(run_dir: Path) -> bool:
    """A finished point: its ``point.json`` and the fit's ``metrics.json`` are there."""
    return (run_dir / POINT_FILE).is_file() and (run_dir / METRICS_FILE).is_file()


def fit_command(loaded: Grid, point: Point, extra: list[str]) -> list[str]:
    """``fit`` arguments of a point, logging to ``<out>/<name>``."""
    return [
        "--config", str(point.config), "--data.path", str(loaded.data), *point.fit_args,
        "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(loaded.out),
        "--trainer.logger.init_args.name", "",
        "--trainer.logger.init_args.version", point.name,
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint of an interrupted run, if any."""
    found = [path for path in (run_dir / "checkpoints").glob("*.ckpt") if not path.name.startswith(".")]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def run_point(loaded: Grid, point: Point, text: str | None, env: dict[str, str]) -> Path:
    """Fit (or continue) one point, evaluate it downstream when ``text``, and write its ``point.json``."""
    run_dir = loaded.out / point.name
    log = loaded.out / f"{point.name}.log"
    if not (run_dir / METRICS_FILE).is_file():
        extra: list[str] = []
        checkpoint = newest_checkpoint(run_dir) if run_dir.exists() else None
        if checkpoint is not None:
            extra = ["--ckpt_path", str(checkpoint)]
        elif run_dir.exists():
            extra = ["--overwrite", "true"]
        start = time.monotonic()
        _run([sys.executable, "-m", "lightning_sae.cli", "fit", *fit_command(loaded, point, extra)], log, env, point)
        with written_atomically(run_dir / TIMING_FILE) as temporary:
            temporary.write_text(json.dumps({"seconds": time.monotonic() - start, "resumed": checkpoint is not None}))
    sae = run_dir / "sae"
    if text is not None and not (run_dir / EVALUATE_FILE).is_file():
        target = sae if sae.is_dir() else run_dir / "checkpoints" / "final.ckpt"
        start = time.monotonic()
        _run([sys.executable, "-m", "lightning_sae.cli", "evaluate", "--sae", str(target), "--text", text,
              "--data", str(loaded.data), "--max_tokens", str(loaded.eval_tokens),
              "--json", str(run_dir / EVALUATE_FILE), "--overwrite", "true"], log, env, point)
        evaluation = json.loads((run_dir / EVALUATE_FILE).read_text())
        evaluation["seconds"] = time.monotonic() - start
        with written_atomically(run_dir / EVALUATE_FILE) as temporary:
            temporary.write_text(json.dumps(evaluation, indent=1))
    return write_point(loaded, point, run_dir)


def _run(command: list[str], log: Path, env: dict[str, str], point: Point) -> None:
    """Run ``command`` with its output appended to ``log``; a failure is a :class:`UserError`."""
    with log.open("a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **env}, check=False)
    if done.returncode != 0:
        raise UserError(f"point {point.name} failed (exit status {done.returncode}): see {log}")


def density_summary(sae: Path) -> dict[str, Any] | None:
    """Dead and dense fractions, median log10 density of the live features and a histogram (bins of
    one decade from 1e-10 to 1) from an export's ``sparsity.safetensors``; None without one."""
    import torch
    from safetensors.torch import load_file

    from lightning_sae.export import SPARSITY_FILE

    path = sae / SPARSITY_FILE
    if not path.is_file():
        return None
    log10 = load_file(path)["sparsity"].double()
    dead = log10 <= DEAD_LOG10_DENSITY
    alive = log10[~dead]
    counts = torch.histogram(log10.clamp(-10.0, 0.0), bins=10, range=(-10.0, 0.0)).hist
    return {
        "dead_fraction": float(dead.double().mean()),
        "dense_fraction": float((log10 > math.log10(DEFAULT_DENSE_THRESHOLD)).double().mean()),
        "median_log10_density": float(alive.median()) if alive.numel() else None,
        "histogram_log10_edges": list(range(-10, 1)),
        "histogram_counts": [int(count) for count in counts],
        "d_sae": int(log10.numel()),
    }


def write_point(loaded: Grid, point: Point, run_dir: Path) -> Path:
    """Gather a point's results into ``<run dir>/point.json`` (written whole, last)."""
    fit = json.loads((run_dir / METRICS_FILE).read_text())
    timing = json.loads((run_dir / TIMING_FILE).read_text()) if (run_dir / TIMING_FILE).is_file() else {}
    downstream = None
    if (run_dir / EVALUATE_FILE).is_file():
        result = json.loads((run_dir / EVALUATE_FILE).read_text())
        downstream = {
            "delta_ce": result["ce_sae"] - result["ce_clean"],
            "kl": result["kl_sae"],
            "loss_recovered": result["loss_recovered"],
            "ce_sae": result["ce_sae"],
            "ce_clean": result["ce_clean"],
            "l0": result["l0"],
            "fvu": result["fvu"],
            "n_tokens": result["n_tokens"],
            "seconds": result.get("seconds"),
        }
    record = {
        "name": point.name,
        "recipe": point.recipe,
        "config": str(point.config),
        "overrides": {key: value for key, value in point.overrides.items() if key != "config"},
        "data": str(loaded.data),
        "metrics": fit["metrics"],
        "step": fit["step"],
        "train_rows": fit["train_rows"],
        "density": density_summary(run_dir / "sae"),
        "downstream": downstream,
        "fit_seconds": timing.get("seconds"),
        "resumed": timing.get("resumed", False),
    }
    path = run_dir / POINT_FILE
    with written_atomically(path) as temporary:
        temporary.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def grid_out(path: Path) -> Path:
    """The folder of a grid file's run directories (its ``out``, else logs/grids/<file stem>),
    read without checking the points."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    out = spec.get("out") if isinstance(spec, dict) else None
    return Path(out) if out else Path("logs") / "grids" / path.stem
