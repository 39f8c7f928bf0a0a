"""The ``lightning_sae`` entry point.

- ``fit`` / ``validate`` / ``test``: LightningCLI over :class:`SparseAutoencoder` and
  :class:`ActivationDataModule`; d_in, d_out and the input scales are linked from the data file.
  ``fit`` exports the trained SAE to ``<log dir>/sae/`` and prints the final metrics.
- ``synth``, ``export``, and the other plain commands below: one function each, whose typed
  arguments and docstring jsonargparse turns into the command line and its help.

A :class:`~lightning_sae.errors.UserError` anywhere ends the program with its message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonargparse
from lightning import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sae.callbacks.dead_features import DeadFeatureTracker
from lightning_sae.callbacks.feature_recovery import FeatureRecovery
from lightning_sae.callbacks.progress import StepProgressBar
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.export import export
from lightning_sae.metrics import log10_feature_density
from lightning_sae.model import SparseAutoencoder

PLAIN_COMMANDS = {
    "synth": "lightning_sae.data.synth:synth",
    "cache": "lightning_sae.lm.cache:cache",
    "export": "lightning_sae.cli:export_checkpoint",
    "evaluate": "lightning_sae.lm.evaluate:evaluate",
}
"""Commands that are one function each: name → ``module:function`` (imported on use)."""

LIGHTNING_COMMANDS = ("fit", "validate", "test")

HARMLESS_WARNINGS = (
    "Your `IterableDataset` has `__len__` defined",  # the stream shards workers itself
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning 2.6 with torch 2.13
)
"""Messages of third-party warnings that say nothing about the user's run."""


class SAECLI(LightningCLI):
    """LightningCLI with the data → model links, the always-on callback and the fit-end export."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in (
            ("data.d_in", "model.d_in"),
            ("data.d_out", "model.d_out"),
            ("data.input_scale", "model.input_scale"),
            ("data.target_scale", "model.target_scale"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_lightning_class_args(FeatureRecovery, "feature_recovery")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with :class:`StepProgressBar` as its progress bar unless the config
        names one or turns the bar off (``trainer.enable_progress_bar: false``)."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        defaults = self.trainer_defaults.get("callbacks") or []
        defaults = defaults if isinstance(defaults, list) else [defaults]
        named = any(isinstance(callback, ProgressBar) for callback in [*configured, *defaults])
        if config.get("enable_progress_bar") is not False and not named:
            config["callbacks"] = [*configured, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Validate the final weights (unless the last step just did), export the SAE to
        ``<log dir>/sae`` and print the final validation metrics.

        An SAE whose encoder has no exact SAELens form is saved as a checkpoint instead
        (``<log dir>/checkpoints/final.ckpt``), and the summary says why.
        """
        if self.model.validated_step != self.trainer.global_step:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        log_dir = Path(self.trainer.log_dir or ".")
        encoder = self.model.encoder
        if encoder.saelens_architecture is None or not encoder.can_fold():
            final = log_dir / "checkpoints" / "final.ckpt"
            self.trainer.save_checkpoint(final)
            where = f"not written: {type(encoder).__name__} has no exact SAELens form; the SAE is in {final}"
        elif self.trainer.is_global_zero:
            trackers = [callback for callback in self.trainer.callbacks if isinstance(callback, DeadFeatureTracker)]
            density = trackers[0].feature_density() if trackers else None
            log10_density = None if density is None else log10_feature_density(density)
            where = str(export(self.model, log_dir / "sae", source=self.datamodule.infos[0].attrs,
                               log10_feature_density=log10_density))
        if not self.trainer.is_global_zero:
            return
        metrics = {
            name: float(value) for name, value in self.trainer.callback_metrics.items() if name.startswith("val/")
        }
        print(format_summary(metrics, where, str(log_dir)))


def format_summary(metrics: dict[str, float], export_dir: str, log_dir: str | None) -> str:
    """The end-of-fit report: final metrics, then where the logs and the export are."""
    lines = ["", "final validation metrics:"]
    lines += [f"  {name:<28} {value:.6g}" for name, value in sorted(metrics.items())]
    lines += [f"TensorBoard logs: tensorboard --logdir {log_dir}", f"SAELens export:   {export_dir}", ""]
    return "\n".join(lines)


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Export a ``fit`` checkpoint to a directory in SAELens' layout.

    Args:
        ckpt: Checkpoint written by ``lightning_sae fit``.
        out: Output directory (cfg.json, sae_weights.safetensors).
    """
    import torch

    if not Path(ckpt).is_file():
        raise UserError(f"checkpoint not found: {ckpt}")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = SparseAutoencoder.from_checkpoint_dict(checkpoint, str(ckpt))
    source = checkpoint.get(ActivationDataModule.__qualname__, {}).get("source")
    path = export(model, out, source=source)
    print(f"exported {ckpt} to {path}")
    return path


def _load(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _print_overview() -> None:
    commands = ", ".join((*LIGHTNING_COMMANDS, *PLAIN_COMMANDS))
    print(f"usage: lightning_sae {{{commands}}} [--help] ...\n")
    print("  fit/validate/test   train or evaluate an SAE (LightningCLI): lightning_sae fit --config configs/X.yaml")
    for name in PLAIN_COMMANDS:
        doc = (_load(PLAIN_COMMANDS[name]).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<19} {doc}")


def main(args: list[str] | None = None) -> None:
    """Run ``lightning_sae`` with ``args`` (default: the process arguments)."""
    argv = list(sys.argv[1:] if args is None else args)
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            _print_overview()
        elif argv[0] in PLAIN_COMMANDS:
            jsonargparse.CLI(_load(PLAIN_COMMANDS[argv[0]]), args=argv[1:], as_positional=False)
        else:
            SAECLI(SparseAutoencoder, ActivationDataModule, args=args, save_config_kwargs={"overwrite": True})
    except UserError as error:
        print(f"lightning_sae: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
