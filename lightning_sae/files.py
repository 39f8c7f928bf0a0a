"""Writes that never leave a half-written file under its final name, and the lock that says a file
is in use.

- :func:`written_atomically` / :func:`directory_written_atomically`: the caller writes to a
  temporary name beside the target; when it is complete it is renamed into place (a rename is
  atomic within one file system). An error on the way removes the temporary, so the target is
  either the old file or the whole new one.
- :class:`ReadLock`: the shared ``flock`` a reader holds on an activation file while it uses it.
  HDF5 holds an exclusive ``flock`` on a file open for writing, so :func:`held_exclusively`, which
  replacing a file goes through, fails while a ``fit`` reads it or a ``cache`` writes it.
- :class:`SpaceGuardedFile`: the file object HDF5 writers write through. HDF5 cannot close a file
  after a failed write (it crashes the interpreter at exit), so a full disk is recorded instead of
  reported to HDF5, and raised by :meth:`SpaceGuardedFile.raise_if_failed` after the writer's flush.
- :func:`out_of_space`: whether an error is a full disk (or a file-size limit), which writers turn
  into one line.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from lightning_sae.errors import UserError

T = TypeVar("T")

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""Disk full, file larger than the process may write, disk quota exceeded."""


def temporary_sibling(target: Path, role: str = "tmp") -> Path:
    """A hidden name beside ``target`` private to this process: ``.<name>.<pid>.<role>``."""
    return target.with_name(f".{target.name}.{os.getpid()}.{role}")


@contextmanager
def held_exclusively(path: Path, doing: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (when it exists) for the block.

    Raises:
        UserError: another process has the file open (a reader's :class:`ReadLock`, or HDF5's
            lock of a writer), naming what was to be done.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{path} is in use by another process (a run reading or writing it); "
                f"cannot {doing} it until that run ends"
            ) from None
        yield
    finally:
        os.close(descriptor)


def refuse_if_in_use(path: Path, doing: str) -> None:
    """Raise :class:`UserError` when another process has ``path`` open (see :func:`held_exclusively`)."""
    with held_exclusively(path, doing):
        pass


@contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; once the block has written it, flush it to disk
    and rename it to ``target`` (refused while ``target`` is in use). On any error, or when the
    rename is refused, the temporary is removed and ``target`` is untouched."""
    target = Path(target)
    temporary = temporary_sibling(target)
    try:
        yield temporary
        _fsync(temporary)
        with held_exclusively(target, "replace"):
            os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def directory_written_atomically(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; once the block has filled it, it
    replaces ``target`` whole (the old directory is removed after the swap). An existing
    ``target`` needs ``overwrite``; on error the temporary is removed and ``target`` untouched."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists; pass --overwrite true to replace it")
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        for path in temporary.iterdir():
            _fsync(path)
        if target.exists():
            old = temporary_sibling(target, "old")
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class ReadLock:
    """A shared ``flock`` on ``path`` while a reader uses it, so that replacing it is refused.

    While a writer holds the file (a ``cache`` still running: HDF5's exclusive lock), readers read
    its committed rows without a lock, and a background thread takes the shared lock as soon as
    the writer closes the file. A copy made by pickling (a spawned process) holds nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._descriptor: int | None = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            threading.Thread(target=_wait_for_shared_lock, args=(self._descriptor,), daemon=True).start()

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "_descriptor": None}


def _wait_for_shared_lock(descriptor: int) -> None:
    """Block until the shared lock is granted; a descriptor closed meanwhile ends the wait."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH)
    except OSError:
        pass


class SpaceGuardedFile(io.RawIOBase):
    """A binary file, open for reading and writing, that swallows out-of-space errors.

    The first such error is kept in :attr:`error`; later writes are discarded, so that the library
    writing through it (HDF5) stays consistent and can close the file. Other errors propagate. On
    open it takes an exclusive ``flock``: a file another run reads or writes is refused.
    """

    def __init__(self, path: Path, create: bool) -> None:
        super().__init__()
        self.path = Path(path)
        self._file = open(self.path, "w+b" if create else "r+b")  # noqa: SIM115 (closed by close())
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UserError(f"{self.path} is in use by another process (a run reading or writing it)") from None
        self.error: OSError | None = None

    def raise_if_failed(self) -> None:
        """Raise the out-of-space error met since the file was opened, if any."""
        if self.error is not None:
            raise OSError(self.error.errno, f"{self.error.strerror}: {self.path}")

    def _guarded(self, operation: Callable[[], T], discarded: T) -> T:
        if self.error is not None:
            return discarded
        try:
            return operation()
        except OSError as error:
            if not out_of_space(error):
                raise
            self.error = error
            return discarded

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return self._guarded(lambda: self._file.write(data), len(data))

    def truncate(self, size: int | None = None) -> int:
        return self._guarded(lambda: self._file.truncate(size), size or 0)

    def flush(self) -> None:
        if not self._file.closed:
            self._guarded(self._file.flush, None)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        return self._file.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
        super().close()


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, or HDF5's message carrying an errno) is a full disk."""
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
        return True
    codes = re.findall(r"errno = (\d+)", str(error))
    return any(int(code) in OUT_OF_SPACE_ERRNOS for code in codes) or "No space left" in str(error)


def _fsync(path: Path) -> None:
    """Flush a written file's data to the disk before it is renamed into place."""
    if path.is_file():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
