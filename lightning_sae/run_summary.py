"""What a finished ``fit`` leaves behind for the tools that compare runs: ``metrics.json`` in its log
directory (the final validation metrics, steps and training rows) and its hyperparameters with those
metrics in TensorBoard's HParams tab.

The HParams session is written to ``<log dir>/hparams/``, its own event file: TensorBoard keeps the
first HParams description it reads in a run directory, and Lightning writes one (with its
placeholder ``hp_metric``) when training starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning_sae.files import written_atomically

METRICS_FILE = "metrics.json"
"""Written last by a finished fit, in its log directory: a run with it has finished training."""
HPARAMS_DIR = "hparams"
"""Subdirectory of the log directory holding the HParams session of the finished run."""
HPARAM_SECTIONS = ("model", "data", "trainer", "seed_everything")
"""Parts of the parsed ``fit`` config recorded as hyperparameters."""


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.d_sae": 2304, ...}``: the scalar leaves of a nested config (dicts and jsonargparse
    Namespaces); lists and other values become strings, None becomes "null"."""
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    if isinstance(config, dict):
        flat: dict[str, Any] = {}
        for key, value in config.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    name = prefix.rstrip(".")
    if config is None:
        return {name: "null"}
    if isinstance(config, (bool, int, float, str)):
        return {name: config}
    return {name: json.dumps(config, default=str)}


def hyperparameters(config: Any) -> dict[str, Any]:
    """The recorded hyperparameters of a parsed ``fit`` config (see :data:`HPARAM_SECTIONS`)."""
    flat = flatten_config(config)
    return {name: value for name, value in flat.items() if name.split(".")[0] in HPARAM_SECTIONS}


def write_metrics(
    log_dir: Path, metrics: dict[str, float], step: int, train_rows: int, hparams: dict[str, Any]
) -> Path:
    """Write ``metrics.json`` (whole) to ``log_dir``: final metrics, optimizer steps, training rows
    and the hyperparameters. Returns its path."""
    path = Path(log_dir) / METRICS_FILE
    payload = {"metrics": metrics, "step": step, "train_rows": train_rows, "hparams": hparams}
    with written_atomically(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def log_hparams(log_dir: Path, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """Write an HParams session (``hparams`` with ``metrics``, each under ``final/<name>``) to
    ``<log_dir>/hparams/``."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    finite = {f"final/{name}": value for name, value in metrics.items() if math.isfinite(value)}
    writer = SummaryWriter(log_dir=str(Path(log_dir) / HPARAMS_DIR))
    try:
        experiment, start, end = hparams_summary(hparams, finite)
        file_writer = writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for name, value in finite.items():
            writer.add_scalar(name, value, step)
    finally:
        writer.close()


def summarize_fit(log_dir: Path, config: Any, metrics: dict[str, float], step: int, train_rows: int,
                  tensorboard: bool) -> Path:
    """After a finished fit: the HParams session (when ``tensorboard``), then ``metrics.json``."""
    hparams = hyperparameters(config)
    if tensorboard:
        log_hparams(log_dir, hparams, metrics, step)
    return write_metrics(log_dir, metrics, step, train_rows, hparams)
