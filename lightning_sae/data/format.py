"""The activation file: one HDF5 file per shard, the contract every reader and writer follows.

Layout (documented for users in ``data/README.md``):

- ``activations``  [N, d_in]  float16 or float32, chunked by rows. Required.
- ``targets``      [N, d_out] same dtype; present when the SAE maps X to a different Y
  (transcoders, crosscoders).
- ``token_ids``    [N] integer; the token each row was read at.
- root attributes  describe the source (``model``, ``layer``, ``site``, ...).
- group ``ground_truth``  synthetic data only: ``features`` [n_features, d_in] etc.
- root attribute ``committed_rows``: rows ``[0, committed_rows)`` are complete. A writer
  raises it only after the rows are flushed, so a reader never sees half-written rows. A file
  without the attribute (written by any other tool) is complete: all N rows count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lightning_sae.errors import UserError
from lightning_sae.files import SpaceGuardedFile

ACTIVATIONS = "activations"
TARGETS = "targets"
TOKEN_IDS = "token_ids"
GROUND_TRUTH = "ground_truth"
COMMITTED_ROWS = "committed_rows"
SUPPORTED_DTYPES = (np.dtype("float16"), np.dtype("float32"))


@dataclass(frozen=True)
class ActivationFileInfo:
    """What a reader needs to know about one activation file, read from its metadata only."""

    path: Path
    n_rows: int
    d_in: int
    d_out: int
    has_targets: bool
    chunk_rows: int
    dtype: np.dtype
    attrs: dict[str, Any] = field(default_factory=dict)


def committed_rows(file: h5py.File) -> int:
    """Number of complete rows: the ``committed_rows`` attribute, else every row."""
    n = file[ACTIVATIONS].shape[0]
    return int(file.attrs.get(COMMITTED_ROWS, n))


def open_for_writing(path: str | Path) -> WritableFile:
    """Open an existing activation file to append to it (see :class:`WritableFile`)."""
    return WritableFile(path, create=False)


def open_for_reading(path: str | Path) -> h5py.File:
    """Open an activation file read-only without HDF5's file lock, so that it can be read while a
    ``cache`` run still appends to it (rows up to ``committed_rows`` are complete). Every reader
    opens files this way: HDF5 refuses two opens of one file in a process with different lock
    settings. A file HDF5 cannot open is a ``UserError``."""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        raise UserError(f"cannot read {path} as HDF5 ({exc}); is the file truncated?") from exc


def read_info(path: str | Path) -> ActivationFileInfo:
    """Open ``path``, check it against the contract and describe it; raises ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"activation file not found: {path}")
    with open_for_reading(path) as file:
        if ACTIVATIONS not in file:
            raise UserError(f"{path} has no '{ACTIVATIONS}' dataset (found: {sorted(file.keys())})")
        acts = file[ACTIVATIONS]
        if acts.ndim != 2:
            raise UserError(f"{path}: '{ACTIVATIONS}' must be 2-D [rows, d_in], got shape {acts.shape}")
        if acts.dtype not in SUPPORTED_DTYPES:
            raise UserError(f"{path}: '{ACTIVATIONS}' has dtype {acts.dtype}; use float16 or float32")
        n_rows = committed_rows(file)
        if n_rows > acts.shape[0]:
            raise UserError(f"{path}: '{COMMITTED_ROWS}'={n_rows} exceeds the {acts.shape[0]} stored rows")
        if n_rows == 0:
            raise UserError(f"{path} holds no rows")
        d_out = acts.shape[1]
        has_targets = TARGETS in file
        if has_targets:
            targets = file[TARGETS]
            if targets.ndim != 2 or not _rows_match(targets.shape[0], acts.shape[0], n_rows, file):
                raise UserError(
                    f"{path}: '{TARGETS}' has shape {targets.shape} but '{ACTIVATIONS}' has "
                    f"{acts.shape}; both need the same number of rows"
                )
            if targets.dtype not in SUPPORTED_DTYPES:
                raise UserError(f"{path}: '{TARGETS}' has dtype {targets.dtype}; use float16 or float32")
            d_out = targets.shape[1]
        if TOKEN_IDS in file and not _rows_match(file[TOKEN_IDS].shape[0], acts.shape[0], n_rows, file):
            raise UserError(f"{path}: '{TOKEN_IDS}' length differs from '{ACTIVATIONS}' rows")
        chunk_rows = acts.chunks[0] if acts.chunks else min(n_rows, 4096)
        attrs = attributes(file)
        return ActivationFileInfo(
            path=path,
            n_rows=n_rows,
            d_in=acts.shape[1],
            d_out=d_out,
            has_targets=has_targets,
            chunk_rows=int(chunk_rows),
            dtype=acts.dtype,
            attrs=attrs,
        )


