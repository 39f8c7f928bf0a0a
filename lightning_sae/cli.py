"""The ``lightning_sae`` entry point.

- ``fit`` / ``validate`` / ``test``: LightningCLI over :class:`SparseAutoencoder` and
  :class:`ActivationDataModule`; d_in, d_out and the input scales are linked from the data file.
  ``fit`` exports the trained SAE to ``<log dir>/sae/`` and prints the final metrics.
  Each run has a log directory of its own (an existing one is refused unless the run continues
  it from one of its checkpoints, or ``--overwrite true`` replaces it), checkpoints are written
  whole (:class:`~lightning_sae.checkpoint_io.AtomicCheckpointIO`), and a run from
  ``--ckpt_path`` must be given the checkpoint's model arguments.
- ``synth``, ``export``, and the other plain commands below: one function each, whose typed
  arguments and docstring jsonargparse turns into the command line and its help.

A :class:`~lightning_sae.errors.UserError` anywhere ends the program with its message and exit
status 2, without a traceback; so do a full disk and a failed memory allocation.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonargparse
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from lightning_sae.callbacks.dead_features import DeadFeatureTracker
from lightning_sae.callbacks.feature_recovery import FeatureRecovery
from lightning_sae.callbacks.non_finite import NonFiniteGuard
from lightning_sae.callbacks.progress import StepProgressBar
from lightning_sae.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.format import read_info
from lightning_sae.errors import UserError
from lightning_sae.export import export
from lightning_sae.files import out_of_space, temporary_sibling
from lightning_sae.metrics import log10_feature_density
from lightning_sae.model import SparseAutoencoder, upgrade_checkpoint
from lightning_sae.run_summary import summarize_fit

PLAIN_COMMANDS = {
    "synth": "lightning_sae.data.synth:synth",
    "cache": "lightning_sae.lm.cache:cache",
    "export": "lightning_sae.cli:export_checkpoint",
    "evaluate": "lightning_sae.lm.evaluate:evaluate",
    "grid": "lightning_sae.grid:grid",
    "report": "lightning_sae.report:report",
}
"""Commands that are one function each: name → ``module:function`` (imported on use)."""

LIGHTNING_COMMANDS = ("fit", "validate", "test")

HARMLESS_WARNINGS = (
    "Your `IterableDataset` has `__len__` defined",  # the stream shards workers itself
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning 2.6 with torch 2.13
)
"""Messages of third-party warnings that say nothing about the user's run."""

RUN_TIME_ARGUMENTS = ("decoding", "compile", "allow_tf32")
"""Model arguments that a run from ``--ckpt_path`` takes as given: they change how it computes,
not what the checkpoint restores."""
PLUGIN_ARGUMENTS = ("encoder", "penalties")
"""Model arguments compared by class only: their own arguments (k, coefficients) apply as given."""
LIGHTNING_CHECKPOINT_NAMES = ("best", "last", "hpc", "registry")
"""``ckpt_path`` values that Lightning resolves to a file itself."""


