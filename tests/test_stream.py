"""``ActivationStream``: blocks, shards, the shuffle buffer, exact skipping, bounded memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_sae.data import format, stream
from lightning_sae.data.stream import (
    ActivationStream,
    BlockSequence,
    RowBlock,
    RowBytes,
    all_finite,
    read_block,
    split_blocks,
)
from lightning_sae.errors import UserError


def make_stream(paths: list[Path], val_rows: int = 0, **kwargs: object) -> ActivationStream:
    """The training stream of ``paths`` (all rows but the last ``val_rows``)."""
    infos = [format.read_info(path) for path in paths]
    train, _ = split_blocks(infos, val_rows)
    return ActivationStream(infos, train, **kwargs)


def ids(batches: object) -> list[np.ndarray]:
    """Row ids (column 0 of ``id_file`` files) of each batch."""
    return [x[:, 0].numpy().astype(np.int64) for x, _ in batches]


def shard_ids(
    monkeypatch: pytest.MonkeyPatch, source: ActivationStream, rank: int, world: int, worker: int, workers: int
) -> list[np.ndarray]:
    """Batches of epoch 0 of ``source`` as worker ``worker`` of rank ``rank`` would yield them."""
    source.rank, source.world_size = rank, world
    source.seek(0, 0)
    info = SimpleNamespace(id=worker, num_workers=workers)
    monkeypatch.setattr(stream, "get_worker_info", lambda: info)
    return ids(source)


def test_block_sequence_slices_across_blocks() -> None:
    sequence = BlockSequence([RowBlock(0, 0, 10), RowBlock(0, 10, 16), RowBlock(1, 0, 5)])
    assert sequence.rows == 21
    assert sequence.slice(8, 13) == [RowBlock(0, 8, 10), RowBlock(0, 10, 13)]
    assert sequence.slice(15, 21) == [RowBlock(0, 15, 16), RowBlock(1, 0, 5)]
    assert sequence.slice(10, 16) == [RowBlock(0, 10, 16)]
    assert sequence.slice(4, 4) == []


def test_split_blocks_follows_chunks_and_cuts_validation_from_the_end(id_file: Callable[..., Path]) -> None:
    infos = [format.read_info(id_file("a.h5", 40, chunk_rows=16)), format.read_info(id_file("b.h5", 20, chunk_rows=16))]
    train, val = split_blocks(infos, 25)
    assert train == [RowBlock(0, 0, 16), RowBlock(0, 16, 32), RowBlock(0, 32, 35)]
    assert val == [RowBlock(0, 35, 40), RowBlock(1, 0, 16), RowBlock(1, 16, 20)]
    with pytest.raises(UserError, match="val_rows=60"):
        split_blocks(infos, 60)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(
    id_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, shuffle: bool, world: int, workers: int
) -> None:
    source = make_stream([id_file("a.h5", 300, chunk_rows=16)], batch_size=8, buffer_rows=40, shuffle=shuffle)
    shards = [shard_ids(monkeypatch, source, r, world, w, workers) for r in range(world) for w in range(workers)]
    source.num_workers = workers
    assert {len(batches) for batches in shards} == {len(source) // workers}  # every rank, every worker alike
    rows = np.concatenate([np.concatenate(batches) for batches in shards])
    assert all(len(batch) == 8 for batches in shards for batch in batches)
    assert len(set(rows)) == len(rows) == 300 - 300 % (world * workers * 8)


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 1)])
def test_validation_shards_keep_every_row(
    id_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, world: int, workers: int
) -> None:
    source = make_stream([id_file("a.h5", 100)], batch_size=8, shuffle=False, drop_last=False)
    shards = [shard_ids(monkeypatch, source, r, world, w, workers) for r in range(world) for w in range(workers)]
    assert len({len(batches) for batches in shards}) == 1
    assert sorted(np.concatenate([np.concatenate(batches) for batches in shards])) == list(range(100))


def test_unshuffled_batches_are_consecutive_rows_across_files(id_file: Callable[..., Path]) -> None:
    paths = [id_file("a.h5", 50, chunk_rows=16), id_file("b.h5", 30, chunk_rows=16, first_id=50)]
    batches = ids(make_stream(paths, val_rows=10, batch_size=12, shuffle=False))
    assert [batch.tolist() for batch in batches] == [list(range(i, i + 12)) for i in range(0, 60, 12)]


def test_each_epoch_is_shuffled_differently_and_reproducibly(id_file: Callable[..., Path]) -> None:
    path = id_file("a.h5", 128, chunk_rows=16)
    source = make_stream([path], batch_size=8, buffer_rows=64, seed=1)
    epochs = [np.concatenate(ids(source)) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(128))
    assert not np.array_equal(epochs[0], epochs[1])
    again = make_stream([path], batch_size=8, buffer_rows=64, seed=1)
    again.seek(1, 0)
    assert np.array_equal(np.concatenate(ids(again)), epochs[1])


def test_seek_skips_exactly_and_reads_nothing_of_skipped_windows(
    id_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_stream([id_file("a.h5", 256, chunk_rows=16)], batch_size=8, buffer_rows=64)
    full = ids(source)
    read: list[int] = []
    real_read = stream.OpenFiles.read
    monkeypatch.setattr(
        stream.OpenFiles,
        "read",
        lambda files, pieces, x, y: read.extend(p.rows for p in pieces) or real_read(files, pieces, x, y),
    )
    for skip in (0, 3, 8, 19, 32):
        read.clear()
        source.seek(0, skip)
        assert [batch.tolist() for batch in ids(source)] == [batch.tolist() for batch in full[skip:]]
        assert sum(read) == 256 - skip * 8 // 64 * 64  # whole 64-row windows are skipped unread


@pytest.mark.parametrize("skip", [0, 5, 6])
def test_seek_matches_the_round_robin_of_dataloader_workers(id_file: Callable[..., Path], skip: int) -> None:
    source = make_stream([id_file("a.h5", 200, chunk_rows=16)], batch_size=8, buffer_rows=32, num_workers=2)
    full = ids(DataLoader(source, batch_size=None, num_workers=2))
    source.seek(0, skip)
    assert [batch.tolist() for batch in ids(DataLoader(source, batch_size=None, num_workers=2))] == [
        batch.tolist() for batch in full[skip:]
    ]


def test_memory_is_bounded_by_the_buffer(id_file: Callable[..., Path]) -> None:
    source = make_stream([id_file("a.h5", 8192, d_in=64, chunk_rows=256)], batch_size=128, buffer_rows=1000)
    assert source.window_rows == 896  # rounded down to whole batches
    window_bytes = 896 * 64 * 4
    tracemalloc.start()  # sees numpy's allocations (the batches), not the windows' anonymous memory
    try:
        batches = sum(1 for _ in source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert batches == 64
    assert peak < 4 * 128 * 64 * 4  # a few batches at a time, not the 2 MiB file
    assert [x.nbytes for x, _ in source._spare_windows] == [window_bytes, window_bytes]
    kept = [x.ctypes.data for x, _ in source._spare_windows]
    assert sum(1 for _ in source) == 64
    assert [x.ctypes.data for x, _ in source._spare_windows] == kept  # the next pass reuses them


def test_two_passes_at_once_never_share_a_window(id_file: Callable[..., Path]) -> None:
    source = make_stream([id_file("a.h5", 256, chunk_rows=16)], batch_size=8, buffer_rows=32)
    alone = [ids(source), ids(source)]  # epochs 0 and 1, one after the other
    source.seek(0, 0)
    first, second = iter(source), iter(source)
    together = [(next(first), next(second)) for _ in range(32)]  # epochs 0 and 1 interleaved
    assert [batch.tolist() for batch in ids(pair[0] for pair in together)] == [batch.tolist() for batch in alone[0]]
    assert [batch.tolist() for batch in ids(pair[1] for pair in together)] == [batch.tolist() for batch in alone[1]]


def test_float16_stays_float16_and_targets_follow_their_rows(id_file: Callable[..., Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 3)).astype(np.float16), rng.standard_normal((64, 2)).astype(np.float16)
    x[:, 0] = y[:, 0] = np.arange(64)
    with format.create(tmp_path / "h.h5", d_in=3, d_out=2, dtype="float16", chunk_rows=16) as file:
        format.append(file, x, y)
    batch_x, batch_y = next(iter(make_stream([tmp_path / "h.h5"], batch_size=16, buffer_rows=32)))
    assert batch_x.dtype == batch_y.dtype == torch.float16
    assert torch.equal(batch_x[:, 0], batch_y[:, 0])


@pytest.mark.parametrize("name", [format.ACTIVATIONS, format.TARGETS])
def test_read_block_names_the_file_and_row_of_a_nan(id_file: Callable[..., Path], name: str) -> None:
    path = id_file("a.h5", 64, d_out=2)
    with h5py.File(path, "a") as file:
        file[name][41, 1] = np.inf
    with h5py.File(path, "r") as file, pytest.raises(UserError, match=rf"a.h5: '{name}' row 41 holds NaN or Inf"):
        read_block(file, RowBlock(0, 32, 48), with_targets=True)


@pytest.mark.parametrize("part_bytes", [stream.READ_PART_BYTES, 120])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bad_row", range(5, 128, 16))
@pytest.mark.parametrize("name", [format.ACTIVATIONS, format.TARGETS])
def test_a_nan_anywhere_in_a_pass_is_named_by_its_row(
    id_file: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    bad_row: int,
    shuffle: bool,
    part_bytes: int,
) -> None:
    # One bad row in each of the 8 blocks of 16 rows: shuffled, two blocks make the first window of
    # 32 rows, one read by the consuming thread and one by the reading thread. Parts of 120 bytes
    # (5 rows of 24 bytes) are read as whole blocks, one part each; by default a window is one part.
    monkeypatch.setattr(stream, "READ_PART_BYTES", part_bytes)
    path = id_file("a.h5", 128, d_out=2)
    with h5py.File(path, "a") as file:
        file[name][bad_row, 1] = np.nan
    with pytest.raises(UserError, match=rf"a.h5: '{name}' row {bad_row} holds NaN or Inf"):
        list(make_stream([path], batch_size=8, buffer_rows=32, shuffle=shuffle))


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_read_part_size_leaves_the_batches_alone(
    id_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, shuffle: bool
) -> None:
    path = id_file("a.h5", 200, d_out=2)
    whole = list(make_stream([path], batch_size=8, buffer_rows=48, shuffle=shuffle))
    monkeypatch.setattr(stream, "READ_PART_BYTES", 120)
    parts = list(make_stream([path], batch_size=8, buffer_rows=48, shuffle=shuffle))
    assert len(whole) == len(parts) == 200 // 8
    for (x1, y1), (x2, y2) in zip(whole, parts, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_whole_block_parts_group_pieces_in_order_without_splitting_one() -> None:
    pieces = [RowBlock(0, start, start + rows) for start, rows in ((0, 3), (10, 4), (20, 9), (40, 2), (50, 1))]
    parts = list(stream.whole_block_parts(pieces, 5))
    assert parts == [pieces[:2], pieces[2:3], pieces[3:]]
    assert list(stream.whole_block_parts(pieces, 1)) == [[piece] for piece in pieces]
    assert list(stream.whole_block_parts([], 5)) == []


def test_small_parts_still_read_whole_blocks(id_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # A compressed chunk read in two parts would be decompressed twice.
    monkeypatch.setattr(stream, "READ_PART_BYTES", 40)
    read: list[RowBlock] = []
    real_read = stream.OpenFiles.read
    monkeypatch.setattr(
        stream.OpenFiles, "read", lambda files, pieces, x, y: read.extend(pieces) or real_read(files, pieces, x, y)
    )
    list(make_stream([id_file("a.h5", 200)], batch_size=8, buffer_rows=48, shuffle=False))
    assert sum(piece.rows for piece in read) == 200
    assert all(piece.rows == 16 or piece.stop == 200 for piece in read)


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "column chunks", "gzip", "big-endian"])
def test_row_bytes_spans_hold_exactly_the_rows(tmp_path: Path, layout: str) -> None:
    rows = np.arange(60, dtype=np.float32).reshape(20, 3)
    options = {
        "contiguous": {},
        "chunked": {"chunks": (8, 3)},
        "column chunks": {"chunks": (8, 1)},
        "gzip": {"chunks": (8, 3), "compression": "gzip"},
        "big-endian": {"dtype": ">f4"},
    }[layout]
    with h5py.File(tmp_path / "f.h5", "w") as file:
        spans = RowBytes(file.create_dataset("activations", data=rows, **options)).spans(5, 13)
    if layout in ("column chunks", "gzip", "big-endian"):
        assert spans is None  # rows are not plain bytes there: h5py reads them
        return
    assert spans is not None
    data = (tmp_path / "f.h5").read_bytes()
    found = np.concatenate([np.frombuffer(data[offset : offset + rows * 12], np.float32) for offset, _, rows in spans])
    assert np.array_equal(found, rows[5:13].ravel())
    assert [(first, count) for _, first, count in spans] == [(5, 8)]  # neighbouring chunks are one read


@pytest.mark.parametrize("options", [{"compression": "gzip"}, {"chunks": (16, 1)}], ids=["gzip", "column chunks"])
def test_layouts_without_plain_bytes_stream_the_same_rows(
    id_file: Callable[..., Path], tmp_path: Path, options: dict[str, object]
) -> None:
    plain = id_file("plain.h5", 100, d_out=2)
    other = tmp_path / "other.h5"
    with h5py.File(plain, "r") as source, h5py.File(other, "w") as copy:
        for name, value in source.attrs.items():
            copy.attrs[name] = value
        for name in (format.ACTIVATIONS, format.TARGETS):
            copy.create_dataset(
                name,
                data=source[name][:],
                maxshape=(None, source[name].shape[1]),
                **{"chunks": (16, source[name].shape[1]), **options},
            )
    for shuffle in (True, False):
        first = make_stream([plain], batch_size=8, buffer_rows=32, shuffle=shuffle)
        second = make_stream([other], batch_size=8, buffer_rows=32, shuffle=shuffle)
        for (x1, y1), (x2, y2) in zip(first, second, strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_file_cut_short_while_streamed_is_one_clear_error(id_file: Callable[..., Path]) -> None:
    path = id_file("a.h5", 256, chunk_rows=16)
    with h5py.File(path, "r") as file:
        spans = RowBytes(file[format.ACTIVATIONS]).spans(192, 193)
    assert spans is not None
    batches = iter(make_stream([path], batch_size=8, buffer_rows=64, shuffle=False))
    next(batches)  # the file is open and its first windows are read
    with open(path, "r+b") as file:
        file.truncate(spans[0][0])
    with pytest.raises(UserError, match="a.h5: rows from 192 end early; is the file truncated"):
        list(batches)
    with pytest.raises(UserError, match="a.h5 as HDF5 .*is the file truncated"):
        list(make_stream([path], batch_size=8, buffer_rows=64))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_all_finite_sees_every_nan_and_inf(dtype: type) -> None:
    rows = np.full((3, 5), np.finfo(dtype).max, dtype=dtype)
    rows[0, 0] = np.finfo(dtype).smallest_subnormal
    assert all_finite(rows) and all_finite(rows[:0])
    for bad in (np.nan, np.inf, -np.inf):
        broken = rows.copy()
        broken[2, 4] = bad
        assert not all_finite(broken)


def test_batch_size_must_be_positive(id_file: Callable[..., Path]) -> None:
    with pytest.raises(UserError, match="batch_size"):
        make_stream([id_file("a.h5", 16)], batch_size=0)
