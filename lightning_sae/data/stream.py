"""``ActivationStream``: batches of rows streamed from HDF5 files through a shuffle buffer.

Files are cut into :class:`RowBlock` s (one HDF5 chunk each, so a block is one contiguous read).
Each epoch the blocks are permuted (seeded by ``seed`` and the epoch) and dealt round-robin to
every (rank, worker) pair, so ranks and workers read disjoint rows and their union covers the
data once. A worker reads its blocks into a buffer of about ``buffer_rows`` rows, permutes the
buffer, and cuts whole batches from it: memory stays bounded by the buffer.

Each pass over the stream is one epoch: the epoch counter advances at every ``iter()``, in the
main process or in each (persistent) worker alike, so all of them agree on the permutation.

Every rank yields the same number of batches (DDP would hang otherwise): worker w of every rank
yields min over ranks r of ⌊rows(r, w) / batch_size⌋ batches, which each rank computes alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lightning_sae.data.format import ACTIVATIONS, TARGETS, ActivationFileInfo
from lightning_sae.errors import UserError


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, stop)`` of file number ``file``: the unit of reading."""

    file: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_blocks(infos: list[ActivationFileInfo], val_rows: int) -> tuple[list[RowBlock], list[RowBlock]]:
    """Chunk-aligned blocks of all files, split into (train, validation).

    Validation takes the last ``val_rows`` rows (counting back from the end of the last file),
    so the two never overlap.
    """
    total = sum(info.n_rows for info in infos)
    if not 0 <= val_rows < total:
        raise UserError(f"val_rows={val_rows} must be at least 0 and below the {total} rows of the data")
    train: list[RowBlock] = []
    val: list[RowBlock] = []
    seen = 0
    for index, info in enumerate(infos):
        for start in range(0, info.n_rows, info.chunk_rows):
            stop = min(start + info.chunk_rows, info.n_rows)
            boundary = total - val_rows - seen
            if stop <= boundary:
                train.append(RowBlock(index, start, stop))
            elif start >= boundary:
                val.append(RowBlock(index, start, stop))
            else:
                train.append(RowBlock(index, start, boundary))
                val.append(RowBlock(index, boundary, stop))
        seen += info.n_rows
    return train, val


def read_block(file: h5py.File, block: RowBlock, with_targets: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of one block (activations, targets or None), checked to be finite."""
    x = file[ACTIVATIONS][block.start : block.stop]
    y = file[TARGETS][block.start : block.stop] if with_targets else None
    for name, rows in ((ACTIVATIONS, x), (TARGETS, y)):
        if rows is not None and not np.isfinite(rows).all():
            bad = block.start + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise UserError(f"{file.filename}: '{name}' row {bad} holds NaN or Inf; clean or re-cache the file")
    return x, y


def distributed_position() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ActivationStream(IterableDataset):
    """Yields ``(x, y)`` batches (``y is x`` without targets) in the files' stored dtype."""

    def __init__(
        self,
        paths: list[Path],
        blocks: list[RowBlock],
        batch_size: int,
        with_targets: bool,
        shuffle: bool = True,
        buffer_rows: int = 262_144,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        self.paths = paths
        self.blocks = blocks
        self.batch_size = batch_size
        self.with_targets = with_targets
        self.shuffle = shuffle
        self.buffer_rows = max(buffer_rows, batch_size)
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.epoch = 0

    def block_order(self, epoch: int) -> list[RowBlock]:
        """Epoch ``epoch``'s order of all blocks (the same on every rank and worker)."""
        if not self.shuffle:
            return list(self.blocks)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [self.blocks[i] for i in torch.randperm(len(self.blocks), generator=generator).tolist()]

    def shard(self, order: list[RowBlock], rank: int, world: int, worker: int, workers: int) -> list[RowBlock]:
        """The blocks that (rank, worker) reads: every ``world·workers``-th block of ``order``."""
        return order[rank * workers + worker :: world * workers]

    def batches_per_worker(self, order: list[RowBlock], world: int, workers: int, worker: int) -> int:
        """Batches worker ``worker`` yields on every rank: the minimum over ranks."""
        counts = []
        for rank in range(world):
            rows = sum(block.rows for block in self.shard(order, rank, world, worker, workers))
            counts.append(rows // self.batch_size if self.drop_last or world > 1 else math.ceil(rows / self.batch_size))
        return min(counts)

    def __len__(self) -> int:
        order = self.block_order(self.epoch)
        _, world = distributed_position()
        workers = max(1, self.num_workers)
        return sum(self.batches_per_worker(order, world, workers, w) for w in range(workers))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rank, world = distributed_position()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch
        self.epoch += 1
        order = self.block_order(epoch)
        n_batches = self.batches_per_worker(order, world, workers, worker)
        blocks = self.shard(order, rank, world, worker, workers)
        rng = np.random.default_rng((self.seed, epoch, rank, worker))
        batches = self._batches(blocks, rng)
        for _ in range(n_batches):
            yield next(batches)

    def _batches(self, blocks: list[RowBlock], rng: np.random.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        files: dict[int, h5py.File] = {}
        try:
            pending_x: list[np.ndarray] = []
            pending_y: list[np.ndarray] = []
            pending_rows = 0
            for position, block in enumerate(blocks):
                if block.file not in files:
                    files[block.file] = h5py.File(self.paths[block.file], "r")
                x, y = read_block(files[block.file], block, self.with_targets)
                pending_x.append(x)
                pending_y.append(y if y is not None else x)
                pending_rows += block.rows
                last = position == len(blocks) - 1
                if pending_rows < self.buffer_rows and not last:
                    continue
                buffer_x = np.concatenate(pending_x)
                buffer_y = np.concatenate(pending_y) if self.with_targets else buffer_x
                if self.shuffle:
                    permutation = rng.permutation(len(buffer_x))
                    buffer_x = buffer_x[permutation]
                    buffer_y = buffer_y[permutation] if self.with_targets else buffer_x
                n_full = len(buffer_x) // self.batch_size * self.batch_size
                end = len(buffer_x) if last else n_full
                for start in range(0, end, self.batch_size):
                    x_batch = torch.from_numpy(buffer_x[start : start + self.batch_size])
                    y_batch = torch.from_numpy(buffer_y[start : start + self.batch_size]) if self.with_targets else x_batch
                    yield x_batch, y_batch
                pending_x, pending_y = [buffer_x[end:]], [buffer_y[end:]]
                pending_rows = len(buffer_x) - end
        finally:
            for file in files.values():
                file.close()
