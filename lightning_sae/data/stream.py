"""``ActivationStream``: batches of rows streamed from HDF5 files through a shuffle buffer.

Files are cut into :class:`RowBlock` s (one HDF5 chunk each, so a block is one contiguous read).
Each epoch the blocks are permuted (seeded by ``seed`` and the epoch; file order when shuffling is
off) and the concatenated rows are cut into equal contiguous shards, one per (rank, worker) pair:
ranks and workers read disjoint rows and their union covers the data once.

A shard is read in windows of ``buffer_rows`` rows (rounded down to whole batches) straight into
preallocated buffers; the window's rows are permuted (seeded by seed, epoch, shard and window)
and cut into batches by one gather each, while a background thread reads the next window into a
second buffer. Memory stays bounded by the two buffers (per worker), a resumed run skips whole
windows without reading them, and the kernel is asked to fetch the window after next from the
disk. Without shuffling, each batch is read straight
from the file and no buffer is kept.

Every shard yields the same number of batches, so every rank does (DDP would hang otherwise).
Training (``drop_last``) shards hold ``n·batch_size`` rows each with n = ⌊rows / (shards·batch_size)⌋:
the last ``rows mod (shards·batch_size)`` rows of each epoch's block order are left out, fewer than
``world_size·num_workers·batch_size`` rows, different ones every epoch when shuffling. Validation
shards split the rows evenly and each yields ⌈⌊rows / shards⌋ / batch_size⌉ batches, the last one
short; only when ⌊rows / shards⌋ is a multiple of batch_size do shards holding one row more leave
that row out.

Each pass over the stream is one epoch: ``iter()`` yields epoch ``epoch`` and advances it.
:meth:`ActivationStream.seek` sets the next epoch and the batches of it already consumed, before
the DataLoader copies the stream into its workers (``datamodule.StreamLoader``).
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from lightning_sae.data.format import ACTIVATIONS, TARGETS, ActivationFileInfo, open_for_reading
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


class BlockSequence:
    """Blocks read one after another, addressed by row position in their concatenation."""

    def __init__(self, blocks: list[RowBlock]) -> None:
        self.blocks = blocks
        self.ends = list(itertools.accumulate(block.rows for block in blocks))

    @property
    def rows(self) -> int:
        return self.ends[-1] if self.ends else 0

    def slice(self, start: int, stop: int) -> list[RowBlock]:
        """Rows ``[start, stop)`` of the concatenation, as blocks clipped to that range."""
        pieces: list[RowBlock] = []
        index = bisect.bisect_right(self.ends, start)
        while index < len(self.blocks) and start < stop:
            block = self.blocks[index]
            offset = self.ends[index] - block.rows
            piece_stop = min(stop, self.ends[index])
            pieces.append(RowBlock(block.file, block.start + start - offset, block.start + piece_stop - offset))
            start = piece_stop
            index += 1
        return pieces


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


def read_into(dataset: h5py.Dataset, block: RowBlock, out: np.ndarray, check_finite: bool = True) -> None:
    """Read ``block``'s rows of ``dataset`` straight into ``out``, checked finite unless told not to.

    Reading into the caller's array (one copy, no temporary) keeps the shuffle buffer the only
    large allocation. Errors name the file and the row, since they may surface far from here.
    """
    name = dataset.name.lstrip("/")
    try:
        dataset.read_direct(out, source_sel=np.s_[block.start : block.stop])
    except OSError as exc:
        raise UserError(
            f"{dataset.file.filename}: cannot read '{name}' rows {block.start}-{block.stop} ({exc}); "
            "is the file truncated or corrupted?"
        ) from exc
    if check_finite and not all_finite(out):
        raise not_finite_error(dataset.file.filename, name, block.start + first_not_finite(out))


def first_not_finite(rows: np.ndarray) -> int:
    """Index of the first row of ``rows`` holding NaN or ±Inf."""
    return int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])


def not_finite_error(path: str | Path, name: str, row: int) -> UserError:
    """The error for a NaN or Inf in row ``row`` of dataset ``name`` of ``path``."""
    return UserError(f"{path}: '{name}' row {row} holds NaN or Inf; clean or re-cache the file")


def all_finite(rows: np.ndarray) -> bool:
    """Whether no value of ``rows`` is NaN or ±Inf.

    numpy computes float16 ufuncs one converted value at a time (slower than the read itself), so
    float16 is tested on its exponent bits: all ones means NaN or Inf.
    """
    if rows.dtype == np.float16:
        return bool(np.bitwise_and(rows.view(np.uint16), 0x7C00).max(initial=0) != 0x7C00)
    return bool(np.isfinite(rows).all())


def read_block(file: h5py.File, block: RowBlock, with_targets: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of one block (activations, targets or None) in new arrays, checked to be finite."""
    arrays: list[np.ndarray] = []
    for name in (ACTIVATIONS, TARGETS) if with_targets else (ACTIVATIONS,):
        dataset = file[name]
        out = np.empty((block.rows, dataset.shape[1]), dtype=dataset.dtype)
        read_into(dataset, block, out)
        arrays.append(out)
    return arrays[0], arrays[1] if with_targets else None


