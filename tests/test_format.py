"""The activation file contract: validation of foreign files, committed rows, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from lightning_sae.data import format
from lightning_sae.errors import UserError


def test_a_plain_h5py_file_with_only_activations_is_valid(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    path = write_raw(tmp_path / "plain.h5", activations=np.ones((10, 4), np.float16))
    info = format.read_info(path)
    assert (info.n_rows, info.d_in, info.d_out, info.has_targets) == (10, 4, 4, False)


def test_rows_past_committed_rows_are_invisible(tmp_path: Path) -> None:
    with format.create(tmp_path / "f.h5", d_in=3, chunk_rows=4) as file:
        format.append(file, np.ones((5, 3), np.float32))
        file[format.ACTIVATIONS].resize(9, axis=0)  # a writer died after growing the dataset
    assert format.read_info(tmp_path / "f.h5").n_rows == 5


def test_append_overwrites_uncommitted_rows_and_commits_after_writing(tmp_path: Path) -> None:
    with format.create(tmp_path / "f.h5", d_in=2, d_out=1, chunk_rows=2, token_ids=True) as file:
        format.append(file, np.zeros((3, 2), np.float32), np.zeros((3, 1), np.float32), np.arange(3))
        file[format.ACTIVATIONS].resize(6, axis=0)
        file[format.ACTIVATIONS][3:6] = 7.0
        assert format.append(file, np.ones((2, 2), np.float32), np.ones((2, 1), np.float32), np.arange(2)) == 5
        assert file[format.ACTIVATIONS][3:5].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    info = format.read_info(tmp_path / "f.h5")
    assert (info.n_rows, info.d_out, info.has_targets) == (5, 1, True)


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ({"other": np.ones((3, 2), np.float32)}, "no 'activations'"),
        ({"activations": np.ones(3, np.float32)}, "must be 2-D"),
        ({"activations": np.ones((3, 2), np.int32)}, "dtype"),
        ({"activations": np.ones((3, 2), np.float32), "targets": np.ones((2, 2), np.float32)}, "same number of rows"),
        ({"activations": np.ones((0, 2), np.float32)}, "no rows"),
    ],
)
def test_malformed_files_get_one_clear_message(
    tmp_path: Path, write_raw: Callable[..., Path], datasets: dict, message: str
) -> None:
    path = write_raw(tmp_path / "bad.h5", **datasets)
    with pytest.raises(UserError, match=message):
        format.read_info(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        format.read_info(tmp_path / "absent.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="cannot read"):
        format.read_info(tmp_path / "junk.h5")


def test_truncated_file_is_reported(tmp_path: Path, toy_file: Path) -> None:
    data = toy_file.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="cut.h5"):
        format.read_info(tmp_path / "cut.h5")


def test_attributes_come_back_as_plain_values(tmp_path: Path, write_raw: Callable[..., Path]) -> None:
    path = write_raw(tmp_path / "a.h5", activations=np.ones((2, 2), np.float32))
    with h5py.File(path, "a") as file:
        file.attrs["model"] = "tiny"
        file.attrs["layer"] = np.int64(3)
    assert format.read_info(path).attrs == {"model": "tiny", "layer": 3}