class SAECLI(LightningCLI):
    """LightningCLI with the data → model links, the always-on callback and the fit-end export."""

    overwrite: bool = False
    """``--overwrite``: replace the run's log directory when it exists."""
    replaces_outputs: bool = False
    """Whether the run replaces an earlier config.yaml and export in its log directory: it continues
    that run, or was asked to (``--overwrite`` without a log directory of its own)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in (
            ("data.d_in", "model.d_in"),
            ("data.d_out", "model.d_out"),
            ("data.input_scale", "model.input_scale"),
            ("data.target_scale", "model.target_scale"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_lightning_class_args(FeatureRecovery, "feature_recovery")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Lightning's (``--seed_everything``) and ``--overwrite``."""
        super().add_default_arguments_to_parser(parser)
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="Replace the run's log directory (<save_dir>/<name>/<version>) when it exists, e.g. a logger "
            "version given before; a run from one of its checkpoints (--ckpt_path) continues in it without this.",
        )

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` and refuse model arguments that differ from the checkpoint's.

        Replaces Lightning's, which loads the checkpoint's model arguments over the given ones (from
        the command line and ``--config``), so that the run and its config.yaml silently differ
        from what was typed. The checkpoint restores its weights, optimizer and schedule whatever
        the arguments say, so a run from it is given its model arguments; the run-time ones
        (:data:`RUN_TIME_ARGUMENTS`) and the encoder's and penalties' own arguments (k, the
        coefficients) apply as given.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or _resolved_by_lightning(str(ckpt_path)):
            return
        checkpoint = read_checkpoint(ckpt_path)
        conflicts = resume_conflicts(self.config[subcommand].model.as_dict(), checkpoint, str(ckpt_path))
        if conflicts:
            raise UserError(
                f"{ckpt_path} was trained with other model arguments: {'; '.join(conflicts)}. A run from a "
                "checkpoint restores its weights, optimizer and schedule: give the checkpoint's values (its "
                "run's config.yaml holds them), or leave out --ckpt_path to start a new run"
            )

    def before_instantiate_classes(self) -> None:
        """Take ``--overwrite`` out of the config that config.yaml records (as false): running that
        file again must never replace a run."""
        config = self._subcommand_config()
        self.overwrite = bool(config.overwrite)
        config.overwrite = False

    def _subcommand_config(self) -> Any:
        """The parsed config of the subcommand (of the whole command line when run without one)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def instantiate_classes(self) -> None:
        """Lightning's; an SAE whose weights do not fit in memory stops with one line."""
        try:
            super().instantiate_classes()
        except RuntimeError as error:
            if not allocation_failed(error):
                raise
            raise UserError(self._weights_too_large()) from error

    def _weights_too_large(self) -> str:
        """The message for an SAE whose weights cannot be allocated: their size, from the data's widths."""
        config = self._subcommand_config()
        paths = config.data.path
        info = read_info(paths if isinstance(paths, str) else paths[0])
        d_sae = config.model.d_sae
        gigabytes = 4 * d_sae * (info.d_in + info.d_out) / 1e9
        return (
            f"cannot allocate the SAE's weights: d_sae={d_sae} needs {gigabytes:.1f} GB for W_enc and W_dec "
            f"(d_in={info.d_in}, d_out={info.d_out}, float32), and training about 4 times that (gradients, "
            "Adam's state); choose a smaller --model.d_sae"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, with :class:`StepProgressBar` as its progress bar unless the config
        names one or turns the bar off (``trainer.enable_progress_bar: false``), and with
        :class:`AtomicCheckpointIO` unless the config names another ``CheckpointIO`` plugin."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        configured = _as_list(config.get("callbacks"))
        defaults = _as_list(self.trainer_defaults.get("callbacks"))
        named = any(isinstance(callback, ProgressBar) for callback in [*configured, *defaults])
        if config.get("enable_progress_bar") is not False and not named:
            config["callbacks"] = [*configured, StepProgressBar()]
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, in a log directory of the run's own (:meth:`_claim_run_directory`); a run that
        fails before its first step (a failed allocation, a bad checkpoint) removes the directory
        it created."""
        created = self._claim_run_directory()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if created is not None and self.trainer.global_step == 0:
                shutil.rmtree(created, ignore_errors=True)
            raise

    def _claim_run_directory(self) -> Path | None:
        """Make the run's log directory its own before anything is written there.

        A logger that gives each run a directory (TensorBoard, CSV: ``<save_dir>/<name>/<version>``)
        gets it created here, atomically, so that two runs given the same version cannot share it.
        An existing one is refused, unless the run continues it (``--ckpt_path`` one of its
        checkpoints: config.yaml and the export are then replaced) or ``--overwrite true`` replaces
        it whole. Without such a logger, runs share ``trainer.default_root_dir``, where an earlier
        run's config.yaml is replaced likewise only. Global rank 0 creates the directory.

        Returns:
            The directory, when this run created it.
        """
        log_dir = Path(self.trainer.log_dir or ".")
        ckpt_path = self._subcommand_config().get("ckpt_path")
        continues = ckpt_path is not None and log_dir.resolve() in Path(ckpt_path).resolve().parents
        if continues and self.overwrite:
            raise UserError(
                f"--overwrite true would delete {log_dir}, which holds the checkpoint to resume ({ckpt_path}); "
                "leave it out to continue that run in its directory"
            )
        own_directory = isinstance(self.trainer.logger, (TensorBoardLogger, CSVLogger))
        self.replaces_outputs = continues or (self.overwrite and not own_directory)
        savers = [callback for callback in self.trainer.callbacks if isinstance(callback, SaveConfigCallback)]
        for saver in savers:
            saver.overwrite = self.replaces_outputs
        if continues or rank_zero_only.rank != 0:
            return None
        if not own_directory:
            config_paths = [log_dir / saver.config_filename for saver in savers]
            earlier = [path for path in config_paths if path.exists()]
            if earlier and not self.overwrite:
                raise UserError(
                    f"{earlier[0]} is an earlier run's: pass --overwrite true to replace its config and export, or "
                    "give this run another --trainer.default_root_dir"
                )
            return None
        if self.overwrite and log_dir.exists():
            replaced = temporary_sibling(log_dir, "old")
            os.replace(log_dir, replaced)
            shutil.rmtree(replaced)
        try:
            log_dir.parent.mkdir(parents=True, exist_ok=True)
            log_dir.mkdir()
        except FileExistsError:
            raise UserError(
                f"{log_dir} holds another run (its logger version was used before): give another "
                "--trainer.logger.init_args.version, continue that run with --ckpt_path one of its checkpoints, "
                "or pass --overwrite true to replace it"
            ) from None
        except OSError as error:
            raise UserError(
                f"cannot create the run directory {log_dir}: {error.strerror or error}; "
                "give a writable --trainer.logger.init_args.save_dir"
            ) from error
        return log_dir

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
            where = str(self._export(log_dir / "sae"))
        if not self.trainer.is_global_zero:
            return
        metrics = {
            name: float(value) for name, value in self.trainer.callback_metrics.items() if name.startswith("val/")
        }
        print(format_summary(metrics, where, str(log_dir)))
        # Run summary (lightning_sae/run_summary.py): metrics.json, read by grids, and the HParams tab.
        summarize_fit(log_dir, self._subcommand_config(), metrics, self.trainer.global_step,
                      train_rows=self.trainer.global_step * self.datamodule.batch_size * self.trainer.world_size,
                      tensorboard=isinstance(self.trainer.logger, TensorBoardLogger))

    def _export(self, out: Path) -> Path:
        """Export the trained SAE, with the feature density when a tracker measured it, to ``out``,
        written whole; a failed write says where the trained SAE still is."""
        trackers = [callback for callback in self.trainer.callbacks if isinstance(callback, DeadFeatureTracker)]
        density = trackers[0].feature_density() if trackers else None
        log10_density = None if density is None else log10_feature_density(density)
        try:
            return export(self.model, out, source=self.datamodule.infos[0].attrs,
                          log10_feature_density=log10_density, overwrite=self.replaces_outputs)
        except OSError as error:
            checkpoint = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
            then = f"'lightning_sae export --ckpt {checkpoint} --out {out}'" if checkpoint else "rerun the fit"
            raise UserError(
                f"cannot write the export {out}: {error.strerror or error}; nothing incomplete was left there: "
                f"free space (or make the folder writable), then {then}"
            ) from error


def resume_conflicts(given: dict[str, Any], checkpoint: dict[str, Any], where: str) -> list[str]:
    """``name=<checkpoint's value> (given <value>)`` for each model argument in ``given`` (the
    parsed ``model`` config) that differs from what the checkpoint ``where`` restores: its
    hyperparameters but the :data:`RUN_TIME_ARGUMENTS`, and the classes of its encoder and penalties."""
    if "plugins" not in checkpoint:
        raise UserError(f"{where} is not a lightning_sae checkpoint (no plugin description)")
    upgrade_checkpoint(checkpoint)
    restored = {
        name: value
        for name, value in checkpoint.get("hyper_parameters", {}).items()
        if name not in (*RUN_TIME_ARGUMENTS, *PLUGIN_ARGUMENTS)
    }
    plugins = checkpoint["plugins"]
    restored["encoder"] = plugins["encoder"]["class_path"]
    restored["penalties"] = [spec["class_path"] for spec in plugins["penalties"]]
    given = {**given, "encoder": _class_path(given.get("encoder")),
             "penalties": [_class_path(spec) for spec in given.get("penalties") or []]}
    return [
        f"{name}={_plain(restored[name])!r} (given {_plain(value)!r})"
        for name, value in given.items()
        if name in restored and _plain(value) != _plain(restored[name])
    ]


def _class_path(spec: Any) -> Any:
    """The class path of a parsed ``{class_path, init_args}`` plugin argument (else the value itself)."""
    return spec.get("class_path") if isinstance(spec, dict) else spec


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, as a checkpoint stores them."""
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _resolved_by_lightning(ckpt_path: str) -> bool:
    """Whether ``ckpt_path`` is a name Lightning resolves ("last", "registry:...") or a remote URL."""
    return "://" in ckpt_path or ckpt_path.partition(":")[0] in LIGHTNING_CHECKPOINT_NAMES


def _as_list(value: Any) -> list[Any]:
    """A trainer argument that takes one item or a list of them, as a list."""
    return [] if value is None else value if isinstance(value, list) else [value]


def allocation_failed(error: BaseException) -> bool:
    """Whether ``error`` is torch failing to allocate memory (CPU or GPU)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def format_summary(metrics: dict[str, float], export_dir: str, log_dir: str | None) -> str:
    """The end-of-fit report: final metrics, then where the logs and the export are."""
    lines = ["", "final validation metrics:"]
    lines += [f"  {name:<28} {value:.6g}" for name, value in sorted(metrics.items())]
    lines += [f"TensorBoard logs: tensorboard --logdir {log_dir}", f"SAELens export:   {export_dir}", ""]
    return "\n".join(lines)


def export_checkpoint(ckpt: Path, out: Path, overwrite: bool = False) -> Path:
    """Export a ``fit`` checkpoint to a directory in SAELens' layout.

    Args:
        ckpt: Checkpoint written by ``lightning_sae fit``.
        out: Output directory (cfg.json, sae_weights.safetensors), written whole.
        overwrite: Replace an existing export at ``out``.
    """
    checkpoint = read_checkpoint(ckpt)
    model = SparseAutoencoder.from_checkpoint_dict(checkpoint, str(ckpt))
    source = checkpoint.get(ActivationDataModule.__qualname__, {}).get("source")
    try:
        path = export(model, out, source=source, overwrite=overwrite)
    except OSError as error:
        raise UserError(
            f"cannot write {out}: {error.strerror or error}; nothing incomplete was left there: "
            "free space or give a writable --out"
        ) from error
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
        _run_command(argv, args)
    except UserError as error:
        print(f"lightning_sae: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_command(argv: list[str], args: list[str] | None) -> None:
    """Run the command ``argv`` names; a full disk or a failed allocation anywhere is a :class:`UserError`."""
    try:
        if not argv or argv[0] in ("-h", "--help"):
            _print_overview()
        elif argv[0] in PLAIN_COMMANDS:
            jsonargparse.CLI(_load(PLAIN_COMMANDS[argv[0]]), args=argv[1:], as_positional=False)
        else:
            SAECLI(SparseAutoencoder, ActivationDataModule, args=args)
    except OSError as error:
        if not out_of_space(error):
            raise
        raise UserError(
            f"the disk is full ({error}): free space, then run again (a fit resumes from its last checkpoint "
            "with --ckpt_path)"
        ) from error
    except RuntimeError as error:
        if not allocation_failed(error):
            raise
        reason = str(error).strip().splitlines()[0]
        raise UserError(
            f"out of memory ({reason}): use smaller sizes (--model.d_sae, batch sizes) or a device with more memory"
        ) from error


if __name__ == "__main__":
    main()