def distributed_position() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OpenFiles:
    """The files one pass reads, opened on first use by the process that iterates (a worker)."""

    def __init__(self, paths: list[Path], with_targets: bool) -> None:
        self.paths = paths
        self.names = (ACTIVATIONS, TARGETS) if with_targets else (ACTIVATIONS,)
        self.files: dict[int, h5py.File] = {}
        self.opened: dict[int, list[h5py.Dataset]] = {}

    def datasets(self, index: int) -> list[h5py.Dataset]:
        """``activations`` (and ``targets``) of file ``index``, looked up once: a lookup costs a
        fifth of a 4 MiB read."""
        if index not in self.opened:
            self.files[index] = open_for_reading(self.paths[index])
            self.opened[index] = [self.files[index][name] for name in self.names]
        return self.opened[index]

    def read(self, pieces: list[RowBlock], x: np.ndarray, y: np.ndarray | None, check_finite: bool = True) -> None:
        """Read ``pieces`` one after another into ``x`` (and ``y``)."""
        position = 0
        for piece in pieces:
            datasets = self.datasets(piece.file)
            read_into(datasets[0], piece, x[position : position + piece.rows], check_finite)
            if y is not None:
                read_into(datasets[1], piece, y[position : position + piece.rows], check_finite)
            position += piece.rows

    def read_ahead(self, pieces: list[RowBlock]) -> None:
        """Ask the kernel to start reading ``pieces`` from the disk (``posix_fadvise`` WILLNEED).

        Only a hint: files not on the default (sec2) driver and layouts without a simple byte
        range per block are left to the kernel's own read-ahead.
        """
        for piece in pieces:
            datasets = self.datasets(piece.file)
            file = self.files[piece.file]
            if file.driver != "sec2":
                continue
            descriptor = file.id.get_vfd_handle()
            for dataset in datasets:
                for offset, size in byte_ranges(dataset, piece):
                    os.posix_fadvise(descriptor, offset, size, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for file in self.files.values():
            file.close()


def byte_ranges(dataset: h5py.Dataset, block: RowBlock) -> Iterator[tuple[int, int]]:
    """(offset, size) in the file of the bytes holding ``block``'s rows of ``dataset``.

    Known for a contiguous dataset and for chunks spanning whole rows; none otherwise.
    """
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        if offset is not None:
            row_bytes = dataset.shape[1] * dataset.dtype.itemsize
            yield offset + block.start * row_bytes, block.rows * row_bytes
    elif dataset.chunks[1] == dataset.shape[1]:
        chunk_rows = dataset.chunks[0]
        for start in range(block.start - block.start % chunk_rows, block.stop, chunk_rows):
            info = dataset.id.get_chunk_info_by_coord((start, 0))
            if info.byte_offset is not None:
                yield info.byte_offset, info.size


class ActivationStream(IterableDataset):
    """Yields ``(x, y)`` batches (``y`` None without targets) in the files' stored dtype.

    The rank and world size are read at construction (after the process group is up, in the
    datamodule's ``setup``), so workers need no process group of their own.
    """

    def __init__(
        self,
        infos: list[ActivationFileInfo],
        blocks: list[RowBlock],
        batch_size: int,
        shuffle: bool = True,
        buffer_rows: int = 262_144,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        self.paths = [info.path for info in infos]
        self.with_targets = infos[0].has_targets
        self.widths = (infos[0].d_in, infos[0].d_out)
        self.dtype = infos[0].dtype
        self.blocks = blocks
        self.rows = sum(block.rows for block in blocks)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.window_rows = max(buffer_rows // batch_size, 1) * batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.rank, self.world_size = distributed_position()
        self.epoch = 0
        self.skip = 0

    def seek(self, epoch: int, batches: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` without its first ``batches`` batches.

        ``batches`` counts what the DataLoader handed out, all workers together.
        """
        self.epoch, self.skip = epoch, batches

    def block_order(self, epoch: int) -> BlockSequence:
        """Epoch ``epoch``'s order of all blocks (the same on every rank and worker)."""
        if not self.shuffle:
            return BlockSequence(list(self.blocks))
        permutation = np.random.default_rng((self.seed, epoch)).permutation(len(self.blocks))
        return BlockSequence([self.blocks[i] for i in permutation])

    def batches_per_shard(self, shards: int) -> int:
        """Batches each of ``shards`` shards yields (the same for all, so ranks stay in step)."""
        if self.drop_last:
            return self.rows // (shards * self.batch_size)
        return (self.rows // shards + self.batch_size - 1) // self.batch_size

    def shard_rows(self, shard: int, shards: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of the epoch's block order that shard ``shard`` yields."""
        batches = self.batches_per_shard(shards)
        if self.drop_last:
            return shard * batches * self.batch_size, (shard + 1) * batches * self.batch_size
        start = shard * self.rows // shards
        return start, min((shard + 1) * self.rows // shards, start + batches * self.batch_size)

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        return workers * self.batches_per_shard(self.world_size * workers)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, consumed = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        # The DataLoader takes batches from its workers round-robin starting at worker 0, and every
        # worker yields as many, so worker w had handed out ⌈(consumed − w) / workers⌉ of them.
        # Resuming, the worker next in line must come first: worker w plays worker (w + consumed)'s
        # part this epoch.
        role = (worker + consumed) % workers
        skip = max(0, -(-(consumed - role) // workers))
        shards = self.world_size * workers
        shard = self.rank * workers + role
        start, stop = self.shard_rows(shard, shards)
        rows = BlockSequence(self.block_order(epoch).slice(start, stop))
        files = OpenFiles(self.paths, self.with_targets)
        try:
            if self.shuffle:
                yield from self._shuffled_batches(rows, files, epoch, shard, skip)
            else:
                for batch_start in range(skip * self.batch_size, rows.rows, self.batch_size):
                    n = min(self.batch_size, rows.rows - batch_start)
                    x, y = self._buffers(n)
                    files.read(rows.slice(batch_start, batch_start + n), x, y)
                    yield self._tensors(x, y)
        finally:
            files.close()

    def _shuffled_batches(
        self, rows: BlockSequence, files: OpenFiles, epoch: int, shard: int, skip: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``rows`` shuffled window by window, after the first ``skip`` batches.

        Two window buffers alternate: while one is cut into batches, a background thread reads the
        next window into the other (HDF5's copy and numpy's gather release the GIL, so they overlap
        on two cores), and the kernel is asked to fetch the window after that from the disk:
        blocks come in random order, which its own read-ahead cannot guess. The reading thread is
        the slower one, so the NaN/Inf check runs on each gathered batch instead.
        """
        size = min(self.window_rows, rows.rows)
        buffers = [self._buffers(size), self._buffers(size)]
        first_window = skip * self.batch_size // self.window_rows
        starts = list(range(first_window * self.window_rows, rows.rows, self.window_rows))

        def read_window(index: int) -> tuple[np.ndarray, np.ndarray | None]:
            window_start = starts[index]
            files.read_ahead(rows.slice(window_start + self.window_rows, window_start + 2 * self.window_rows))
            n = min(self.window_rows, rows.rows - window_start)
            buffer_x, buffer_y = buffers[index % 2]
            x, y = buffer_x[:n], buffer_y[:n] if buffer_y is not None else None
            files.read(rows.slice(window_start, window_start + n), x, y, check_finite=False)
            return x, y

        if not starts:
            return
        files.read_ahead(rows.slice(starts[0], starts[0] + self.window_rows))
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(read_window, 0)
            for index, window_start in enumerate(starts):
                x, y = pending.result()
                if index + 1 < len(starts):
                    pending = reader.submit(read_window, index + 1)
                n = len(x)
                window = window_start // self.window_rows
                permutation = np.random.default_rng((self.seed, epoch, shard, window)).permutation(n)
                first = max(skip * self.batch_size - window_start, 0)
                for batch_start in range(first, n, self.batch_size):
                    positions = permutation[batch_start : batch_start + self.batch_size]
                    batch_x = np.take(x, positions, axis=0)
                    batch_y = np.take(y, positions, axis=0) if y is not None else None
                    for name, batch in ((ACTIVATIONS, batch_x), (TARGETS, batch_y)):
                        if batch is not None and not all_finite(batch):
                            position = window_start + int(positions[first_not_finite(batch)])
                            bad = rows.slice(position, position + 1)[0]
                            raise not_finite_error(self.paths[bad.file], name, bad.start)
                    yield self._tensors(batch_x, batch_y)

    def _buffers(self, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Empty (activations, targets or None) arrays of ``rows`` rows in the first file's dtype."""
        x = np.empty((rows, self.widths[0]), dtype=self.dtype)
        return x, np.empty((rows, self.widths[1]), dtype=self.dtype) if self.with_targets else None

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray | None) -> tuple[Tensor, Tensor | None]:
        return torch.from_numpy(x), None if y is None else torch.from_numpy(y)
