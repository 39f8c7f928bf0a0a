"""Do the shipped recipes learn the true features? Every config against a plain loop and SAELens.

Usage::

    .venv/bin/python benchmarks/recipe_quality.py                    # every set, every recipe
    .venv/bin/python benchmarks/recipe_quality.py --sets toy-offset --recipes topk relu-l1
    .venv/bin/python benchmarks/recipe_quality.py --sets wide-sparse --recipes /tmp/my-topk.yaml --seed 1 --resume

For each synthetic superposition set below (written once by ``lightning_sae synth`` into
``--data-dir``), every recipe config in ``configs/`` (all but the quickstart, a small TopK) is
trained by ``lightning_sae fit`` at its own defaults, with only its sparsity knob set to the set's
true L0 (``k`` for TopK encoders, ``model.target_l0`` for penalty recipes) and the same budget of
training rows. Beside them, in
the same run and on the same rows (the same shuffled training stream, the same held-out tail):

- ``plain TopK``: the forty-line PyTorch loop of ``plain_topk.py`` (k = true L0 rounded), the
  reference the targets are relative to;
- ``SAELens TopK`` and ``SAELens JumpReLU`` (its quadratic-L0 mode with target_l0 = true L0),
  trained by SAELens' own ``SAETrainer`` when ``sae_lens`` is importable (the ``[compat]``
  extra), with its activation normalisation on and the plain loop's learning rate.

Scores, on the held-out rows: MMCS (mean over true features of the best cosine with a decoder
row), the share of true features recovered at cosine > 0.9, FVU (residual sum of squares over
total variance), L0, and the share of features that fire on no held-out row. Targets (issue 8):
MMCS ≥ 0.95, recovered ≥ 90%, FVU ≤ 1.2× the plain loop's. Results accumulate in
``--results`` (JSON in docs/, one entry per set and method with the machine it ran on, so the sets
can be run separately, in several sessions, with ``--resume``) and the Markdown report of every
stored result is written to ``--out``. One run is one initialisation: ``--seed N`` trains every
method from another one on the same rows, stored as ``METHOD (seed N)``, to tell a difference from
the spread between seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from contenders import (
    PLAIN_TOPK,
    Budget,
    Trained,
    add_recipes_argument,
    add_seed_argument,
    chosen_recipes,
    trainers,
)
from machine import hardware, load_average
from torch import Tensor

from lightning_sae.callbacks.feature_recovery import RECOVERED_COSINE, max_cosine_similarities
from lightning_sae.data.format import ACTIVATIONS, GROUND_TRUTH, open_for_reading
from lightning_sae.data.synth import synth
from lightning_sae.files import written_atomically

ROOT = Path(__file__).resolve().parents[1]
VAL_ROWS = 16_384
PLAIN_LR = 2e-3
"""Learning rate of the plain loop (raw activations), the one that recovers the toy's features, and of SAELens."""


@dataclass(frozen=True)
class SyntheticSet:
    """A toy model of superposition (see ``lightning_sae synth``) and the budget every method gets."""

    name: str
    d_in: int
    n_features: int
    true_l0: float
    exponent: float
    """0: every feature equally frequent; > 0: power-law frequencies."""
    offset: float
    """Norm of the shared offset of every row."""
    train_rows: int
    """Training rows each method sees (its epochs over the file's rows included)."""
    d_sae: int
    file_rows: int = 1_048_576

    def path(self, directory: Path) -> Path:
        return directory / f"{self.name}.h5"

    def write(self, directory: Path) -> Path:
        """The set's file, written unless it exists."""
        path = self.path(directory)
        if not path.exists():
            synth(
                out=path,
                n_rows=self.file_rows + VAL_ROWS,
                d_in=self.d_in,
                n_features=self.n_features,
                mean_active=self.true_l0,
                exponent=self.exponent,
                offset=self.offset,
                min_magnitude=0.5,
                max_magnitude=1.5,
                noise=0.01,
                dtype="float16" if self.d_in > 128 else "float32",
                seed=1,
            )
        return path


