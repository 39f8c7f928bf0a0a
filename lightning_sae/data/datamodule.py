"""``ActivationDataModule``: activation files → shuffled training and validation batches.

The files' dimensions and the input scaling constant are read at construction, so LightningCLI
can link them into the model (``d_in``, ``d_out``, ``input_scale``, ``target_scale``) and
nobody types them twice.
"""

from __future__ import annotations

import glob
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from lightning_sae.data.format import ACTIVATIONS, GROUND_TRUTH, TARGETS, ActivationFileInfo, read_info
from lightning_sae.data.stream import ActivationStream, RowBlock, read_block, split_blocks
from lightning_sae.errors import UserError


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
            buffer_rows: Rows in the shuffle buffer of each data-loading worker.
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
        the training data.
        """
        with_targets = self.d_out is not None
        sample = spread_sample(self.train_blocks, self.scale_sample_rows)
        x_norms: list[np.ndarray] = []
        y_norms: list[np.ndarray] = []
        files = {index: h5py.File(self.paths[index], "r") for index in {block.file for block in sample}}
        try:
            for block in sample:
                x, y = read_block(files[block.file], block, with_targets)
                x_norms.append(np.linalg.norm(x.astype(np.float64), axis=1))
                if y is not None:
                    y_norms.append(np.linalg.norm(y.astype(np.float64), axis=1))
        finally:
            for file in files.values():
                file.close()
        input_scale = _scale(np.concatenate(x_norms), self.d_in, ACTIVATIONS)
        target_scale = _scale(np.concatenate(y_norms), self.d_out, TARGETS) if with_targets else input_scale
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
        with h5py.File(self.paths[0], "r") as file:
            if GROUND_TRUTH not in file:
                return None
            return {name: dataset[()] for name, dataset in file[GROUND_TRUTH].items()}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the first file's source attributes (model, layer, site, ...)."""
        return {"source": self.infos[0].attrs}

    def setup(self, stage: str) -> None:
        self.train_stream = self._stream(self.train_blocks, shuffle=self.shuffle, drop_last=True)
        self.val_stream = self._stream(self.val_blocks, shuffle=False, drop_last=False)

    def _stream(self, blocks: list[RowBlock], shuffle: bool, drop_last: bool) -> ActivationStream:
        return ActivationStream(
            self.paths,
            blocks,
            batch_size=self.batch_size,
            with_targets=self.d_out is not None,
            shuffle=shuffle,
            buffer_rows=self.buffer_rows,
            seed=self.seed,
            num_workers=self.num_workers,
            drop_last=drop_last,
        )

    def _loader(self, stream: ActivationStream) -> DataLoader:
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_stream)


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


def _scale(norms: np.ndarray, dim: int | None, name: str) -> float:
    mean = float(norms.mean())
    if not mean > 0:
        raise UserError(f"'{name}' rows have zero norm on average: cannot scale them to E‖x‖ = √{dim}")
    return float(np.sqrt(dim) / mean)
