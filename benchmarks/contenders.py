"""The SAEs the quality benchmarks compare, each trained on the same rows of one activation file.

Every contender sees the training stream of ``lightning_sae fit`` (the file's rows shuffled by
``ActivationDataModule``, its last ``val_rows`` rows held out) for the same budget of rows, and
comes back as a :class:`~lightning_sae.model.SparseAutoencoder` on raw activations, so one
scorer (and ``lightning_sae evaluate``) treats all alike:

- a shipped recipe: ``lightning_sae fit --config configs/X.yaml`` at its defaults, with only its
  sparsity set to the asked L0 (:func:`lightning_sae.recipes.sparsity_arguments`), read back
  from its export;
- the plain PyTorch TopK loop of ``plain_topk.py``;
- SAELens' own ``SAETrainer`` with its TopK SAE, or its JumpReLU SAE in the quadratic-L0 mode
  (target_l0 = the asked L0), when ``sae_lens`` is importable (the ``[compat]`` extra); its
  activation normalisation is on (the scaling our recipes use), its learning rate is the plain
  loop's, and its dead window is topk.yaml's (so that its TopK's AuxK acts in a short run, as ours
  does); read back from its ``save_inference_model`` files.

All of them train on :data:`DEVICE`, where ``fit``'s ``accelerator: auto`` puts the recipes.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from plain_topk import train_plain_topk
from torch import Tensor

from lightning_sae.cli import main as lightning_sae
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import TopK
from lightning_sae.export import load_export
from lightning_sae.model import SparseAutoencoder
from lightning_sae.recipes import sparsity_arguments

PLAIN_TOPK = "plain TopK"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the plain loop and SAELens train: the GPU when there is one, as Lightning's ``auto`` picks."""
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOPK_CONFIG = CONFIGS / "topk.yaml"