SETS = {
    s.name: s
    for s in (
        SyntheticSet("toy-offset", 64, 256, 5, exponent=0.4, offset=2.4, train_rows=12_288_000, d_sae=512),
        SyntheticSet("toy-uniform", 64, 256, 5, exponent=0.0, offset=0.0, train_rows=12_288_000, d_sae=512),
        SyntheticSet("wide-sparse", 128, 2048, 3, exponent=0.5, offset=1.0, train_rows=4_096_000, d_sae=4096),
        SyntheticSet("dense", 256, 1024, 30, exponent=0.0, offset=0.0, train_rows=4_096_000, d_sae=2048),
        SyntheticSet("wide-input", 512, 2048, 10, exponent=0.5, offset=4.0, train_rows=4_096_000, d_sae=3072),
    )
}
"""From d_in 64 to 512, 4 to 16 features per dimension, true L0 3 to 30, with and without an offset,
power-law and uniform frequencies; row budgets sized for a 2-core CPU (the larger sets get fewer)."""
QUICK = {
    s.name: s
    for s in (
        SyntheticSet("quick", 32, 128, 3, exponent=0.4, offset=1.0, train_rows=4_096_000, d_sae=256, file_rows=131_072),
    )
}


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class Score:
    method: str
    mmcs: float
    recovered: float
    fvu: float
    l0: float
    dead: float
    seconds: float
    train_rows: int
    coefficients: dict[str, float]
    machine: str
    """Where it ran: a set's methods may come from several runs (``--resume``), each recorded."""
    load_average: str = ""
    """The machine's load when the method started training: near the core count, another job ran."""


def held_out_rows(path: Path) -> tuple[Tensor, Tensor]:
    """The file's last VAL_ROWS rows (the rows every contender holds out) and its true features."""
    with open_for_reading(path) as file:
        rows = torch.from_numpy(file[ACTIVATIONS][-VAL_ROWS:]).float()
        return rows, torch.from_numpy(file[GROUND_TRUTH]["features"][()])


def score(trained: Trained, path: Path) -> Score:
    """MMCS, recovered share, FVU, L0 and dead share of one trained SAE on the held-out rows."""
    held_out, truth = held_out_rows(path)
    model = trained.model
    with torch.no_grad():
        features = model.encode(held_out)
        reconstruction = model(held_out)
    cosines = max_cosine_similarities(truth, model.W_dec.detach())
    residual = (held_out - reconstruction).pow(2).sum()
    variance = (held_out - held_out.mean(0)).pow(2).sum()
    return Score(
        method=trained.name,
        mmcs=cosines.mean().item(),
        recovered=(cosines > RECOVERED_COSINE).float().mean().item(),
        fvu=(residual / variance).item(),
        l0=(features > 0).sum(-1).float().mean().item(),
        dead=((features > 0).sum(0) == 0).float().mean().item(),
        seconds=trained.seconds,
        train_rows=trained.train_rows,
        coefficients=trained.coefficients,
        machine=hardware(),
    )


# ---------------------------------------------------------------------------------------- report
def meets_targets(result: dict[str, Any], reference_fvu: float | None) -> str:
    """✓ when MMCS ≥ 0.95, recovered ≥ 90% and FVU ≤ 1.2× the plain loop's, else what failed."""
    failed = []
    if result["mmcs"] < 0.95:
        failed.append("MMCS")
    if result["recovered"] < 0.9:
        failed.append("recovered")
    if reference_fvu is not None and result["fvu"] > 1.2 * reference_fvu:
        failed.append("FVU")
    return "✓" if not failed else "✗ " + ", ".join(failed)


