"""``NonFiniteGuard``: a training step whose loss is NaN or Inf stops the fit, or is skipped."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_sae.errors import UserError


class NonFiniteGuard(Callback):
    """Watches the loss of every training step for NaN or Inf (``lightning_sae fit`` always has one:
    ``--non_finite.action``).

    ``stop`` (default): the fit ends with a ``UserError`` naming the step, so the CLI exits with
    status 2 and writes no export; weights or optimizer state holding NaN or Inf are never saved
    either (:meth:`SparseAutoencoder.on_save_checkpoint`). The host never waits for the current
    step: on a GPU a step's flag is copied to the host asynchronously and read at the next step,
    waiting only for that copy, one step old, so the device always has work queued; the fit stops
    one step late. Unlike :class:`~lightning_sae.firing.HostCopy`, which reads whichever copy has
    landed, every DDP rank thus reads the same step, and all ranks stop together (a rank stopping
    alone would leave the others waiting in a collective). On a CPU the flag is read at once.

    ``skip``: a step whose loss, or gradients, hold NaN or Inf drops its gradients before the
    optimizer step, so Adam (which steps only parameters with a gradient) changes neither the
    weights nor its state; the learning-rate schedule moves on. It costs one host synchronisation
    per step. The first skip is warned about, and the count at the end of the fit.

    Under DDP the loss flag is the maximum over the ranks (one ``all_reduce`` of a scalar per
    step) and the gradients are already the same on every rank, so all ranks decide alike.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop") -> None:
        """
        Args:
            action: "stop": end the fit with an error naming the step; "skip": skip the batch
                (one host synchronisation per step).
        """
        if action not in ("stop", "skip"):
            raise UserError(f"non_finite.action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.skipped = 0
        """Batches skipped so far in this run (``skip``), resumed from checkpoints."""
        self._loss_bad: Tensor | None = None
        self._copy: Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._copied_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loss_bad, self._copied = None, None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        bad = loss.detach().isfinite().logical_not()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # accumulated batches

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if self._loss_bad is None:
            return  # no backward pass this step
        bad, self._loss_bad = self._loss_bad.long(), None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.action == "skip":
            self._skip_if(bad, trainer, optimizer)
        elif bad.device.type != "cuda":
            self._stop_if(bool(bad), trainer.global_step)
        else:
            self._read_copy()
            if self._copy is None:
                self._copy = torch.empty((), dtype=torch.long, pin_memory=True)
            self._copy.copy_(bad, non_blocking=True)
            self._copied, self._copied_step = torch.cuda.Event(), trainer.global_step
            self._copied.record()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._read_copy()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read_copy()
        if self.skipped:
            rank_zero_warn(f"{self.skipped} training batches were skipped: their loss or gradients held NaN or Inf")

    def _read_copy(self) -> None:
        """Stop if the step whose flag is on its way to the host had a non-finite loss (waits for its copy)."""
        if self._copied is None:
            return
        assert self._copy is not None
        self._copied.synchronize()
        self._copied = None
        self._stop_if(bool(self._copy), self._copied_step)

    @staticmethod
    def _stop_if(bad: bool, step: int) -> None:
        if bad:
            raise UserError(
                f"the loss became NaN or Inf at step {step}: training stopped before saving or exporting it "
                "(lower the learning rate, check the data, or set non_finite.action: skip)"
            )

    def _skip_if(self, bad: Tensor, trainer: Trainer, optimizer: Optimizer) -> None:
        """Drop the step's gradients when ``bad`` or when they hold NaN or Inf (one host sync)."""
        params = [param for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        if params and getattr(trainer.precision_plugin, "scaler", None) is None:  # a float16 scaler skips those itself
            bad = bad.bool() | ~torch.stack([param.grad.isfinite().all() for param in params]).all()
        if not bool(bad):
            return
        for param in params:
            param.grad = None
        self.skipped += 1
        if self.skipped == 1:
            rank_zero_warn(
                f"the loss or gradients held NaN or Inf at step {trainer.global_step}: the batch was skipped "
                "(weights and optimizer state unchanged); further skips are counted at the end of the fit"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
