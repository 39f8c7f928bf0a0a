"""``Resampling``: dead features come back, exactly their optimizer state is reset, the learning
rate re-warms, the loss stays bounded, transcoders decode towards targets."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from lightning_sae.callbacks.resampling import Resampling
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.format import ACTIVATIONS, TARGETS
from lightning_sae.encoders import JumpReLU
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

BATCH = 64
SILENCED = 8
RESAMPLE_STEP = 4


def silenced_model(input_scale: float, **kwargs: Any) -> SparseAutoencoder:
    """A ReLU SAE whose first SILENCED features never fire (b_enc = −1000, and L1 gives no way back)."""
    model = SparseAutoencoder(
        d_in=16, d_sae=32, penalties=[L1(0.1)], input_scale=input_scale, dead_after_tokens=2 * BATCH, **kwargs
    )
    with torch.no_grad():
        model.b_enc[:SILENCED] = -1000.0
    return model


class CopyAt(Callback):
    """Copies the model when the resampling step starts; listed before or after ``Resampling``."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == RESAMPLE_STEP:
            self.model = copy.deepcopy(pl_module)


class RecordLR(Callback):
    """The learning rate of each optimizer step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        self.lr[trainer.global_step] = optimizer.param_groups[0]["lr"]


def fit_with_resampling(
    toy_data: Callable[..., ActivationDataModule],
    callback_trainer: Callable[..., Trainer],
    steps: int,
    **model_kwargs: Any,
) -> tuple[SparseAutoencoder, SparseAutoencoder, SparseAutoencoder, RecordLR]:
    """Fit a silenced model (dead after two steps without firing), resampling at RESAMPLE_STEP;
    returns the trained model, the model just before and just after the resampling, and the
    learning rates."""
    data = toy_data()
    model = silenced_model(data.input_scale, **model_kwargs)
    before, after, record = CopyAt(), CopyAt(), RecordLR()
    callbacks = [before, Resampling(steps=[RESAMPLE_STEP], sample_rows=1024), after, record]
    callback_trainer(steps, callbacks).fit(model, data)
    return model, before.model, after.model, record


def test_dead_features_come_back(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    trained, before, after, _ = fit_with_resampling(toy_data, callback_trainer, 12, lr=3e-3, lr_rewarmup_steps=3)
    assert torch.equal(after.b_enc[:SILENCED], torch.zeros(SILENCED))
    torch.testing.assert_close(after.decoder_norms()[:SILENCED], torch.ones(SILENCED))
    encoder_norms = after.W_enc.norm(dim=0)
    torch.testing.assert_close(encoder_norms[:SILENCED], torch.full((SILENCED,), 0.2) * encoder_norms[SILENCED:].mean())
    assert torch.equal(after.W_enc[:, SILENCED:], before.W_enc[:, SILENCED:])
    # each revived feature points at one training row, encoder and decoder alike (X = Y)
    cosine = F.normalize(after.W_enc[:, :SILENCED].T, dim=-1) @ F.normalize(after.W_dec[:SILENCED], dim=-1).T
    torch.testing.assert_close(cosine.diagonal(), torch.ones(SILENCED))
    assert (cosine - torch.eye(SILENCED)).abs().max() < 0.999  # no two alike
    assert after.firing.rows_since_fired[:SILENCED].max() == 0  # their counts restart
    assert trained.firing.rows_since_fired[:SILENCED].max() < 2 * BATCH  # they fire again
    assert not trained.firing.dead_mask().any()


def test_loss_does_not_spike(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    """Revived features start small: the reconstruction error of fixed rows grows by under 5%."""
    _, before, after, _ = fit_with_resampling(toy_data, callback_trainer, RESAMPLE_STEP + 1, lr=1e-2)
    x = torch.cat([x for x, _ in toy_data().sample_batches(2048, seed=5)])
    with torch.no_grad():
        mse_before = before.loss(before.forward_pass(x))[1]["mse"]
        mse_after = after.loss(after.forward_pass(x))[1]["mse"]
    assert mse_after < 1.05 * mse_before


def test_lr_drops_to_a_tenth_and_warms_back(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    lr, rewarmup = 1e-2, 4
    *_, record = fit_with_resampling(toy_data, callback_trainer, 12, lr=lr, lr_rewarmup_steps=rewarmup,
                                     lr_decay_fraction=0.0)
    assert sorted(record.lr) == list(range(12))
    for step, value in record.lr.items():
        progress = (step - RESAMPLE_STEP) / rewarmup
        expected = lr if not 0 <= progress < 1 else lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * progress)))
        assert value == pytest.approx(expected), step
    assert record.lr[RESAMPLE_STEP] == pytest.approx(lr / 10)


class RecordFactor(Callback):
    """The L0 controller's log φ after each training step."""

    def __init__(self) -> None:
        self.log_factor: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.log_factor.append(pl_module.l0_controller.log_factor.item())


