"""Two CPU processes over gloo: disjoint shards, equal batch counts, and a ``fit`` that does not hang.

The ranks are forked from the test process (no interpreter start-up; spawned where it has
initialised CUDA) and killed if they outlive ``TIMEOUT_S``, so a DDP hang fails the test instead
of stalling the suite.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning import Callback, LightningModule, Trainer

from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder

WORLD = 2
TIMEOUT_S = {"fork": 60, "spawn": 180}
"""Seconds the ranks may take: spawned ranks start a fresh interpreter (18 s of a two-rank fit on a
16-core GPU host, and over 60 s once the suite's earlier tests have left compile workers running)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target: Callable[..., None], *args: Any) -> None:
    """Run ``target(rank, port, *args)`` in WORLD child processes; fail if one errs or they hang.

    Forked (fast) unless this process has initialised CUDA, which a forked child cannot use.
    """
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    context = mp.start_processes(target, (free_port(), *args), nprocs=WORLD, join=False, start_method=start_method)
    deadline = time.monotonic() + TIMEOUT_S[start_method]
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S[start_method]} s: DDP hang")


def iterate_rank(rank: int, port: int, path: Path, num_workers: int, out: Path) -> None:
    """One rank: one epoch of training and validation row ids, saved to ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        datamodule = ActivationDataModule(str(path), batch_size=8, val_rows=50, buffer_rows=32, num_workers=num_workers)
        datamodule.setup("fit")
        train = [x[:, 0].numpy() for x, _ in datamodule.train_dataloader()]
        val = [x[:, 0].numpy() for x, _ in datamodule.val_dataloader()]
        np.savez(
            out / f"rank{rank}.npz", train=np.stack(train), val=np.concatenate(val), length=len(datamodule.train_stream)
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_read_disjoint_rows_in_equal_batch_counts(
    id_file: Callable[..., Path], tmp_path: Path, num_workers: int
) -> None:
    path = id_file("a.h5", 450)  # 400 training rows, 50 validation rows
    run_ranks(iterate_rank, path, num_workers, tmp_path)
    ranks = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(WORLD)]
    shards = WORLD * max(1, num_workers)
    batches = 400 // (shards * 8) * max(1, num_workers)
    assert [rank["train"].shape for rank in ranks] == [(batches, 8)] * WORLD
    assert [int(rank["length"]) for rank in ranks] == [batches] * WORLD
    train = np.concatenate([rank["train"].ravel() for rank in ranks])
    assert len(set(train)) == len(train) == 400 - 400 % (shards * 8)  # the equalisation remainder
    assert set(train) <= set(range(400))
    assert sorted(np.concatenate([rank["val"] for rank in ranks])) == list(range(400, 450))


class RecordBatches(Callback):
    """Row ids of every training batch of this rank."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.ids.append(batch[0][:, 0].numpy().copy())


def fit_rank(rank: int, port: int, path: Path, num_workers: int, out: Path) -> None:
    """One rank of a Lightning DDP fit: this process plays the launched process of rank ``rank``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    datamodule = ActivationDataModule(str(path), batch_size=8, val_rows=50, buffer_rows=32, num_workers=num_workers)
    model = SparseAutoencoder(d_in=4, d_sae=8, input_scale=datamodule.input_scale)
    recorder = RecordBatches()
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=30,  # an epoch of 24 batches (2 workers × 12), a validation pass, 6 batches more
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule=datamodule)
    np.save(out / f"rank{rank}.npy", np.stack(recorder.ids))


def test_a_two_process_fit_finishes_on_disjoint_batches(id_file: Callable[..., Path], tmp_path: Path) -> None:
    path = id_file("a.h5", 450)
    run_ranks(fit_rank, path, 2, tmp_path)
    ranks = [np.load(tmp_path / f"rank{rank}.npy") for rank in range(WORLD)]
    assert [rank.shape for rank in ranks] == [(30, 8)] * WORLD
    first_epoch = np.concatenate([rank[:24].ravel() for rank in ranks])
    assert len(set(first_epoch)) == len(first_epoch) == 384
