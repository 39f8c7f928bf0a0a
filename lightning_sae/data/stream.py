"""``ActivationStream``: batches of rows streamed from HDF5 files through a shuffle buffer.

Files are cut into :class:`RowBlock` s (one HDF5 chunk each, so a block is one contiguous read).
Each epoch the blocks are permuted (seeded by ``seed`` and the epoch; file order when shuffling is
off) and the concatenated rows are cut into equal contiguous shards, one per (rank, worker) pair:
ranks and workers read disjoint rows and their union covers the data once.

A shard is read in windows of ``buffer_rows`` rows (rounded down to whole batches) straight into
preallocated buffers; the window's rows are permuted (seeded by seed, epoch, shard and window;
kept in order without shuffling) and cut into batches by one gather (or slice copy) each, while a
background thread reads the next window into a second buffer. Rows are read with ``os.preadv``
from the bytes HDF5 stored them in, which releases the GIL (h5py's own read holds it and would
stop the gather), falling back to h5py for compressed or column-chunked data. Memory stays bounded
by the two buffers (per worker, kept from pass to pass), a resumed run skips whole windows without
reading them, and when shuffling the kernel is asked to fetch the window after next from the disk.

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
import mmap
import os
import threading
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

READ_PART_BYTES = 4 * 2**20
"""Window rows are read and checked for NaN and Inf in parts of at least this size (whole blocks):
checked right after its read, a part is still in the CPU's cache (checking a whole window after
reading it reads it from memory again, 1.5× slower here)."""

Window = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
"""A window read into its buffer: activations, targets (or None) and its batch order (None unshuffled)."""


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
    """Whether no value of the 2-D array ``rows`` is NaN or ±Inf.

    NaN and ±Inf make the sum of all values non-finite, so a finite sum (one pass, no temporary
    array: 1.3× faster than ``isfinite().all()``) settles it; a non-finite one may also be an
    overflow of finite values and is settled value by value. numpy computes float16 ufuncs one
    converted value at a time (slower than the read itself), so float16 is tested on its exponent
    bits: all ones means NaN or Inf.
    """
    if rows.dtype == np.float16:
        return bool(np.bitwise_and(rows.view(np.uint16), 0x7C00).max(initial=0) != 0x7C00)
    return bool(np.isfinite(np.einsum("ij->", rows))) or bool(np.isfinite(rows).all())


def whole_block_parts(pieces: list[RowBlock], rows: int) -> Iterator[list[RowBlock]]:
    """``pieces`` in consecutive groups of at least ``rows`` rows (the last may hold fewer), none
    split: a piece is (part of) one chunk, and a compressed chunk read in two parts is decompressed
    twice."""
    part: list[RowBlock] = []
    size = 0
    for piece in pieces:
        part.append(piece)
        size += piece.rows
        if size >= rows:
            yield part
            part, size = [], 0
    if part:
        yield part


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


def huge_page_array(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in anonymous memory advised to use transparent huge pages
    (``MADV_HUGEPAGE``; a no-op where the kernel has none): one fault per 2 MiB, not per 4 KiB."""
    size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    memory = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def gather(rows: np.ndarray, chosen: np.ndarray | slice) -> np.ndarray:
    """A new array of ``rows[chosen]``: a gather for shuffled positions, one copy for a slice."""
    return np.take(rows, chosen, axis=0) if isinstance(chosen, np.ndarray) else rows[chosen].copy()


class RowBytes:
    """Where the rows of one dataset lie in its file, when they lie there as plain bytes.

    True of an unfiltered dataset stored contiguously or in chunks of whole rows, in the
    machine's byte order, in a file on HDF5's default (sec2) driver: rows ``[a, b)`` of a chunk
    are then ``(b − a)·row_bytes`` consecutive bytes. Chunk addresses are looked up once each.
    """

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset
        self.row_bytes = dataset.shape[1] * dataset.dtype.itemsize
        self.chunk_rows = dataset.chunks[0] if dataset.chunks is not None else None
        self.plain = (
            dataset.file.driver == "sec2"
            and dataset.id.get_create_plist().get_nfilters() == 0
            and dataset.dtype.isnative
            and (dataset.chunks is None or dataset.chunks[1] == dataset.shape[1])
        )
        self.chunk_offsets: dict[int, int | None] = {}

    def spans(self, start: int, stop: int) -> list[tuple[int, int, int]] | None:
        """``(byte offset, first row, rows)`` of each stretch of rows ``[start, stop)`` that is one run
        of bytes in the file (neighbouring chunks merged), or None where the layout is not plain
        or some chunk is not yet written."""
        if not self.plain:
            return None
        if self.chunk_rows is None:
            offset = self._offset(0)
            return None if offset is None else [(offset + start * self.row_bytes, start, stop - start)]
        spans: list[tuple[int, int, int]] = []
        for chunk_start in range(start - start % self.chunk_rows, stop, self.chunk_rows):
            offset = self._offset(chunk_start)
            if offset is None:
                return None
            first, last = max(start, chunk_start), min(stop, chunk_start + self.chunk_rows)
            offset += (first - chunk_start) * self.row_bytes
            if spans and spans[-1][0] + spans[-1][2] * self.row_bytes == offset:
                spans[-1] = (spans[-1][0], spans[-1][1], spans[-1][2] + last - first)
            else:
                spans.append((offset, first, last - first))
        return spans

    def _offset(self, chunk_start: int) -> int | None:
        """Byte offset of the chunk starting at row ``chunk_start`` (of the data when contiguous)."""
        if chunk_start not in self.chunk_offsets:
            if self.chunk_rows is None:
                self.chunk_offsets[chunk_start] = self.dataset.id.get_offset()
            else:
                info = self.dataset.id.get_chunk_info_by_coord((chunk_start, 0))
                self.chunk_offsets[chunk_start] = info.byte_offset
        return self.chunk_offsets[chunk_start]