def test_the_l0_controller_holds_while_revived_features_settle(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    """Revived features fire on about half the rows; the coefficient does not chase that L0 jump."""
    steps, settle = 60, 3  # the controller holds for 5% of the run
    data = toy_data()
    model = silenced_model(data.input_scale, target_l0=1.0)
    record = RecordFactor()
    callback_trainer(steps, [Resampling(steps=[RESAMPLE_STEP], sample_rows=1024), record]).fit(model, data)
    changes = [after != before for before, after in zip(record.log_factor, record.log_factor[1:])]
    held = changes[RESAMPLE_STEP - 1 : RESAMPLE_STEP + settle]  # log φ after steps RESAMPLE_STEP - 1 .. + settle
    assert not any(held), record.log_factor
    assert all(changes[: RESAMPLE_STEP - 1]) and changes[RESAMPLE_STEP + settle], "the search runs outside the hold"


def adam_after_steps(model: SparseAutoencoder, steps: int = 3) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        total, _ = model.loss(model.forward_pass(torch.randn(32, model.d_in)))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return optimizer


def test_only_the_resampled_rows_columns_and_entries_change() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, encoder=lambda d_sae: JumpReLU(d_sae, initial_log_threshold=-3.0),
                              penalties=[L1(0.1)])
    optimizer = adam_after_steps(model)
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(optimizer.state_dict()["state"])
    indices = torch.tensor([1, 5, 6])
    alive = torch.ones(16, dtype=torch.bool)
    alive[[1, 5, 6, 9]] = False
    inputs, targets = torch.randn(3, 8), torch.randn(3, 8)
    Resampling(steps=[1]).reinitialise_(model, [optimizer], indices, inputs, targets, alive)

    changed = torch.zeros(16, dtype=torch.bool)
    changed[indices] = True
    torch.testing.assert_close(model.W_dec[indices], F.normalize(targets, dim=-1))
    scale = 0.2 * before_params["W_enc"][:, alive].norm(dim=0).mean()
    torch.testing.assert_close(model.W_enc[:, indices].T, F.normalize(inputs, dim=-1) * scale)
    # b_enc = θ: a revived JumpReLU feature fires wherever its projection is positive, its own row included
    torch.testing.assert_close(model.b_enc[indices], before_params["encoder.log_threshold"][indices].exp())
    with torch.no_grad():
        assert (model.encode(inputs)[torch.arange(3), indices] > 0).all()
    assert torch.equal(model.W_dec[~changed], before_params["W_dec"][~changed])
    assert torch.equal(model.W_enc[:, ~changed], before_params["W_enc"][:, ~changed])
    assert torch.equal(model.b_enc[~changed], before_params["b_enc"][~changed])
    assert torch.equal(model.encoder.log_threshold, before_params["encoder.log_threshold"])

    names = [name for name, _ in model.named_parameters()]
    state = optimizer.state_dict()["state"]
    feature_axis = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    for number, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before_state[number][key], state[number][key]
            assert old.abs().min() > 0 or name == "b_dec"  # every entry had state to lose
            if name not in feature_axis:
                assert torch.equal(new, old), name
                continue
            axis = feature_axis[name]
            assert torch.equal(new.index_select(axis, indices), torch.zeros_like(old.index_select(axis, indices)))
            kept = (~changed).nonzero().flatten()
            assert torch.equal(new.index_select(axis, kept), old.index_select(axis, kept)), name
        assert torch.equal(state[number]["step"], before_state[number]["step"])