def report(results: dict[str, dict[str, Any]], sets: dict[str, SyntheticSet]) -> str:
    """The Markdown report of every stored result, headed by the commands that produced them."""
    commands = dict.fromkeys(entry["command"] for entry in results.values() if "command" in entry)
    lines = [
        "## Recipe quality on synthetic superposition",
        "",
        "```",
        *commands,
        "```",
        "",
        (
            "Each set: unit feature directions, magnitudes U(0.5, 1.5), noise 0.01, held-out tail of "
            f"{VAL_ROWS:,} rows. Every method sees the same training rows in the same order (its batch size "
            "and the row budget decide its steps). Targets: MMCS ≥ 0.95, recovered ≥ 90%, FVU ≤ 1.2× plain TopK."
        ),
    ]
    for name, data in sets.items():
        entries = [value for key, value in results.items() if key.startswith(f"{name}/")]
        if not entries:
            continue
        reference = next((entry for entry in entries if entry["method"] == PLAIN_TOPK), None)
        started = [f"{entry['method']} {entry['load_average']}" for entry in entries if entry.get("load_average")]
        loads = f" Load average (1, 5, 15 min) when each method started: {'; '.join(started)}." if started else ""
        reference_fvu = reference["fvu"] if reference else None
        lines += [
            "",
            (
                f"### {name}: d_in {data.d_in}, {data.n_features} features, true L0 {data.true_l0:g}, "
                f"{'power-law' if data.exponent else 'uniform'} frequencies, offset {data.offset:g}; d_sae {data.d_sae}"
            ),
            "",
            "Machine: " + "; ".join(sorted({entry["machine"] for entry in entries})) + "." + loads,
            "",
            "| method | MMCS | recovered | FVU | FVU ÷ plain | L0 | dead | final λ | training rows | s | targets |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        ]
        for entry in sorted(entries, key=lambda entry: (entry["method"] != PLAIN_TOPK, entry["method"])):
            ratio = f"{entry['fvu'] / reference_fvu:.2f}" if reference_fvu else "—"
            coefficients = ", ".join(f"{name} {value:.3g}" for name, value in entry.get("coefficients", {}).items())
            lines.append(
                f"| {entry['method']} | {entry['mmcs']:.3f} | {entry['recovered']:.0%} | {entry['fvu']:.3f} | "
                f"{ratio} | "
                f"{entry['l0']:.1f} | {entry['dead']:.0%} | {coefficients or '—'} | {entry['train_rows']:,} | "
                f"{entry['seconds']:.0f} | {meets_targets(entry, reference_fvu)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", help=f"sets to run (default all: {', '.join(SETS)})")
    add_recipes_argument(parser)
    add_seed_argument(parser)
    parser.add_argument("--quick", action="store_true", help="one small set: a smoke test of the benchmark")
    parser.add_argument("--no-saelens", action="store_true", help="skip SAELens even when it is installed")
    parser.add_argument("--resume", action="store_true", help="skip the methods whose result is stored already")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument(
        "--results", type=Path, help="JSON store (default docs/recipe_quality.json; with --quick, in DATA_DIR)"
    )
    parser.add_argument("--out", type=Path, help="report (default docs/recipe_quality.md; with --quick, DATA_DIR/)")
    args = parser.parse_args()
    sets = QUICK if args.quick else SETS
    chosen = {name: sets[name] for name in (args.sets or sets)}
    configs = chosen_recipes(args.recipes)
    default_store = args.data_dir / "recipe_quality_quick.json" if args.quick else ROOT / "docs" / "recipe_quality.json"
    store = args.results or default_store
    out = args.out or (args.data_dir / "recipe_quality_quick.md" if args.quick else ROOT / "docs" / "recipe_quality.md")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = json.loads(store.read_text()) if store.exists() else {}
    command = f".venv/bin/python benchmarks/recipe_quality.py {' '.join(sys.argv[1:])}".strip()
    for data in chosen.values():
        path = data.write(args.data_dir)
        budget = Budget(path, data.d_sae, data.true_l0, data.train_rows, VAL_ROWS, seed=args.seed)
        for method, train in trainers(budget, configs, PLAIN_LR, saelens=not args.no_saelens).items():
            if args.resume and f"{data.name}/{method}" in results:
                continue
            load = load_average()
            result = score(train(), path)
            result.load_average = load
            results[f"{data.name}/{result.method}"] = asdict(result) | {"command": command}
            print(
                f"{data.name:12} {result.method:22} MMCS {result.mmcs:.3f}  recovered {result.recovered:.0%}  "
                f"FVU {result.fvu:.3f}  L0 {result.l0:.1f}  dead {result.dead:.0%}  {result.seconds:.0f} s",
                flush=True,
            )
            with written_atomically(store) as temporary:
                temporary.write_text(json.dumps(results, indent=1))
    with written_atomically(out) as temporary:
        temporary.write_text(report(results, sets))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
