"""Training tokens/s of every recipe: ``lightning_sae fit`` against the loops it competes with.

Usage::

    .venv/bin/python benchmarks/train_throughput.py                          # CPU: d_in 256, d_sae 4096, batch 2048
    .venv/bin/python benchmarks/train_throughput.py --device cuda --d-in 768 --d-sae 24576 --k 32 \\
        --batch-size 4096 --precision bf16-mixed --steps 600

For each recipe config, in one process and on the same machine, rows/s (= tokens/s) of:

- ``plain loop``: the recipe's math written out in a few lines of PyTorch (TopK with AuxK's
  cost left out, and ReLU + L1; none for the JumpReLU recipes), rows already on the device;
- ``model loop``: this package's ``SparseAutoencoder`` in a plain loop (forward, firing count,
  loss, backward, clipping, Adam), rows already on the device, no Lightning;
- ``fit``: ``lightning_sae fit --config configs/X.yaml`` end to end, reading a float16 (CUDA) or
  float32 (CPU) HDF5 file from disk, callbacks, logging and progress bar included;
- ``SAELens``: its ``SAETrainer`` with the matching SAE class (TopK, standard, JumpReLU), rows
  already on the device, when ``sae_lens`` is importable.

Each is timed over steps ``--warmup`` to ``--steps`` (the device synchronised at both ends only),
so compilation, calibration and the first allocations are left out. On CUDA the model loop also
runs once under ``torch.cuda.set_sync_debug_mode("error")``, and five steps of the fit under
``"warn"`` (:class:`SyncAudit`): a step that waits for the device is reported with where it
waited. ``--profile RECIPE`` prints a ``torch.profiler`` table of 20 fit steps. It prints a
Markdown table with the ratios of ``fit`` to the others. The file holds one epoch more than the
timed steps, so the loader's workers (started afresh every epoch) never restart inside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from machine import machine
from torch import Tensor

from lightning_sae.cli import SAECLI
from lightning_sae.data import format
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("topk", "relu-l1", "anthropic-jan2025", "jumprelu-l0")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step over steps ``warmup`` to ``steps``."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps - warmup):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / (steps - warmup)


# ------------------------------------------------------------------------------------- plain loops
def plain_step(recipe: str, d_in: int, d_sae: int, k: int, batch: Tensor, precision: str) -> Callable[[], None] | None:
    """One step of the recipe's math written out (None for the JumpReLU recipes)."""
    device = batch.device
    if recipe not in ("topk", "relu-l1"):
        return None
    W_dec = F.normalize(torch.randn(d_sae, d_in, device=device), dim=-1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(d_in, device=device, requires_grad=True)
    parameters = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(parameters, lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            pre_acts = (batch - b_dec) @ W_enc + b_enc
            if recipe == "topk":
                top = pre_acts.topk(k, dim=-1)
                features = torch.zeros_like(pre_acts).scatter(-1, top.indices, top.values.relu())
                loss = (features @ W_dec + b_dec - batch).pow(2).sum(-1).mean()
            else:
                features = pre_acts.relu()
                l1 = (features * W_dec.norm(dim=1)).sum(-1).mean()
                loss = (features @ W_dec + b_dec - batch).pow(2).sum(-1).mean() + l1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()

    return step


# ------------------------------------------------------------------------------------------ model
def recipe_model(recipe: str, data: Path, d_sae: int, k: int, precision: str) -> SparseAutoencoder:
    """The recipe config's model, as ``fit`` would build it on ``data``."""
    args = recipe_args(recipe, data, d_sae, k, precision)
    cli = SAECLI(SparseAutoencoder, ActivationDataModule, run=False, args=args)
    return cli.model


def recipe_args(recipe: str, data: Path, d_sae: int, k: int, precision: str) -> list[str]:
    knob = ["--model.encoder.init_args.k", str(k)] if recipe == "topk" else ["--model.target_l0", str(k)]
    return [
        "--config", str(ROOT / "configs" / f"{recipe}.yaml"), "--data.path", str(data), "--model.d_sae", str(d_sae),
        "--trainer.precision", precision, *knob,
    ]


def model_step(model: SparseAutoencoder, batch: Tensor, precision: str) -> Callable[[], None]:
    """One step of the model's training math without Lightning (the schedule's factors left at 1)."""
    device = batch.device
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def step() -> None:
        with autocast:
            out = model.forward_pass(batch)
            model.firing.update(out.features)
            loss, _ = model.loss(out)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def syncs_in_model_step(step: Callable[[], None]) -> str:
    """"none" when a step runs under ``set_sync_debug_mode("error")``, else the error's first line."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -------------------------------------------------------------------------------------------- fit
class StepClock(Callback):
    """Times the training steps ``warmup`` to ``steps``, then stops the fit."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.seconds = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.steps:
            synchronize(pl_module.device)
            self.seconds = (time.perf_counter() - self.start) / (self.steps - self.warmup)
            trainer.should_stop = True


class SyncAudit(Callback):
    """Runs training steps ``start`` to ``start + steps`` of a CUDA fit under
    ``torch.cuda.set_sync_debug_mode("warn")`` and records where the host waited for the device."""

    def __init__(self, start: int, steps: int = 5) -> None:
        self.start, self.steps = start, steps
        self.places: Counter[str] = Counter()
        self._previous: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.start:
            self._previous = warnings.showwarning
            warnings.showwarning = self._record
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.start + self.steps and self._previous is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, self._previous = self._previous, None

    def _record(self, message: Any, category: Any, filename: str, lineno: int, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" not in str(message):
            self._previous(message, category, filename, lineno, *args, **kwargs)
            return
        frames = [frame for frame in traceback.extract_stack()[:-1] if "/torch/" not in frame.filename][-3:]
        self.places[" ← ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    def summary(self) -> str:
        return "none" if not self.places else "; ".join(f"{n}× {place}" for place, n in self.places.most_common(4))


class StepProfile(Callback):
    """Profiles training steps ``start`` to ``start + steps`` with ``torch.profiler`` and prints the
    operations that took the most device and host time."""

    def __init__(self, start: int, steps: int = 20) -> None:
        self.start, self.steps = start, steps
        self.profiler: torch.profiler.profile | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        if trainer.global_step == self.start + self.steps and self.profiler is not None:
            synchronize(pl_module.device)
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            for key in ("self_device_time_total", "self_cpu_time_total"):
                print(f"--- {self.steps} fit steps by {key}", flush=True)
                print(averages.table(sort_by=key, row_limit=20, max_name_column_width=60), flush=True)
            self.profiler = None


def fit_seconds_per_step(recipe: str, data: Path, args: argparse.Namespace) -> tuple[float, str]:
    """``lightning_sae fit`` of the recipe on the file: seconds per step (:class:`StepClock`) and,
    on CUDA, where steps waited for the device (:class:`SyncAudit`, "—" elsewhere)."""
    clock = StepClock(args.warmup, args.steps)
    audit = SyncAudit(max(1, args.warmup // 4))
    callbacks: list[Callback] = [clock]
    if args.device == "cuda":
        callbacks.append(audit)
    if recipe in args.profile:
        callbacks.append(StepProfile(args.warmup // 2, min(20, args.warmup // 2 - 1)))
    with tempfile.TemporaryDirectory() as logs:
        SAECLI(
            SparseAutoencoder,
            ActivationDataModule,
            args=[
                "fit", *recipe_args(recipe, data, args.d_sae, args.k, args.precision),
                "--data.batch_size", str(args.batch_size), "--data.num_workers", str(args.num_workers),
                "--trainer.accelerator", args.device, "--trainer.devices", "1",
                "--trainer.val_check_interval", str(10 * args.steps), "--trainer.enable_checkpointing", "false",
                "--trainer.logger.init_args.save_dir", logs, "--trainer.enable_model_summary", "false",
                "--model.compile", str(args.compile).lower(), *os.environ.get("FIT_ARGS", "").split(),
            ],
            trainer_defaults={"callbacks": callbacks},
        )
    return clock.seconds, audit.summary() if args.device == "cuda" else "—"


# ----------------------------------------------------------------------------------------- SAELens
SAELENS_CLASSES = {"topk": "TopK", "relu-l1": "Standard", "anthropic-jan2025": "JumpReLU", "jumprelu-l0": "JumpReLU"}


def saelens_seconds_per_step(recipe: str, batch: Tensor, args: argparse.Namespace) -> float:
    """SAELens' SAETrainer on rows already on the device, timed from its step ``warmup`` to ``steps``."""
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    name = SAELENS_CLASSES[recipe]
    options: dict[str, Any] = {"d_in": batch.shape[1], "d_sae": args.d_sae, "device": str(batch.device)}
    if name == "TopK":
        options["k"] = args.k
    if name == "JumpReLU" and recipe == "anthropic-jan2025":
        options.update(jumprelu_sparsity_loss_mode="tanh", jumprelu_ste_to_input=True, pre_act_loss_coefficient=3e-6)
    sae = getattr(sae_lens, f"{name}TrainingSAE")(getattr(sae_lens, f"{name}TrainingSAEConfig")(**options))
    clock = {"start": 0.0, "count": 0}

    def rows() -> Iterator[Tensor]:
        while True:
            if clock["count"] == args.warmup:
                synchronize(batch.device)
                clock["start"] = time.perf_counter()
            clock["count"] += 1
            yield batch

    config = SAETrainerConfig(
        total_training_samples=args.steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=1e-4,
        lr_end=1e-4,
        device=str(batch.device),
        autocast=args.precision == "bf16-mixed",
        n_batches_for_norm_estimate=1,
    )
    SAETrainer(config, sae, rows()).fit()
    synchronize(batch.device)
    return (time.perf_counter() - clock["start"]) / (args.steps - args.warmup)


# ------------------------------------------------------------------------------------------ main
def write_rows(path: Path, rows: int, d_in: int, dtype: str) -> None:
    """A file of standard normal rows, unless ``path`` holds one of this shape and dtype."""
    if path.exists() and format.read_info(path).n_rows == rows and format.read_info(path).d_in == d_in:
        return
    rng = np.random.default_rng(0)
    with format.create(path, d_in=d_in, dtype=dtype, chunk_rows=4096) as file:
        for start in range(0, rows, 65536):
            format.append(file, rng.standard_normal((min(65536, rows - start), d_in), dtype=np.float32).astype(dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="TopK's k, the target L0 of the other recipes")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass (model.compile)")
    parser.add_argument("--profile", nargs="*", default=[], help="recipes whose fit steps are profiled (printed)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "lightning_sae_throughput_train.h5")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and args.precision == "32-true":
        torch.set_float32_matmul_precision("high")  # what fit does on CUDA (model.allow_tf32), for the loops too
    rows = (args.steps + 16) * args.batch_size  # one epoch covers the timed steps: no worker restarts in them
    write_rows(args.data, rows + 16_384, args.d_in, "float16" if device.type == "cuda" else "float32")
    batch = torch.randn(args.batch_size, args.d_in, device=device)
    saelens = importlib.util.find_spec("sae_lens") is not None
    host = machine() + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    results: list[dict[str, Any]] = []
    for recipe in args.recipes:
        row: dict[str, Any] = {"recipe": recipe}
        plain = plain_step(recipe, args.d_in, args.d_sae, args.k, batch, args.precision)
        row["plain"] = args.batch_size / timed(plain, args.steps, args.warmup, device) if plain else None
        model = recipe_model(recipe, args.data, args.d_sae, args.k, args.precision).to(device)
        if args.compile:
            model.forward_pass = torch.compile(model.forward_pass)  # type: ignore[method-assign]
        step = model_step(model, batch, args.precision)
        row["model"] = args.batch_size / timed(step, args.steps, args.warmup, device)
        row["syncs"] = syncs_in_model_step(step) if device.type == "cuda" else "—"
        fit_seconds, row["fit syncs"] = fit_seconds_per_step(recipe, args.data, args)
        row["fit"] = args.batch_size / fit_seconds
        row["saelens"] = args.batch_size / saelens_seconds_per_step(recipe, batch, args) if saelens else None
        results.append(row)
        print({key: round(value) if isinstance(value, float) else value for key, value in row.items()}, flush=True)
    print(report(results, args, host))


def report(results: list[dict[str, Any]], args: argparse.Namespace, host: str) -> str:
    def rate(value: float | None) -> str:
        return "—" if value is None else f"{value:,.0f}"

    def ratio(fit: float, other: float | None) -> str:
        return "—" if other is None else f"{fit / other:.2f}×"

    lines = [
        f"Machine: {host}. `.venv/bin/python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`",
        "",
        f"d_in {args.d_in}, d_sae {args.d_sae}, k / target L0 {args.k}, batch {args.batch_size}, {args.precision}, "
        f"compile {'on' if args.compile else 'off'}, {args.num_workers} loader workers, "
        f"tokens/s over steps {args.warmup}–{args.steps}.",
        "",
        "| recipe | plain loop | model loop | `fit` | SAELens | fit ÷ plain | fit ÷ model | fit ÷ SAELens "
        "| syncs: model step | syncs: fit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['recipe']} | {rate(row['plain'])} | {rate(row['model'])} | {rate(row['fit'])} | "
            f"{rate(row['saelens'])} | {ratio(row['fit'], row['plain'])} | {ratio(row['fit'], row['model'])} | "
            f"{ratio(row['fit'], row['saelens'])} | {row['syncs']} | {row['fit syncs']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