def test_transcoder_decoder_rows_point_at_targets(
    transcoder_file: Path, callback_trainer: Callable[..., Trainer]
) -> None:
    data = ActivationDataModule(str(transcoder_file), batch_size=BATCH, val_rows=256, buffer_rows=512)
    model = SparseAutoencoder(d_in=12, d_sae=24, d_out=10, penalties=[L1(0.1)], lr=1e-3, dead_after_tokens=2 * BATCH,
                              input_scale=data.input_scale, target_scale=data.target_scale)
    with torch.no_grad():
        model.b_enc[:4] = -1000.0
    after = CopyAt()
    callbacks = [Resampling(steps=[RESAMPLE_STEP], sample_rows=512), after]
    callback_trainer(RESAMPLE_STEP + 1, callbacks).fit(model, data)
    with h5py.File(transcoder_file, "r") as file:
        x, y = torch.from_numpy(file[ACTIVATIONS][:]), torch.from_numpy(file[TARGETS][:])
    encoders = F.normalize(after.model.W_enc[:, :4].T, dim=-1)
    rows = (encoders @ F.normalize(x, dim=-1).T).argmax(1)
    torch.testing.assert_close(encoders, F.normalize(x[rows], dim=-1))
    torch.testing.assert_close(after.model.W_dec[:4], F.normalize(y[rows], dim=-1))


