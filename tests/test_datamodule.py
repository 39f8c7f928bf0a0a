"""``ActivationDataModule``: splits, shuffling, the scale estimate, clear errors, and exact resume."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae.data import format
from lightning_sae.data.datamodule import ActivationDataModule, worker_message
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder


def batch_ids(loader: Any) -> list[np.ndarray]:
    """Row ids (column 0 of ``id_file`` files) of every batch ``loader`` yields."""
    return [x[:, 0].numpy().astype(np.int64) for x, _ in loader]


def fit_module(path: Path, **kwargs: Any) -> ActivationDataModule:
    datamodule = ActivationDataModule(str(path), **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_validation_rows_are_the_last_rows_and_never_trained_on(id_file: Callable[..., Path]) -> None:
    first = id_file("a.h5", 100, chunk_rows=16)
    second = id_file("b.h5", 60, chunk_rows=16, first_id=100)
    datamodule = ActivationDataModule([str(first), str(second)], batch_size=8, val_rows=70, buffer_rows=32)
    datamodule.setup("fit")
    train = np.concatenate(batch_ids(datamodule.train_dataloader()))
    val = np.concatenate(batch_ids(datamodule.val_dataloader()))
    assert sorted(val) == list(range(90, 160))  # spans both files
    assert len(set(train)) == len(train) == 88  # 90 training rows, cut to whole batches
    assert set(train) <= set(range(90))


def test_shuffling_is_seeded_per_epoch_and_can_be_switched_off(id_file: Callable[..., Path]) -> None:
    path = id_file("a.h5", 256, chunk_rows=16)
    shuffled = fit_module(path, batch_size=16, val_rows=0, buffer_rows=64, seed=3)
    epoch_0, epoch_1 = batch_ids(shuffled.train_dataloader()), batch_ids(shuffled.train_dataloader())
    assert sorted(np.concatenate(epoch_0)) == sorted(np.concatenate(epoch_1)) == list(range(256))
    assert not np.array_equal(np.concatenate(epoch_0), np.concatenate(epoch_1))
    again = fit_module(path, batch_size=16, val_rows=0, buffer_rows=64, seed=3)
    assert np.array_equal(np.concatenate(batch_ids(again.train_stream)), np.concatenate(epoch_0))
    ordered = fit_module(path, batch_size=16, val_rows=0, shuffle=False)
    assert np.array_equal(np.concatenate(batch_ids(ordered.train_dataloader())), np.arange(256))


def open_files() -> int:
    """HDF5 files (or objects of them) open in this process."""
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE | h5py.h5f.OBJ_DATASET))


def test_files_are_open_only_while_a_pass_reads_them(id_file: Callable[..., Path]) -> None:
    datamodule = fit_module(id_file("a.h5", 128), batch_size=8, val_rows=8)
    assert datamodule.input_scale > 0 and open_files() == 0  # nothing left open to fork into workers
    batches = iter(datamodule.train_dataloader())
    next(batches)
    assert open_files() > 0
    del batches
    assert open_files() == 0


def test_batches_keep_the_stored_dtype_and_pair_targets_with_their_rows(id_file: Callable[..., Path]) -> None:
    path = id_file("t.h5", 64, d_out=3)
    with h5py.File(path, "a") as file:
        for name in (format.ACTIVATIONS, format.TARGETS):
            values = file[name][()]
            del file[name]
            file.create_dataset(name, data=values.astype(np.float16), chunks=(16, values.shape[1]))
    datamodule = fit_module(path, batch_size=8, val_rows=8)
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.dtype == y.dtype == torch.float16 and (x.shape, y.shape) == ((8, 4), (8, 3))
    assert torch.equal(x[:, 0], y[:, 0])


def test_float16_rows_reach_a_bf16_mixed_step_as_float16(
    tmp_path: Path, callback_trainer: Callable[..., Trainer]
) -> None:
    rows = np.random.default_rng(0).standard_normal((512, 8)).astype(np.float16)
    with format.create(tmp_path / "h.h5", d_in=8, dtype="float16", chunk_rows=64) as file:
        format.append(file, rows)
    datamodule = ActivationDataModule(str(tmp_path / "h.h5"), batch_size=64, val_rows=64)
    datamodule.setup("fit")

    class SeenBatches(Callback):
        def __init__(self) -> None:
            self.dtypes: list[torch.dtype] = []

        def on_train_batch_start(self, trainer: Trainer, module: LightningModule, batch: Any, batch_idx: int) -> None:
            self.dtypes.append(batch[0].dtype)

    model = SparseAutoencoder(d_in=8, d_sae=16, input_scale=datamodule.input_scale)
    before = model.W_dec.detach().clone()
    seen = SeenBatches()
    callback_trainer(3, [seen], precision="bf16-mixed").fit(model, datamodule=datamodule)
    assert seen.dtypes == [torch.float16] * 3  # no float32 copy of a batch on the host: it widens on the device
    assert model.W_dec.dtype == torch.float32 and torch.isfinite(model.W_dec).all()
    assert not torch.equal(model.W_dec, before)


def test_scale_is_estimated_on_training_rows_only_and_deterministically(id_file: Callable[..., Path]) -> None:
    path = id_file("s.h5", 512, d_in=6, d_out=3, chunk_rows=32)
    with h5py.File(path, "a") as file:
        file[format.ACTIVATIONS][:, 0] = 0.0  # drop the ids: plain Gaussian rows
        file[format.TARGETS][:, 0] = 0.0
        file[format.ACTIVATIONS][448:] *= 1000  # validation rows, which must not count
    whole = ActivationDataModule(str(path), val_rows=64, scale_sample_rows=10_000)
    with h5py.File(path, "r") as file:
        x, y = file[format.ACTIVATIONS][:448].astype(np.float64), file[format.TARGETS][:448].astype(np.float64)
    assert whole.input_scale == pytest.approx(np.sqrt(6) / np.linalg.norm(x, axis=1).mean(), rel=1e-12)
    assert whole.target_scale == pytest.approx(np.sqrt(3) / np.linalg.norm(y, axis=1).mean(), rel=1e-12)
    sampled = [ActivationDataModule(str(path), val_rows=64, scale_sample_rows=96).scales for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0][0] == pytest.approx(whole.input_scale, rel=0.15)


def test_without_targets_the_target_scale_is_none(id_file: Callable[..., Path]) -> None:
    datamodule = ActivationDataModule(str(id_file("a.h5", 64)), val_rows=8)
    assert (datamodule.d_out, datamodule.target_scale) == (None, None)
    assert datamodule.scales[1] == datamodule.input_scale


def test_constant_rows_are_refused_since_an_sae_cannot_learn_them_nor_its_fvu_be_defined(
    tmp_path: Path, write_raw: Callable[..., Path]
) -> None:
    row = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
    constant = write_raw(tmp_path / "constant.h5", activations=np.tile(row, (256, 1)))
    with pytest.raises(UserError, match="the 224 'activations' rows sampled are all identical"):
        _ = ActivationDataModule(str(constant), val_rows=32).scales
    x = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    constant_targets = write_raw(tmp_path / "targets.h5", activations=x, targets=np.tile(row[:3], (256, 1)))
    with pytest.raises(UserError, match="'targets' rows sampled are all identical"):
        _ = ActivationDataModule(str(constant_targets), val_rows=32).scales


def corrupt_chunk(path: Path) -> None:
    """Overwrite the bytes of chunk 1 of a gzip-compressed ``activations``: the header still reads."""
    with h5py.File(path, "r") as file:
        chunk = file[format.ACTIVATIONS].id.get_chunk_info(1)
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ({"activations": np.ones(40, np.float32)}, "must be 2-D"),
        ({"activations": np.ones((40, 2), np.float32), "targets": np.ones((39, 2), np.float32)}, "same number of rows"),
    ],
)
def test_malformed_files_fail_at_construction(
    tmp_path: Path, write_raw: Callable[..., Path], datasets: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        ActivationDataModule(str(write_raw(tmp_path / "bad.h5", **datasets)))


def test_truncated_and_mismatched_files_fail_at_construction(id_file: Callable[..., Path], tmp_path: Path) -> None:
    path = id_file("a.h5", 64)
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.h5.*truncated"):
        ActivationDataModule(str(tmp_path / "cut.h5"))
    other = id_file("wide.h5", 64, d_in=5)
    with pytest.raises(UserError, match="does not match"):
        ActivationDataModule([str(path), str(other)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_nan_row_fails_with_one_clear_message_even_from_a_worker(
    id_file: Callable[..., Path], num_workers: int
) -> None:
    path = id_file("nan.h5", 128)
    with h5py.File(path, "a") as file:
        file[format.ACTIVATIONS][77, 2] = np.nan
    datamodule = fit_module(path, batch_size=8, val_rows=8, num_workers=num_workers)
    with pytest.raises(UserError) as caught:
        batch_ids(datamodule.train_dataloader())
    assert str(caught.value) == f"{path}: 'activations' row 77 holds NaN or Inf; clean or re-cache the file"
    # torch takes 10 s to shut failed workers down (a worker error in any IterableDataset does
    # this): collect them here rather than in a later test, and test no other worker error.
    del caught
    gc.collect()


def test_a_corrupt_chunk_fails_with_a_clear_message(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    with h5py.File(tmp_path / "gz.h5", "w") as file:
        file.create_dataset(format.ACTIVATIONS, data=x, chunks=(16, 4), compression="gzip")
    corrupt_chunk(tmp_path / "gz.h5")
    datamodule = fit_module(tmp_path / "gz.h5", batch_size=8, val_rows=8, shuffle=False)
    with pytest.raises(UserError, match=r"^\S*gz.h5: cannot read 'activations' rows 16-32 \(.*corrupted\?$"):
        batch_ids(datamodule.train_dataloader())


def test_worker_message_leaves_other_messages_alone() -> None:
    assert worker_message("val_rows=9 must be below 8") == "val_rows=9 must be below 8"


def test_too_few_rows_for_the_shards_is_a_user_error(id_file: Callable[..., Path]) -> None:
    datamodule = ActivationDataModule(str(id_file("a.h5", 64)), batch_size=40, val_rows=32)
    with pytest.raises(UserError, match="32 training rows make no batch of batch_size=40"):
        datamodule.setup("fit")
    datamodule = ActivationDataModule(str(id_file("b.h5", 64)), batch_size=8, val_rows=1, num_workers=2)
    with pytest.raises(UserError, match=r"val_rows=1 leaves no validation row for each of 1 device\(s\) × 2 worker"):
        datamodule.setup("validate")


# ------------------------------------------------------------------------------------------ resume
class RecordBatches(Callback):
    """Keeps the row ids of every training batch, in order."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.ids.append(batch[0][:, 0].long().tolist())