def pread_into(descriptor: int, spans: list[tuple[int, int, int]], row_bytes: int, out: np.ndarray, path: Path) -> None:
    """Read ``spans`` (from :meth:`RowBytes.spans`, rows in order) one after another into ``out``.

    ``os.preadv`` copies from the page cache (or the disk) straight into ``out`` without the GIL.
    """
    flat = out.reshape(-1).view(np.uint8)
    position = 0
    for offset, first_row, rows in spans:
        view = memoryview(flat[position : position + rows * row_bytes])
        while len(view):
            done = os.preadv(descriptor, [view], offset)
            if done == 0:
                raise UserError(f"{path}: rows from {first_row} end early; is the file truncated?")
            view, offset = view[done:], offset + done
        position += rows * row_bytes


class OpenFiles:
    """The files one pass reads, opened on first use by the process that iterates (a worker), by
    whichever of its threads needs one first (two read a pass's first window)."""

    def __init__(self, paths: list[Path], with_targets: bool) -> None:
        self.paths = paths
        self.names = (ACTIVATIONS, TARGETS) if with_targets else (ACTIVATIONS,)
        self.files: dict[int, h5py.File] = {}
        self.descriptors: dict[int, int] = {}
        self.layouts: dict[int, list[RowBytes]] = {}
        self.opening = threading.Lock()

    def layouts_of(self, index: int) -> list[RowBytes]:
        """Where ``activations`` (and ``targets``) of file ``index`` lie, looked up once: a lookup
        costs a fifth of a 4 MiB read."""
        with self.opening:
            if index not in self.layouts:
                self.files[index] = open_for_reading(self.paths[index])
                self.descriptors[index] = os.open(self.paths[index], os.O_RDONLY)
                self.layouts[index] = [RowBytes(self.files[index][name]) for name in self.names]
            return self.layouts[index]

    def read(self, pieces: list[RowBlock], x: np.ndarray, y: np.ndarray | None) -> None:
        """Read ``pieces`` one after another into ``x`` (and ``y``), with ``os.preadv`` where the
        layout allows, else with h5py. Not checked for NaN or Inf (the caller checks its batches)."""
        outputs = (x,) if y is None else (x, y)
        position = 0
        for piece in pieces:
            for layout, out in zip(self.layouts_of(piece.file), outputs, strict=True):
                rows = out[position : position + piece.rows]
                spans = layout.spans(piece.start, piece.stop)
                if spans is None:
                    read_into(layout.dataset, piece, rows, check_finite=False)
                else:
                    pread_into(self.descriptors[piece.file], spans, layout.row_bytes, rows, self.paths[piece.file])
            position += piece.rows

    def read_ahead(self, pieces: list[RowBlock]) -> None:
        """Ask the kernel to start reading ``pieces`` from the disk (``posix_fadvise`` WILLNEED).
        Only where the bytes of the rows are known; elsewhere the kernel's read-ahead is left to
        itself."""
        for piece in pieces:
            for layout in self.layouts_of(piece.file):
                for offset, _, rows in layout.spans(piece.start, piece.stop) or []:
                    os.posix_fadvise(
                        self.descriptors[piece.file], offset, rows * layout.row_bytes, os.POSIX_FADV_WILLNEED
                    )

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        for descriptor in self.descriptors.values():
            os.close(descriptor)


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
        self._spare_windows: list[tuple[np.ndarray, np.ndarray | None]] = []

    def __getstate__(self) -> dict[str, object]:
        """What a worker process gets: everything but the window buffers (it allocates its own)."""
        return {**self.__dict__, "_spare_windows": []}

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
            yield from self._window_batches(rows, files, epoch, shard, skip)
        finally:
            files.close()

    def _window_batches(
        self, rows: BlockSequence, files: OpenFiles, epoch: int, shard: int, skip: int
    ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches of ``rows`` window by window (rows permuted within each window when shuffling),
        after the first ``skip`` batches.

        Two window buffers alternate: while one is cut into batches, a background thread reads the
        next window into the other (``os.preadv`` and numpy's gather release the GIL, so they
        overlap on two cores). When shuffling, the first window, which nothing else overlaps, is read
        half by each thread (in file order two threads reading one run of rows made the disk read
        slower here: 2.9–5.0M against 5.0–6.4M rows/s), and the kernel is asked to fetch the window
        after next from the disk: its blocks are out of file order, which the kernel's own
        read-ahead cannot guess (in file order the hint only gets in its way: 1.0M against 1.8M
        rows/s here). The reading thread also checks each window for NaN and Inf and draws its
        batch order, off the thread that cuts the batches: every row of a window reaches some
        batch. Each batch is a fresh array (the trainer may still hold the previous one when the
        buffer is refilled). The buffers are kept for the next pass: first touching fresh memory is
        slower than reading it from the page cache.
        """
        first_window = skip * self.batch_size // self.window_rows
        starts = list(range(first_window * self.window_rows, rows.rows, self.window_rows))
        if not starts:
            return
        buffers = self._take_windows(min(self.window_rows, rows.rows))

        def read_ahead(window_start: int) -> None:
            if self.shuffle:
                files.read_ahead(rows.slice(window_start, window_start + self.window_rows))

        def window_buffer(index: int) -> tuple[np.ndarray, np.ndarray | None]:
            """The buffer rows (activations, targets or None) that window ``index`` fills."""
            n = min(self.window_rows, rows.rows - starts[index])
            buffer_x, buffer_y = buffers[index % 2]
            return buffer_x[:n], buffer_y[:n] if buffer_y is not None else None

        def read_rows(index: int, first: int, stop: int) -> None:
            """Rows ``[first, stop)`` of window ``index`` into its buffer, checked finite part by part
            while each part is still in the CPU's cache. Reading from the window's first row on, it
            first asks the kernel for the next window."""
            window_start = starts[index]
            if first == 0:
                read_ahead(window_start + self.window_rows)
            x, y = window_buffer(index)
            part_rows = max(1, READ_PART_BYTES // (x[0].nbytes + (0 if y is None else y[0].nbytes)))
            start = first
            for pieces in whole_block_parts(rows.slice(window_start + first, window_start + stop), part_rows):
                end = start + sum(piece.rows for piece in pieces)
                landed = {ACTIVATIONS: x[start:end], TARGETS: None if y is None else y[start:end]}
                files.read(pieces, landed[ACTIVATIONS], landed[TARGETS])
                for name, values in landed.items():
                    if values is not None and not all_finite(values):
                        bad = rows.slice(window_start + start + first_not_finite(values), rows.rows)[0]
                        raise not_finite_error(self.paths[bad.file], name, bad.start)
                start = end

        def read_window(index: int, first: int = 0) -> Window:
            """Window ``index`` from its row ``first`` on read into its buffer; the whole window and
            its batch order (drawn here, off the thread that cuts the batches)."""
            x, y = window_buffer(index)
            read_rows(index, first, len(x))
            seed = (self.seed, epoch, shard, starts[index] // self.window_rows)
            order = np.random.default_rng(seed).permutation(len(x)) if self.shuffle else None
            return x, y, order

        read_ahead(starts[0])
        try:
            with ThreadPoolExecutor(max_workers=1) as reader:
                half = len(window_buffer(0)[0]) // 2 if self.shuffle else 0
                pending = reader.submit(read_window, 0, half)
                if half:
                    read_rows(0, 0, half)
                for index, window_start in enumerate(starts):
                    x, y, order = pending.result()
                    if index + 1 < len(starts):
                        pending = reader.submit(read_window, index + 1)
                    n = len(x)
                    first = max(skip * self.batch_size - window_start, 0)
                    for batch_start in range(first, n, self.batch_size):
                        batch_stop = min(batch_start + self.batch_size, n)
                        chosen = order[batch_start:batch_stop] if order is not None else slice(batch_start, batch_stop)
                        batch_x, batch_y = gather(x, chosen), None if y is None else gather(y, chosen)
                        yield self._tensors(batch_x, batch_y)
        finally:
            self._spare_windows = buffers

    def _take_windows(self, rows: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Two window buffers of at least ``rows`` rows: the last pass's when it left them, else new
        ones. A pass owns them until it ends, so two passes at once never share one."""
        buffers, self._spare_windows = self._spare_windows, []
        if len(buffers) == 2 and len(buffers[0][0]) >= rows:
            return buffers
        return [self._window_buffer(rows), self._window_buffer(rows)]

    def _window_buffer(self, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Empty (activations, targets or None) arrays of ``rows`` rows in the first file's dtype,
        on transparent huge pages where the kernel offers them (first touch is then 2× faster)."""
        x = huge_page_array((rows, self.widths[0]), self.dtype)
        return x, huge_page_array((rows, self.widths[1]), self.dtype) if self.with_targets else None

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray | None) -> tuple[Tensor, Tensor | None]:
        return torch.from_numpy(x), None if y is None else torch.from_numpy(y)
