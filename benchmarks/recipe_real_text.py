"""Do the recipes' SAEs keep the language model's predictions? ΔCE and KL on held-out text.

Usage (after ``make smollm2-data``)::

    .venv/bin/python benchmarks/recipe_real_text.py

On the activation file of ``make smollm2-data`` (SmolLM2-135M-Instruct, residual stream after
layer 6), every recipe config is trained at ``--d-sae`` features with its sparsity knob at
``--l0``, beside the plain PyTorch TopK loop (k = ``--l0``) and, when ``sae_lens`` is importable,
SAELens' trainer with its TopK and JumpReLU SAEs; all on the same shuffled training rows (the
file's last rows held out), for the same number of rows, in batches of ``--batch-size``. The plain
loop and SAELens train at ``--lr`` on raw activations; the recipes at their configs' learning rates.

Each SAE is then spliced into the language model by ``lightning_sae evaluate`` on ``--text``, text
the cache never read (the cache reads the Python docs in sorted order and stops long before
``whatsnew/``): ΔCE = CE with the SAE spliced in − clean CE, KL(clean ‖ spliced), loss recovered,
and L0 and FVU on those tokens; "L0, held-out rows" and "dead" (the share of features that fire
on none of them) are measured on the file's held-out activation rows, text like the training text.
Target (issue 8): every recipe at ΔCE and KL no higher than the plain loop's.
The Markdown report goes to ``--out`` and the numbers to ``--results`` (JSON). ``--seed N`` trains
every method from another initialisation on the same rows (stored as ``METHOD (seed N)``): on this
text the seed alone moves a recipe's ΔCE by up to 0.03 nats (docs/recipe_real_text.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
from machine import machine

from lightning_sae.data.format import ACTIVATIONS, open_for_reading, read_info
from lightning_sae.export import export
from lightning_sae.files import written_atomically
from lightning_sae.lm.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
VAL_ROWS = 16_384
HELD_OUT_TEXT = "/usr/share/doc/python3.11/html/_sources/whatsnew/3.11.rst.txt"
EVAL_WINDOWS = 48
"""Context windows of held-out text the SAEs are spliced into (of the file's context length)."""


def downstream(trained: Trained, data: Path, text: str) -> dict[str, Any]:
    """``lightning_sae evaluate`` of one trained SAE, plus its dead share on the held-out rows."""
    info = read_info(data)
    context_length = int(info.attrs.get("context_length", 128))
    with tempfile.TemporaryDirectory() as directory:
        export(trained.model, Path(directory) / "sae", source=info.attrs)
        result = evaluate(sae=Path(directory) / "sae", text=text, data=data, max_tokens=EVAL_WINDOWS * context_length)
    with open_for_reading(data) as file:
        held_out = torch.from_numpy(file[ACTIVATIONS][-VAL_ROWS:]).float()
    with torch.no_grad():
        active = trained.model.encode(held_out) > 0
        fired = active.any(0)
    return {
        "method": trained.name,
        "delta_ce": result["ce_sae"] - result["ce_clean"],
        "kl": result["kl_sae"],
        "loss_recovered": result["loss_recovered"],
        "l0": result["l0"],
        "train_l0": trained.train_l0,
        "rows_l0": active.sum(-1).float().mean().item(),
        "fvu": result["fvu"],
        "dead": 1 - fired.float().mean().item(),
        "seconds": trained.seconds,
        "train_rows": trained.train_rows,
        "ce_clean": result["ce_clean"],
        "n_tokens": result["n_tokens"],
    }


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    entries = [value for key, value in results.items() if not key.startswith("_")]
    reference = next((entry for entry in entries if entry["method"] == PLAIN_TOPK), None)
    lines = [
        "## Recipe quality on real text",
        "",
        f"Machine: {results['_machine']['machine']}.",
        "",
        "```",
        command,
        "```",
        "",
        f"SmolLM2-135M-Instruct, residual stream after layer 6 (`make smollm2-data`), d_sae {args.d_sae}, L0 "
        f"{args.l0:g}, {entries[0]['train_rows']:,} training rows in batches of {args.batch_size} for every SAE; "
        f"held-out text: {Path(args.text).name} ({entries[0]['n_tokens']:,} scored tokens, clean CE "
        f"{entries[0]['ce_clean']:.3f} nats). ΔCE and KL in nats per token. "
        "Target: ΔCE and KL at most the plain loop's.",
        "",
        "| method | ΔCE | KL | loss recovered | L0 | L0, held-out rows | L0, last training batch | FVU | dead | s "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for entry in sorted(entries, key=lambda entry: (entry["method"] != PLAIN_TOPK, entry["method"])):
        train_l0 = "—" if entry.get("train_l0") is None else f"{entry['train_l0']:.1f}"
        rows_l0 = "—" if entry.get("rows_l0") is None else f"{entry['rows_l0']:.1f}"
        verdict = "—"
        if reference is not None and entry is not reference:
            met = entry["delta_ce"] <= reference["delta_ce"] and entry["kl"] <= reference["kl"]
            verdict = "✓" if met else "✗"
        lines.append(
            f"| {entry['method']} | {entry['delta_ce']:.4f} | {entry['kl']:.4f} | {entry['loss_recovered']:.1%} | "
            f"{entry['l0']:.1f} | {rows_l0} | {train_l0} | {entry['fvu']:.3f} | {entry['dead']:.0%} | "
            f"{entry['seconds']:.0f} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "smollm2-l6.h5")
    parser.add_argument("--text", default=HELD_OUT_TEXT)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--l0", type=float, default=32)
    parser.add_argument("--rows", type=int, default=1_536_000, help="training rows of every SAE")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the plain loop and SAELens")
    add_recipes_argument(parser)
    add_seed_argument(parser)
    parser.add_argument("--no-saelens", action="store_true")
    parser.add_argument("--no-plain", action="store_true", help="keep the plain loop's stored result")
    parser.add_argument("--results", type=Path, default=ROOT / "data" / "bench" / "recipe_real_text.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "recipe_real_text.md")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found: run `make smollm2-data` first")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results["_machine"] = {"machine": machine()}
    budget = Budget(args.data, args.d_sae, args.l0, args.rows, VAL_ROWS, args.batch_size, args.seed)
    configs = chosen_recipes(args.recipes)
    chosen = trainers(budget, configs, args.lr, plain=not args.no_plain, saelens=not args.no_saelens)
    for train in chosen.values():
        result = downstream(train(), args.data, args.text)
        results[result["method"]] = result
        print(
            f"{result['method']:22} ΔCE {result['delta_ce']:.4f}  KL {result['kl']:.4f}  L0 {result['l0']:.1f}  "
            f"FVU {result['fvu']:.3f}  dead {result['dead']:.0%}  {result['seconds']:.0f} s",
            flush=True,
        )
        with written_atomically(args.results) as temporary:
            temporary.write_text(json.dumps(results, indent=1))
    command = f".venv/bin/python benchmarks/recipe_real_text.py {' '.join(sys.argv[1:])}".strip()
    with written_atomically(args.out) as temporary:
        temporary.write_text(report(results, args, command))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