@dataclass(frozen=True)
class Budget:
    """What every contender gets: ``train_rows`` rows of the training stream of ``path`` (its last
    ``val_rows`` held out), ``d_sae`` features at sparsity ``l0``, an initialisation from ``seed``."""

    path: Path
    d_sae: int
    l0: float
    train_rows: int
    val_rows: int
    batch_size: int | None = None
    """Rows per step; None: a recipe's own (``data.batch_size`` of its config), 4,096 for the others."""
    seed: int = 0

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """The training stream in batches of ``batch_size``."""
        return training_batches(self.path, batch_size, self.val_rows)

    def steps(self, batch_size: int) -> int:
        """Steps of ``batch_size`` rows that the budget allows (at least one)."""
        return max(1, self.train_rows // batch_size)

    def name(self, method: str) -> str:
        """A contender's name in the reports: ``method`` at the default seed 0, ``method (seed N)`` otherwise."""
        return method if self.seed == 0 else f"{method} (seed {self.seed})"


DEFAULT_BATCH_SIZE = 4096
"""Rows per step of the plain loop and SAELens when the budget does not set it."""


@dataclass
class Trained:
    """One contender after training."""

    name: str
    model: SparseAutoencoder
    seconds: float
    """Wall time of the training (data loading included)."""
    train_rows: int
    coefficients: dict[str, float] = field(default_factory=dict)
    """A recipe's penalty coefficients in force at the end (``train/<penalty>_coefficient``)."""
    train_l0: float | None = None
    """A recipe's L0 on its last logged training batch (``train/l0``)."""


def recipe_config(name: str) -> Path:
    """``configs/NAME.yaml`` for a shipped recipe's name, else ``name`` as the path of a YAML file (a copy
    with one value changed, say); an ``argparse`` type, so a missing file is one usage line, exit 2."""
    path = CONFIGS / f"{name}.yaml" if "/" not in name and not name.endswith(".yaml") else Path(name)
    if not path.is_file():
        shipped = ", ".join(config.stem for config in shipped_recipes())
        raise argparse.ArgumentTypeError(f"no config {path}: give a shipped recipe ({shipped}) or a YAML file")
    return path


def shipped_recipes() -> list[Path]:
    """Every shipped recipe: the configs but the quickstart."""
    return [path for path in sorted(CONFIGS.glob("*.yaml")) if path.stem != "quickstart"]


def add_recipes_argument(parser: argparse.ArgumentParser) -> None:
    """``--recipes``: shipped names or YAML paths; absent, every shipped recipe; given without names, none."""
    parser.add_argument(
        "--recipes",
        nargs="*",
        type=recipe_config,
        help="shipped recipe names or YAML files (default: every shipped recipe, configs/*.yaml but "
        "quickstart; the option without names: none)",
    )


def chosen_recipes(recipes: list[Path] | None) -> list[Path]:
    """The configs ``--recipes`` asked for: :func:`shipped_recipes` when it was absent."""
    return shipped_recipes() if recipes is None else recipes


def add_seed_argument(parser: argparse.ArgumentParser) -> None:
    """``--seed``: the initialisation seed of every contender (the data and its order stay the same)."""
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initialisation seed of every method (recipes' seed_everything, the plain loop, SAELens); the "
        "rows and their order do not change; results of a seed other than 0 are stored as 'METHOD (seed N)'",
    )


def training_batches(path: Path, batch_size: int, val_rows: int) -> Iterator[Tensor]:
    """The shuffled training stream of ``lightning_sae fit`` on ``path``, epoch after epoch, as float32
    on :data:`DEVICE`."""
    data = ActivationDataModule(str(path), batch_size=batch_size, val_rows=val_rows)
    data.setup("fit")
    epoch = 0
    while True:
        data.train_stream.seek(epoch, 0)
        for x, _ in data.train_stream:
            yield x.to(DEVICE).float()
        epoch += 1


def fit_recipe(config: Path, budget: Budget) -> Trained:
    """``lightning_sae fit`` of ``config`` at its defaults, with only its sparsity set to the budget's L0
    and ``seed_everything`` to its seed (in batches of the config's size unless the budget sets one)."""
    batch_size = budget.batch_size or yaml.safe_load(config.read_text())["data"]["batch_size"]
    steps = budget.steps(batch_size)
    with tempfile.TemporaryDirectory() as logs:
        args = [
            "fit", "--config", str(config), "--data.path", str(budget.path), "--data.val_rows", str(budget.val_rows),
            "--data.batch_size", str(batch_size), "--model.d_sae", str(budget.d_sae),
            "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.save_dir", logs,
            "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", "0",
            "--seed_everything", str(budget.seed), *sparsity_arguments(config, budget.l0),
        ]
        start = time.perf_counter()
        lightning_sae(args)
        seconds = time.perf_counter() - start
        run = Path(logs) / "run" / "version_0"
        model = load_export(run / "sae")
        last = last_logged(run)
    coefficients = {
        tag.removeprefix("train/").removesuffix("_coefficient"): value
        for tag, value in last.items()
        if tag.endswith("_coefficient")
    }
    return Trained(budget.name(config.stem), model, seconds, steps * batch_size, coefficients, last.get("train/l0"))


def last_logged(run: Path) -> dict[str, float]:
    """The last logged value of each ``train/`` scalar of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("train/")]
    return {tag: events.Scalars(tag)[-1].value for tag in tags}


def fit_plain_topk(budget: Budget, lr: float) -> Trained:
    """The plain loop at ``lr`` with k = the budget's L0 rounded, as a SparseAutoencoder (TopK encoder,
    x − b_dec encoded)."""
    batch_size = budget.batch_size or DEFAULT_BATCH_SIZE
    steps = budget.steps(batch_size)
    k = max(1, round(budget.l0))
    start = time.perf_counter()
    plain = train_plain_topk(budget.batches(batch_size), budget.d_sae, k=k, steps=steps, lr=lr, seed=budget.seed)
    seconds = time.perf_counter() - start
    d_in = plain.W_enc.shape[0]
    model = SparseAutoencoder(d_in=d_in, d_sae=budget.d_sae, encoder=lambda m: TopK(m, k=k), center_input=True)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(model, name).copy_(getattr(plain, name))
    return Trained(budget.name(PLAIN_TOPK), model.eval(), seconds, steps * batch_size)


def saelens_dead_window(batch_size: int) -> int:
    """SAELens' ``dead_feature_window`` (in steps) for topk.yaml's ``dead_after_tokens`` (in rows).

    SAELens' default, 1,000 steps, never elapses in a 1,000-step run, so its TopK's AuxK (which trains
    only the features dead under that window) would never act where ours does.
    """
    dead_after_rows = yaml.safe_load(TOPK_CONFIG.read_text())["model"]["dead_after_tokens"]
    return max(1, dead_after_rows // batch_size)


def saelens_available() -> bool:
    """Whether SAELens (the ``[compat]`` extra) is importable."""
    return importlib.util.find_spec("sae_lens") is not None


def fit_saelens(architecture: str, budget: Budget, lr: float) -> Trained:
    """SAELens' trainer with its ``topk`` SAE (k = the budget's L0) or ``jumprelu`` SAE (quadratic L0 loss,
    target L0 the budget's), at ``lr``, initialised after ``torch.manual_seed`` of the budget's seed."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    batch_size = budget.batch_size or DEFAULT_BATCH_SIZE
    batches = budget.batches(batch_size)
    first = next(batches)
    common = {
        "d_in": first.shape[1],
        "d_sae": budget.d_sae,
        "normalize_activations": "expected_average_only_in",
        "device": DEVICE,
    }
    sae: Any
    torch.manual_seed(budget.seed)
    if architecture == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=max(1, round(budget.l0)), **common))
    else:
        config = JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=budget.l0, **common)
        sae = JumpReLUTrainingSAE(config)
    steps = budget.steps(batch_size)
    config = SAETrainerConfig(
        dead_feature_window=saelens_dead_window(batch_size),
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        n_batches_for_norm_estimate=16,
        device=DEVICE,
    )
    start = time.perf_counter()
    SAETrainer(config, sae, batches).fit()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        sae.save_inference_model(directory)
        model = load_export(directory)
    return Trained(budget.name(f"SAELens {architecture}"), model, seconds, steps * batch_size)


def trainers(
    budget: Budget, configs: list[Path], lr: float, plain: bool = True, saelens: bool = True
) -> dict[str, Callable[[], Trained]]:
    """Each contender's trainer on ``budget``, by its report name: the plain loop (unless ``plain`` is
    false), every recipe of ``configs``, and SAELens' TopK and JumpReLU when ``saelens`` and it is
    installed; the plain loop and SAELens at ``lr``."""
    by_name: dict[str, Callable[[], Trained]] = {}
    if plain:
        by_name[budget.name(PLAIN_TOPK)] = lambda: fit_plain_topk(budget, lr)
    for config in configs:
        by_name[budget.name(config.stem)] = lambda config=config: fit_recipe(config, budget)
    if saelens and saelens_available():
        for architecture in ("topk", "jumprelu"):
            by_name[budget.name(f"SAELens {architecture}")] = lambda arch=architecture: fit_saelens(arch, budget, lr)
    return by_name