class WritableFile(h5py.File):
    """An activation file open for writing, through a :class:`~lightning_sae.files.SpaceGuardedFile`:
    the file is locked against other runs, and a full disk raises ``OSError`` from :meth:`flush`
    (HDF5 itself never sees the failure, so the file can still be closed)."""

    def __init__(self, path: str | Path, create: bool) -> None:
        self.guard = SpaceGuardedFile(Path(path), create)
        try:
            super().__init__(self.guard, "w" if create else "r+")
        except BaseException:
            self.guard.close()
            raise

    def flush(self) -> None:
        super().flush()
        self.guard.flush()
        self.guard.raise_if_failed()

    def close(self) -> None:
        super().close()
        self.guard.close()


def create(
    path: str | Path,
    d_in: int,
    d_out: int | None = None,
    dtype: str = "float32",
    chunk_rows: int = 4096,
    token_ids: bool = False,
    attrs: dict[str, Any] | None = None,
) -> h5py.File:
    """Create an empty, growable activation file (``targets`` when ``d_out`` is given)."""
    file = WritableFile(path, create=True)
    file.create_dataset(ACTIVATIONS, shape=(0, d_in), maxshape=(None, d_in), dtype=dtype, chunks=(chunk_rows, d_in))
    if d_out is not None:
        file.create_dataset(TARGETS, shape=(0, d_out), maxshape=(None, d_out), dtype=dtype, chunks=(chunk_rows, d_out))
    if token_ids:
        file.create_dataset(TOKEN_IDS, shape=(0,), maxshape=(None,), dtype="int64", chunks=(chunk_rows,))
    file.attrs[COMMITTED_ROWS] = 0
    for key, value in (attrs or {}).items():
        file.attrs[key] = value
    file.flush()
    return file


def append(
    file: h5py.File,
    activations: np.ndarray,
    targets: np.ndarray | None = None,
    token_ids: np.ndarray | None = None,
) -> int:
    """Append rows after the committed ones, flush, then commit them; returns the new row count.

    Rows past ``committed_rows`` left by an interrupted writer are overwritten.
    """
    start = committed_rows(file)
    stop = start + activations.shape[0]
    columns = [(ACTIVATIONS, activations), (TARGETS, targets), (TOKEN_IDS, token_ids)]
    for name, rows in columns:
        if (rows is None) != (name not in file):
            raise ValueError(f"append: '{name}' given={rows is not None} but file has it={name in file}")
        if rows is None:
            continue
        dataset = file[name]
        if dataset.shape[0] < stop:
            dataset.resize(stop, axis=0)
        dataset[start:stop] = rows
    file.flush()
    file.attrs[COMMITTED_ROWS] = stop
    file.flush()
    return stop


def _rows_match(rows: int, activation_rows: int, committed: int, file: h5py.File) -> bool:
    """A companion dataset covers the committed rows (ours) or all rows (a file without the attribute)."""
    return rows >= committed if COMMITTED_ROWS in file.attrs else rows == activation_rows


def attributes(file: h5py.File) -> dict[str, Any]:
    """The file's root attributes as plain Python values."""
    return {key: _plain(value) for key, value in file.attrs.items()}


def _plain(value: Any) -> Any:
    """HDF5 attribute value as a plain Python value (numpy scalars and bytes decoded)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