def test_draws_favour_high_loss_rows(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    """With loss² weights, the drawn rows' losses beat the sample's typical loss."""
    data = toy_data()
    model = silenced_model(data.input_scale)
    resampling = Resampling(steps=[5], sample_rows=2048)
    trainer = callback_trainer(1, [resampling])
    trainer.fit(model, data)
    inputs, targets = resampling.draw(trainer, model, 64)
    assert len(inputs) == 64 and len(set(map(tuple, inputs.tolist()))) == 64
    with torch.no_grad():
        drawn = (model(inputs / model.input_scale) - targets / model.target_scale).pow(2).sum(-1)
        sample = torch.cat([x for x, _ in data.sample_batches(2048, seed=0)])
        typical = (model(sample) - sample).pow(2).sum(-1).median()
    assert drawn.median() > typical


def test_residual_revivals_point_at_the_errors_of_high_loss_rows(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    """With ``direction="residual"`` a revived feature points at what the SAE misses on its row: the
    error y − ŷ of one of the sampled rows (an SAE's encoder column the same way), a high-loss one."""
    data = toy_data()
    model = silenced_model(data.input_scale)
    with torch.no_grad():
        model.b_dec.copy_(3 * torch.randn(model.d_in))  # reconstructs an offset the rows do not have
    resampling = Resampling(steps=[5], sample_rows=2048, direction="residual")
    trainer = callback_trainer(1, [resampling])
    trainer.fit(model, data)
    encoder_rows, decoder_rows = resampling.draw(trainer, model, 64)
    assert torch.equal(encoder_rows, decoder_rows)
    seed = resampling.seed * 1_000_003 + trainer.global_step
    x = torch.cat([x for x, _ in data.sample_batches(2048, seed)])
    with torch.no_grad():
        out = model.forward_pass(x)
        errors = out.target - out.reconstruction
    exact = "donot_use_mm_for_euclid_dist"
    distances = torch.cdist(decoder_rows, errors, compute_mode=exact)
    assert distances.min(1).values.max() < 1e-4, "each drawn row is a sampled row's error"
    assert torch.cdist(decoder_rows, out.input, compute_mode=exact).min() > 1, "not the row itself"
    drawn_loss = errors[distances.argmin(1)].pow(2).sum(-1)
    assert drawn_loss.median() > errors.pow(2).sum(-1).median()


def test_residual_revivals_of_a_transcoder_encode_its_input(
    transcoder_file: Path, callback_trainer: Callable[..., Trainer]
) -> None:
    """A transcoder's error lives in the output space: its revived encoder columns point at the
    rows' inputs (what the encoder reads), the decoder rows at the errors."""
    data = ActivationDataModule(str(transcoder_file), batch_size=BATCH, val_rows=256, buffer_rows=512)
    model = SparseAutoencoder(d_in=12, d_sae=24, d_out=10, penalties=[L1(0.1)], input_scale=data.input_scale,
                              target_scale=data.target_scale)
    resampling = Resampling(steps=[5], sample_rows=512, direction="residual")
    trainer = callback_trainer(1, [resampling])
    trainer.fit(model, data)
    encoder_rows, decoder_rows = resampling.draw(trainer, model, 16)
    seed = resampling.seed * 1_000_003 + trainer.global_step
    x, y = (torch.cat(parts) for parts in zip(*data.sample_batches(512, seed)))
    with torch.no_grad():
        out = model.forward_pass(x, y)
    nearest = torch.cdist(encoder_rows, out.input, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert nearest.values.max() < 1e-4
    torch.testing.assert_close(decoder_rows, (out.target - out.reconstruction)[nearest.indices])


@pytest.mark.parametrize("firing_rate", [0.1, "target"])
def test_revived_features_start_at_the_firing_rate(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], firing_rate: float | str
) -> None:
    """With ``firing_rate`` (0.1, or "target": target_l0 3.2 over 32 features), revived JumpReLU
    features fire on that share of fresh rows, though their thresholds (kept) lie far above anything
    the data reaches."""
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=32, encoder=lambda d_sae: JumpReLU(d_sae, initial_log_threshold=-1.0),
                              input_scale=data.input_scale, dead_after_tokens=2 * BATCH, penalties=[L1(1e-6)],
                              target_l0=3.2 if firing_rate == "target" else None)
    with torch.no_grad():
        model.encoder.log_threshold[:SILENCED] = 5.0  # θ = 148: dead
    after = CopyAt()
    resampling = Resampling(steps=[RESAMPLE_STEP], sample_rows=1024, firing_rate=firing_rate, calibration_rows=4096)
    callback_trainer(RESAMPLE_STEP + 1, [resampling, after]).fit(model, data)
    x = torch.cat([x for x, _ in data.sample_batches(4096, seed=7)])
    with torch.no_grad():
        rates = (after.model.encode(x)[:, :SILENCED] > 0).float().mean(0)
    assert after.model.encoder.log_threshold[:SILENCED].min() > 4.9
    assert ((rates > 0.06) & (rates < 0.14)).all(), rates


def test_a_target_rate_needs_a_target_l0(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    with pytest.raises(UserError, match="needs model.target_l0"):
        callback_trainer(2, [Resampling(steps=[1], firing_rate="target")]).fit(silenced_model(data.input_scale), data)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(UserError, match="positive"):
        Resampling(steps=[0])
    with pytest.raises(UserError, match="firing_rate"):
        Resampling(steps=[1], firing_rate=1.0)
    with pytest.raises(UserError, match="firing_rate"):
        Resampling(steps=[1], firing_rate="often")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="direction"):
        Resampling(steps=[1], direction="error")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="cannot resolve a firing_rate"):
        Resampling(steps=[1], firing_rate=1e-6, calibration_rows=1000)