def train(
    path: Path, root: Path, max_steps: int, num_workers: int, ckpt_path: Path | None = None
) -> tuple[RecordBatches, SparseAutoencoder]:
    """Fit a tiny SAE for ``max_steps`` steps, checkpointing every 7 steps and at each epoch's end."""
    torch.manual_seed(0)
    datamodule = ActivationDataModule(str(path), batch_size=32, val_rows=8, buffer_rows=64, num_workers=num_workers)
    model = SparseAutoencoder(d_in=4, d_sae=8, lr=1e-2, input_scale=datamodule.input_scale)
    recorder = RecordBatches()
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[
            recorder,
            ModelCheckpoint(root / "steps", "{step}", every_n_train_steps=7, save_top_k=-1),
            ModelCheckpoint(root / "epochs", "{epoch}", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True),
        ],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return recorder, model


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_training_sees_the_same_batches_and_ends_with_the_same_weights(
    id_file: Callable[..., Path], tmp_path: Path, num_workers: int
) -> None:
    path = id_file("a.h5", 480)  # 472 training rows: 14 batches of 32 per epoch, 24 rows left out
    straight, final = train(path, tmp_path / "straight", 32, num_workers)
    assert len(straight.ids) == 32
    epoch_0 = [row for batch in straight.ids[:14] for row in batch]
    epoch_1 = [row for batch in straight.ids[14:28] for row in batch]
    assert len(set(epoch_0)) == len(set(epoch_1)) == 448 and set(epoch_0 + epoch_1) <= set(range(472))
    assert epoch_0 != epoch_1
    # step=21: 7 batches into epoch 1 (an odd count, uneven over two workers); step=14: saved after the
    # last batch of epoch 0; epoch=0: saved at the end of epoch 0.
    for checkpoint, done in (("steps/step=21", 21), ("steps/step=14", 14), ("epochs/epoch=0", 14)):
        checkpoint_path = tmp_path / "straight" / f"{checkpoint}.ckpt"
        saved = torch.load(checkpoint_path, weights_only=True)[ActivationDataModule.__qualname__]
        assert saved["source"] == {"committed_rows": 480}
        resumed, model = train(path, tmp_path / checkpoint, 32, num_workers, ckpt_path=checkpoint_path)
        assert resumed.ids == straight.ids[done:], checkpoint
        for name, value in final.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), (checkpoint, name)


