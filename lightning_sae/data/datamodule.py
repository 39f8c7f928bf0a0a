"""``ActivationDataModule``: activation files → shuffled training and validation batches.

The files' dimensions and the input scaling constant are read at construction, so LightningCLI
can link them into the model (``d_in``, ``d_out``, ``input_scale``, ``target_scale``) and
nobody types them twice. The estimate is deterministic, and a resumed model keeps the scales
saved in its checkpoint.

Checkpoints carry the position in the training stream, so a resumed run neither replays nor skips
rows, provided it runs with the same data, devices, workers, batch size, buffer and seed (else the
interrupted epoch restarts from its first batch, with a warning). Under DDP every rank yields the
same number of batches; ``stream`` says which rows that leaves out of an epoch.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from lightning import LightningDataModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_sae.data.format import (
    ACTIVATIONS,
    GROUND_TRUTH,
    TARGETS,
    ActivationFileInfo,
    open_for_reading,
    read_info,
)
from lightning_sae.data.stream import ActivationStream, RowBlock, read_block, split_blocks
from lightning_sae.errors import UserError
from lightning_sae.files import ReadLock

MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ActivationDataModule(LightningDataModule):
    """Streams rows of one or many activation files; validation rows are held out at the end."""

    def __init__(
        self,
        path: str | list[str],
        batch_size: int = 4096,
        val_rows: int = 16_384,
        shuffle: bool = True,
        buffer_rows: int = 262_144,
        num_workers: int = 0,
        seed: int = 0,
        scale_sample_rows: int = 65_536,
    ) -> None:
        """
        Args:
            path: Activation file(s): a path, a glob, or a list of them.
            batch_size: Rows per batch on each device (seed 000 uses 32,768 in total).
            val_rows: Rows held out for validation, taken from the end of the last file.
            shuffle: Shuffle blocks and rows (seed 001 found this mattered little; keep it measurable).
            buffer_rows: Rows in the shuffle window of each data-loading worker (or of the main
                process), rounded down to whole batches; the loader holds two such buffers (one
                served while the next is read), its one large allocation.
            num_workers: DataLoader worker processes per device.
            seed: Seed of the shuffling.
            scale_sample_rows: Training rows sampled to estimate the input scaling constant.
        """
        super().__init__()
        self.paths = expand_paths(path)
        self.infos = [read_info(p) for p in self.paths]
        check_compatible(self.infos)
        self.batch_size = batch_size
        self.val_rows = val_rows
        self.shuffle = shuffle
        self.buffer_rows = buffer_rows
        self.num_workers = num_workers
        self.seed = seed
        self.scale_sample_rows = scale_sample_rows
        self.train_blocks, self.val_blocks = split_blocks(self.infos, val_rows)
        self._resume_position: dict[str, Any] | None = None
        self._read_locks: list[ReadLock] = []
        if not self.train_blocks:
            raise UserError(f"no training rows left after holding out val_rows={val_rows}")

    @property
    def d_in(self) -> int:
        """Width of ``activations``."""
        return self.infos[0].d_in

    @property
    def d_out(self) -> int | None:
        """Width of ``targets``, or None when the files have none (X = Y)."""
        return self.infos[0].d_out if self.infos[0].has_targets else None

    @cached_property
    def scales(self) -> tuple[float, float]:
        """(input_scale, target_scale) making E‖x‖₂ = √d_in and E‖y‖₂ = √d_out (seed 000).

        Estimated on up to ``scale_sample_rows`` training rows from blocks spread evenly over
        the training data, which must not all be one row (:func:`_scale`).
        """
        with_targets = self.d_out is not None
        sample = spread_sample(self.train_blocks, self.scale_sample_rows)
        x_norms: list[np.ndarray] = []
        y_norms: list[np.ndarray] = []
        first_rows: dict[str, np.ndarray] = {}
        varying: set[str] = set()  # datasets with a sampled row unlike their first
        files = {index: open_for_reading(self.paths[index]) for index in {block.file for block in sample}}
        try:
            for block in sample:
                x, y = read_block(files[block.file], block, with_targets)
                for name, rows in ((ACTIVATIONS, x), (TARGETS, y)):
                    if rows is not None and (rows != first_rows.setdefault(name, rows[0])).any():
                        varying.add(name)
                x_norms.append(np.linalg.norm(x.astype(np.float64), axis=1))
                if y is not None:
                    y_norms.append(np.linalg.norm(y.astype(np.float64), axis=1))
        finally:
            for file in files.values():
                file.close()
        input_scale = _scale(np.concatenate(x_norms), self.d_in, ACTIVATIONS, ACTIVATIONS in varying)
        target_scale = (
            _scale(np.concatenate(y_norms), self.d_out, TARGETS, TARGETS in varying) if with_targets else input_scale
        )
        return input_scale, target_scale

    @property
    def input_scale(self) -> float:
        return self.scales[0]

    @property
    def target_scale(self) -> float | None:
        """Scale of ``targets``; None when the files have none."""
        return self.scales[1] if self.d_out is not None else None

    def ground_truth(self) -> dict[str, np.ndarray] | None:
        """Datasets of the first file's ``ground_truth`` group (synthetic data), else None."""
        with open_for_reading(self.paths[0]) as file:
            if GROUND_TRUTH not in file:
                return None
            return {name: dataset[()] for name, dataset in file[GROUND_TRUTH].items()}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the first file's source attributes (model, layer, site, ...) and,
        while fitting, the position in the training stream.

        The position is the epoch and the batches of it the training loop has taken: every
        optimizer step took ``accumulate_grad_batches`` of them and every finished epoch
        ``num_training_batches``. A batch the loop has prefetched but not trained on is not
        counted, since a resumed run fetches it again.
        """
        state: dict[str, Any] = {"source": self.infos[0].attrs}
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            state["position"] = {
                "epoch": self.trainer.current_epoch,
                "batches": self._batches_taken_this_epoch(),
                "layout": self._layout(),
            }
        return state

    def _batches_taken_this_epoch(self) -> int:
        trainer = self.trainer
        assert trainer is not None
        taken = trainer.global_step * trainer.accumulate_grad_batches
        return int(taken - trainer.current_epoch * trainer.num_training_batches)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved stream position; the training loader's first pass starts there.

        Lightning warns on a mid-epoch resume unless the DataLoader itself is stateful; with a saved
        position the warning ("unreliable results") is false, so it is silenced.
        """
        self._resume_position = state_dict.get("position")
        if self._resume_position is not None:
            warnings.filterwarnings("ignore", MID_EPOCH_RESUME_WARNING, PossibleUserWarning)

    @classmethod
    def of(cls, trainer: Trainer) -> ActivationDataModule:
        """The trainer's ActivationDataModule; UserError when it uses other data."""
        datamodule = trainer.datamodule
        if not isinstance(datamodule, cls):
            raise UserError(f"this callback needs an ActivationDataModule, not {type(datamodule).__name__}")
        return datamodule

    def sample_batches(self, rows: int, seed: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Up to ``rows`` training rows as ``(x, y)`` batches; y is None when the SAE reconstructs x.

        The rows come from a fresh pass of the training stream with its own ``seed`` (blocks in a
        random order, rows shuffled within ``buffer_rows``, which bounds the memory), so the training
        stream's position is untouched. Under DDP it reads this rank's share of that pass.
        """
        stream = ActivationStream(
            self.infos,
            self.train_blocks,
            batch_size=min(rows, self.batch_size),
            shuffle=True,
            buffer_rows=min(rows, self.buffer_rows),
            seed=seed,
            drop_last=False,
        )
        remaining = rows
        for x, y in stream:
            if remaining <= 0:
                return
            yield x[:remaining], None if y is None else y[:remaining]
            remaining -= len(x)

    def setup(self, stage: str) -> None:
        """Build the streams, and hold a shared lock on every file until :meth:`teardown`, so that
        ``synth``/``cache --overwrite`` refuse to replace a file while this run reads it."""
        self._read_locks = self._read_locks or [ReadLock(path) for path in self.paths]
        self.train_stream = self._stream(self.train_blocks, shuffle=self.shuffle, drop_last=True)
        self.val_stream = self._stream(self.val_blocks, shuffle=False, drop_last=False)
        shards = f"{self.train_stream.world_size} device(s) × {max(1, self.num_workers)} worker(s)"
        if stage == "fit" and len(self.train_stream) == 0:
            raise UserError(
                f"the {self.train_stream.rows} training rows make no batch of batch_size={self.batch_size} "
                f"on each of {shards}: lower batch_size"
            )
        if self.val_rows > 0 and len(self.val_stream) == 0:
            raise UserError(f"val_rows={self.val_rows} leaves no validation row for each of {shards}: raise it")

    def teardown(self, stage: str) -> None:
        """Release the files' shared locks."""
        for lock in self._read_locks:
            lock.release()
        self._read_locks = []

    def _stream(self, blocks: list[RowBlock], shuffle: bool, drop_last: bool) -> ActivationStream:
        return ActivationStream(
            self.infos,
            blocks,
            batch_size=self.batch_size,
            shuffle=shuffle,
            buffer_rows=self.buffer_rows,
            seed=self.seed,
            num_workers=self.num_workers,
            drop_last=drop_last,
        )

    def _layout(self) -> dict[str, Any]:
        """What decides which rows each batch holds; a saved position is only valid under the same."""
        stream = self.train_stream
        return {
            "rows": stream.rows,
            "blocks": len(stream.blocks),
            "batch_size": self.batch_size,
            "window_rows": stream.window_rows,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "world_size": stream.world_size,
            "num_workers": self.num_workers,
        }

    def train_dataloader(self) -> DataLoader:
        return StreamLoader(
            self.train_stream, self.num_workers, self._pin_memory(), before_pass=self._position_train_stream
        )

    def val_dataloader(self) -> DataLoader:
        return StreamLoader(self.val_stream, self.num_workers, self._pin_memory())

    def _pin_memory(self) -> bool:
        """Batches for a CUDA device are put in page-locked memory, so their copy to it is asynchronous
        (Lightning copies with ``non_blocking``) and overlaps the training step before it."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _position_train_stream(self, stream: ActivationStream) -> None:
        """Start a pass over the training rows at the trainer's epoch, less what a resumed run consumed.

        Following the trainer rather than counting passes keeps the data right however Lightning
        resumes (it may pass over an epoch that the checkpoint had already finished).
        """
        if self.trainer is None:
            return
        epoch = self.trainer.current_epoch
        position, self._resume_position = self._resume_position, None
        skip = 0
        if position is not None and position["layout"] != self._layout():
            rank_zero_warn(
                f"the checkpoint's data layout {position['layout']} differs from this run's "
                f"{self._layout()}: epoch {position['epoch']} restarts from its first batch"
            )
        elif position is not None and position["epoch"] == epoch:
            skip = position["batches"]
        stream.seek(epoch, skip)


class StreamLoader(DataLoader):
    """The DataLoader of an :class:`ActivationStream`: one pass is one epoch.

    Workers are started afresh at every pass (not persistent), so each gets the stream as the main
    process holds it: ``before_pass`` can set the epoch and the batches to skip. A worker's
    ``UserError`` is re-raised with the worker's own message: torch would re-raise it with the
    worker's whole traceback as the message, which the command line prints.
    """

    def __init__(
        self,
        stream: ActivationStream,
        num_workers: int,
        pin_memory: bool = False,
        before_pass: Callable[[ActivationStream], None] | None = None,
    ) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.before_pass = before_pass

    def __iter__(self) -> Iterator[Any]:
        stream = self.dataset
        assert isinstance(stream, ActivationStream)
        if self.before_pass is not None:
            self.before_pass(stream)
        try:
            iterator = super().__iter__()
            if self.num_workers > 0:
                # The workers iterate copies: advance the epoch here, as iterating would.
                stream.seek(stream.epoch + 1, 0)
            yield from iterator
        except UserError as error:
            raise UserError(worker_message(str(error))) from None


def worker_message(text: str) -> str:
    """The original message of a ``UserError`` re-raised from a DataLoader worker, else ``text``."""
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    if text.startswith(f"Caught {UserError.__name__} in DataLoader worker") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def expand_paths(path: str | list[str]) -> list[Path]:
    """Paths of ``path`` (a path, a glob or a list of them), globs sorted; UserError if none."""
    patterns = [path] if isinstance(path, str) else list(path)
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"no activation file matches {pattern!r}")
        paths.extend(Path(match) for match in matches)
    if not paths:
        raise UserError("no activation file given: set data.path")
    return paths


def check_compatible(infos: list[ActivationFileInfo]) -> None:
    """All files must agree on d_in, d_out and whether they hold targets."""
    first = infos[0]
    for info in infos[1:]:
        if (info.d_in, info.d_out, info.has_targets) != (first.d_in, first.d_out, first.has_targets):
            raise UserError(
                f"{info.path} (d_in={info.d_in}, d_out={info.d_out}, targets={info.has_targets}) does not "
                f"match {first.path} (d_in={first.d_in}, d_out={first.d_out}, targets={first.has_targets})"
            )


def spread_sample(blocks: list[RowBlock], rows: int) -> list[RowBlock]:
    """Blocks spread evenly over ``blocks`` holding about ``rows`` rows in total (at least one)."""
    mean_rows = sum(block.rows for block in blocks) / len(blocks)
    count = min(len(blocks), max(1, round(rows / mean_rows)))
    return [blocks[i] for i in np.linspace(0, len(blocks) - 1, count).round().astype(int)]


def _scale(norms: np.ndarray, dim: int | None, name: str, varying: bool) -> float:
    """√dim / E‖x‖ from the sampled rows' norms. Rows of zero norm, or all identical (``varying``
    false), are refused: an SAE learns nothing from constant rows, and the FVU, whose denominator
    is their variance, would be infinite."""
    mean = float(norms.mean())
    if not mean > 0:
        raise UserError(f"'{name}' rows have zero norm on average: cannot scale them to E‖x‖ = √{dim}")
    if not varying:
        raise UserError(
            f"the {len(norms)} '{name}' rows sampled are all identical: an SAE cannot learn from constant data "
            "(the FVU divides by their variance, 0); was the file written with one row repeated?"
        )
    return float(np.sqrt(dim) / mean)
