"""Checkpoint files: written whole or not at all, and read with a one-line error when they cannot be.

- :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` writing each checkpoint to a
  temporary name beside its target, flushed to disk and then renamed
  (:func:`~lightning_sae.files.written_atomically`). Lightning's own local write goes through an
  fsspec "transaction" that writes to the system's temporary folder and then moves the file,
  copying it into place when that folder is on another disk: a disk that fills up during the copy
  leaves a truncated checkpoint under its final name. ``lightning_sae fit`` installs this plugin
  unless the config names another ``CheckpointIO``.
- :func:`read_checkpoint`: a checkpoint's contents, or a :class:`UserError` when the file is
  missing, truncated or not a checkpoint.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sae.errors import UserError
from lightning_sae.files import written_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoints appear under their name only when complete."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Serialise ``checkpoint`` in memory (as Lightning does), then write it atomically to ``path``.

        Remote paths (``s3://``, ...) and ``storage_options`` go to Lightning's implementation.

        Raises:
            UserError: the file cannot be written (disk full, read-only folder); nothing is left
                under ``path`` but the previous checkpoint of that name, if any.
        """
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with written_atomically(target) as temporary:
                temporary.write_bytes(buffer.getbuffer())
        except OSError as error:
            raise UserError(
                f"cannot write the checkpoint {target}: {error.strerror or error}; nothing incomplete was kept "
                "under its name: free space (or make the folder writable), then resume from the run's last "
                "checkpoint with --ckpt_path"
            ) from error


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of the checkpoint file ``path``, on the CPU (tensors and plain types only).

    Raises:
        UserError: the file is missing, a directory, unreadable (truncated, another format), or
            not a Lightning checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"{path} is a directory, not a checkpoint file: give a .ckpt file written by 'lightning_sae fit'"
        )
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on a file that then fails to load
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a bad file: EOFError, UnpicklingError, ...
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise UserError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {reason}): it is truncated or not a "
            "checkpoint written by 'lightning_sae fit'; use another checkpoint of the run"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint (it holds no state_dict)")
    return checkpoint
