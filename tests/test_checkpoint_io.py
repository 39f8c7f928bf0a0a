"""Checkpoints are written whole or not at all, and a bad checkpoint file is one clear error."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from lightning_sae.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from lightning_sae.errors import UserError


def checkpoint_of(rows: int) -> dict[str, object]:
    return {"state_dict": {"W": torch.randn(rows, 64)}, "global_step": rows}


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint_of(8), target)

    def half_then_full(path: Path, data: bytes) -> None:
        with path.open("wb") as file:
            file.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(UserError, match=f"cannot write the checkpoint {target}: No space left on device"):
        io.save_checkpoint(checkpoint_of(1024), target)
    assert read_checkpoint(target)["global_step"] == 8, "the previous checkpoint of that name is intact"
    assert [path.name for path in target.parent.iterdir()] == ["last.ckpt"], "no partial file is left"


def test_a_written_checkpoint_loads_back(tmp_path: Path) -> None:
    checkpoint = checkpoint_of(4)
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "a" / "x.ckpt")
    saved = read_checkpoint(tmp_path / "a" / "x.ckpt")
    torch.testing.assert_close(saved["state_dict"]["W"], checkpoint["state_dict"]["W"])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "checkpoint not found"),
        ("directory", "is a directory, not a checkpoint file"),
        ("empty", "it is truncated or not a checkpoint"),
        ("truncated", "it is truncated or not a checkpoint"),
        ("garbage", "it is truncated or not a checkpoint"),
        ("tensor", "is not a Lightning checkpoint"),
    ],
)
def test_a_bad_checkpoint_file_is_a_user_error(kind: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    torch.save(checkpoint_of(64), tmp_path / "good.ckpt")
    whole = (tmp_path / "good.ckpt").read_bytes()
    if kind == "directory":
        path.mkdir()
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind != "missing":
        path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "garbage": b"\x93 not a zip"}[kind])
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)
