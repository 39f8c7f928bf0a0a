"""NonFiniteGuard: a NaN or Inf loss stops the fit at its step with nothing exported, or its batch is skipped."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file
from test_cli import expect_user_error, fit_args
from torch import Tensor

from lightning_sae.callbacks.non_finite import NonFiniteGuard
from lightning_sae.cli import main
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

POISONED_STEP = 3


class PoisonBatch(Callback):
    """Puts an Inf into the batch of training step ``step`` (on rank ``rank`` only; None: every rank)."""

    def __init__(self, step: int = POISONED_STEP, rank: int | None = None) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            batch[0][0, 0] = float("inf")


class StepState(Callback):
    """The weights and Adam state just before and just after training step ``step``."""

    def __init__(self, step: int = POISONED_STEP) -> None:
        self.step = step
        self.before: dict[str, Tensor] = {}
        self.after: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = training_state(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step + 1:
            self.after = training_state(trainer, pl_module)


def training_state(trainer: Trainer, model: LightningModule) -> dict[str, Tensor]:
    state = {name: param.detach().clone() for name, param in model.named_parameters()}
    for index, values in trainer.optimizers[0].state_dict()["state"].items():
        state |= {f"adam {index} {key}": value.clone() for key, value in values.items()}
    return state


def toy_model(data: ActivationDataModule) -> SparseAutoencoder:
    return SparseAutoencoder(d_in=16, d_sae=32, penalties=[L1(0.1)], lr=3e-3, input_scale=data.input_scale)


def all_finite(model: SparseAutoencoder) -> bool:
    return all(bool(param.isfinite().all()) for param in model.parameters())


def test_a_non_finite_loss_stops_the_fit_at_its_step_before_the_weights_change(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = toy_model(data)
    state = StepState()
    trainer = callback_trainer(10, [PoisonBatch(), state, NonFiniteGuard()])
    with pytest.raises(UserError, match=f"the loss became NaN or Inf at step {POISONED_STEP}: training stopped"):
        trainer.fit(model, data)
    assert trainer.global_step == POISONED_STEP
    assert all_finite(model)
    for name, value in state.before.items():
        if not name.startswith("adam"):
            assert torch.equal(getattr(model, name), value), name


def test_skip_leaves_the_weights_and_adam_state_of_a_bad_batch_untouched_and_the_fit_finishes(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = toy_model(data)
    state, guard = StepState(), NonFiniteGuard(action="skip")
    trainer = callback_trainer(10, [PoisonBatch(), state, guard])
    with pytest.warns(UserWarning, match=f"NaN or Inf at step {POISONED_STEP}: the batch was skipped"):
        trainer.fit(model, data)
    assert trainer.global_step == 10 and all_finite(model)
    assert state.before.keys() == state.after.keys() and any(name.startswith("adam") for name in state.before)
    for name, value in state.before.items():
        assert torch.equal(state.after[name], value), name
    assert guard.state_dict() == {"skipped": 1}


@pytest.mark.cuda
def test_on_cuda_the_loss_is_watched_without_a_synchronisation_and_the_fit_stops_one_step_late() -> None:
    guard, trainer = NonFiniteGuard(), SimpleNamespace(global_step=0)
    losses = torch.tensor([1.0, 2.0, float("nan"), 3.0], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            trainer.global_step = step
            guard.on_before_backward(trainer, None, losses[step])  # type: ignore[arg-type]
            guard.on_before_optimizer_step(trainer, None, None)  # type: ignore[arg-type]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer.global_step = 3
    guard.on_before_backward(trainer, None, losses[3])  # type: ignore[arg-type]
    with pytest.raises(UserError, match="the loss became NaN or Inf at step 2:"):
        guard.on_before_optimizer_step(trainer, None, None)  # type: ignore[arg-type]


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(UserError, match="must be 'stop' or 'skip'"):
        NonFiniteGuard(action="ignore")  # type: ignore[arg-type]


def test_a_diverging_fit_exits_naming_the_step_and_writes_no_export_nor_checkpoint(
    toy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [*fit_args(toy_file, tmp_path), "--trainer.max_steps", "20", "--trainer.val_check_interval", "10"]
    expect_user_error([*args, "--model.lr", "1e30"], capsys, "error: the loss became NaN or Inf at step 1: training")
    (run,) = (tmp_path / "relu-l1").iterdir()
    assert not (run / "sae").exists()
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_the_command_line_can_skip_bad_batches(toy_file: Path, tmp_path: Path) -> None:
    poison = f"--trainer.callbacks+={__name__}.PoisonBatch"
    args = [*fit_args(toy_file, tmp_path), "--trainer.max_steps", "10", "--trainer.val_check_interval", "10"]
    with pytest.warns(UserWarning, match="1 training batches were skipped"):
        main([*args, poison, "--non_finite.action", "skip"])
    (run,) = (tmp_path / "relu-l1").iterdir()
    weights = load_file(run / "sae" / "sae_weights.safetensors")
    assert all(bool(value.isfinite().all()) for value in weights.values())


class LastSteps(Callback):
    """Writes, at every step, the last training step each rank started and finished to ``rank<r>.txt``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started = self.finished = -1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.started = trainer.global_step
        self._write(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.finished = trainer.global_step - 1
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        (self.directory / f"rank{trainer.global_rank}.txt").write_text(f"{self.started} {self.finished}")


@pytest.mark.timeout(300)
def test_under_ddp_every_rank_stops_at_the_step_one_rank_saw_inf(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    data = toy_data()
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    callbacks = [PoisonBatch(rank=1), NonFiniteGuard(), LastSteps(tmp_path)]
    trainer = callback_trainer(8, callbacks, strategy=strategy, devices=2)
    with pytest.raises(Exception, match=f"at step {POISONED_STEP}"):
        trainer.fit(toy_model(data), data)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"{POISONED_STEP} {POISONED_STEP - 1}", rank
