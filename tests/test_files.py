"""Atomic writes, the in-use lock and full-disk detection of ``lightning_sae.files``."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from lightning_sae.errors import UserError
from lightning_sae.files import (
    ReadLock,
    directory_written_atomically,
    out_of_space,
    refuse_if_in_use,
    written_atomically,
)

HOLD_OPEN_FOR_WRITING = """
import sys, time, h5py
file = h5py.File(sys.argv[1], "r+")
print("open", flush=True)
time.sleep(float(sys.argv[2]))
file.close()
"""


def _h5(path: Path) -> Path:
    with h5py.File(path, "w") as file:
        file["x"] = np.arange(4.0)
    return path


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), written_atomically(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_a_complete_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with written_atomically(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def test_a_file_a_reader_holds_is_not_replaced(tmp_path: Path) -> None:
    target = _h5(tmp_path / "f.h5")
    lock = ReadLock(target)
    with pytest.raises(UserError, match="in use"), written_atomically(target) as temporary:
        temporary.write_text("new")
    with h5py.File(target, "r", locking=False) as file:
        assert file["x"][:].tolist() == [0.0, 1.0, 2.0, 3.0]
    lock.release()
    refuse_if_in_use(target, "overwrite")


def test_a_directory_is_replaced_whole_and_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "sae"
    with directory_written_atomically(target, overwrite=False) as temporary:
        (temporary / "a").write_text("1")
        (temporary / "stale").write_text("1")
    with pytest.raises(UserError, match="exists"), directory_written_atomically(target, overwrite=False):
        pass
    with pytest.raises(RuntimeError), directory_written_atomically(target, overwrite=True) as temporary:
        (temporary / "a").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["a", "stale"]
    with directory_written_atomically(target, overwrite=True) as temporary:
        (temporary / "a").write_text("2")
    assert [(p.name, p.read_text()) for p in target.iterdir()] == [("a", "2")]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_a_reader_of_a_file_being_written_takes_its_lock_when_the_writer_closes(tmp_path: Path) -> None:
    target = _h5(tmp_path / "f.h5")
    writer = subprocess.Popen([sys.executable, "-c", HOLD_OPEN_FOR_WRITING, str(target), "1.5"], stdout=subprocess.PIPE)
    assert writer.stdout is not None and writer.stdout.readline().strip() == b"open"
    with pytest.raises(UserError, match="in use"):
        refuse_if_in_use(target, "overwrite")
    lock = ReadLock(target)
    writer.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            refuse_if_in_use(target, "overwrite")
        except UserError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the reader never took its lock after the writer closed the file")
    lock.release()
    refuse_if_in_use(target, "overwrite")


def test_out_of_space_recognises_a_full_disk_and_hdf5_messages() -> None:
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EFBIG, "File too large"))
    assert out_of_space(OSError("Can't write data (file write failed: errno = 28, error message = '...')"))
    assert not out_of_space(OSError(errno.ENOENT, "No such file"))