def test_a_checkpoint_from_another_data_layout_restarts_its_epoch(id_file: Callable[..., Path], tmp_path: Path) -> None:
    path = id_file("a.h5", 480)
    train(path, tmp_path / "two_workers", 7, num_workers=2)
    with pytest.warns(UserWarning, match="restarts from its first batch"):
        resumed, _ = train(path, tmp_path / "resumed", 12, 0, ckpt_path=tmp_path / "two_workers/steps/step=7.ckpt")
    single, _ = train(path, tmp_path / "single", 5, 0)
    assert resumed.ids == single.ids


STILL_CACHING = """
import sys, time
import numpy as np
from lightning_sae.data import format
file = format.create(sys.argv[1], d_in=8, chunk_rows=256)
format.append(file, np.arange(2048 * 8, dtype=np.float32).reshape(2048, 8))
file[format.ACTIVATIONS].resize(4096, axis=0)  # the next batch, written but not yet committed
file[format.ACTIVATIONS][2048:] = np.nan
file.flush()
print("committed", flush=True)
time.sleep(60)
"""


def test_a_file_still_being_cached_trains_on_its_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "caching.h5"
    writer = subprocess.Popen([sys.executable, "-c", STILL_CACHING, str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"committed"
        data = ActivationDataModule(str(path), batch_size=256, val_rows=256, buffer_rows=1024)
        model = SparseAutoencoder(d_in=data.d_in, d_sae=16, input_scale=data.input_scale)
        Trainer(
            accelerator="cpu",
            max_steps=10,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model, datamodule=data)
        assert data.infos[0].n_rows == 2048
        assert torch.isfinite(model.W_enc).all()
    finally:
        writer.kill()
        writer.wait()
