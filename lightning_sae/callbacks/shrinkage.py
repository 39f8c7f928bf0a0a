"""``ShrinkageCorrection``: at the end of fitting, undo a penalty's shrinkage of a ReLU or JumpReLU SAE."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import JumpReLU, ReLU
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder

SMALLEST_THRESHOLD = 1e-6
"""Threshold given to a ReLU feature whose fitted correction is 0: JumpReLU needs θ > 0 (log θ)."""


class ShrinkageCorrection(Callback):
    """Give an SAE trained with a magnitude penalty its unshrunk magnitudes, keeping which features fire.

    An L1 penalty pulls every active feature down by about the same amount ("shrinkage": Wright &
    Sharkey 2024, "Addressing feature suppression in SAEs"; Rajamanoharan et al. 2024, Gated SAEs);
    a tanh penalty (seed 000) pulls the small activations down more than the large ones. Where the
    reconstruction wants s_i·(h_i + δ_i) of a firing feature, the SAE gives h_i. At the end of fitting
    this callback fits, by Adam on ``rows`` training rows, a gain s > 0 and a shift δ per feature with
    the weights and the firing pattern H(h − θ) fixed (θ = 0 for ReLU, the JumpReLU threshold
    otherwise; δ ≥ −θ):

        min_{s,δ}  E‖y − (s∘(f + H(h − θ)∘δ))·W_dec − b_dec‖²,   f = σ(h),

    and writes the result as the exact JumpReLU it is: f'_i = s_i(h_i + δ_i)·H(h_i − θ_i) = JumpReLU_θ'(h'_i)
    with h' = s∘(h + δ) (W_enc's columns times s, b_enc' = s∘(b_enc + δ)) and θ' = s∘(θ + δ). L0 and the
    features that fire are unchanged; the SAE exports as SAELens ``jumprelu``. The gain matters where
    the pull depends on the magnitude: on the toy-offset set of docs/recipe_quality.md the
    anthropic-jan2025 SAE's FVU is 0.191 with δ alone and 0.158 with s and δ. Put it before
    ``DecoderNormFolding`` in the callbacks. Under DDP every rank fits the same s and δ (gradients
    averaged over the ranks). It runs after the last checkpoint, which keeps the training state: the
    fit-end export holds the corrected SAE, and ``lightning_sae export`` of a checkpoint the
    uncorrected one.
    """

    def __init__(
        self, rows: int = 65_536, steps: int = 500, batch_size: int = 4096, lr: float = 0.1, seed: int = 0
    ) -> None:
        """
        Args:
            rows: Training rows s and δ are fitted on (read again each pass, never all in memory).
            steps: Adam steps of the fit.
            batch_size: Rows per step.
            lr: Adam's first learning rate for δ (in units of the scaled pre-activations, O(1)) and log s,
                decayed linearly to 0 over the steps.
            seed: Seed of the rows' order.
        """
        if min(rows, steps, batch_size) < 1 or not lr > 0:
            raise UserError("ShrinkageCorrection: rows, steps and batch_size must be positive, and lr > 0")
        self.rows = rows
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse, before training, an SAE whose features are not a threshold's: TopK's depend on the ranking."""
        assert isinstance(pl_module, SparseAutoencoder)
        if stage == "fit" and not isinstance(pl_module.encoder, (ReLU, JumpReLU)):
            raise UserError(
                f"ShrinkageCorrection corrects a ReLU or JumpReLU SAE's penalty shrinkage; this model's encoder is "
                f"{type(pl_module.encoder).__name__}: remove the callback"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        gain, shift = self.fit_correction(pl_module, ActivationDataModule.of(trainer), trainer)
        apply_correction_(pl_module, gain, shift)
        pl_module.validated_step = -1  # the final validation must see the corrected SAE

    @torch.enable_grad()
    def fit_correction(
        self, model: SparseAutoencoder, data: ActivationDataModule, trainer: Trainer
    ) -> tuple[Tensor, Tensor]:
        """Gain s > 0 and shift δ ≥ −θ [m] that minimise the reconstruction error at a fixed firing pattern."""
        lowest_shift = -model.encoder.threshold(model.decoder_norms()).detach()
        correction = torch.zeros(2, model.d_sae, device=model.device, requires_grad=True)  # log s, δ: one all-reduce
        optimizer = torch.optim.Adam([correction], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / self.steps)
        done = 0
        while done < self.steps:
            for x, y in data.sample_batches(self.rows, self.seed + done):
                for start in range(0, len(x), self.batch_size):
                    if done == self.steps:
                        break
                    x_batch = x[start : start + self.batch_size].to(model.device)
                    y_batch = None if y is None else y[start : start + self.batch_size].to(model.device)
                    with torch.no_grad():
                        out = model.forward_pass(x_batch, y_batch)
                        firing = (out.features != 0).to(out.reconstruction.dtype)
                        residual = out.target - out.reconstruction
                    log_gain, shift = correction
                    gain = log_gain.exp()
                    change = (gain - 1) * out.features + gain * shift * firing  # f' − f
                    error = residual - change @ out.W_dec.detach()
                    loss = error.pow(2).sum(-1).mean()
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    assert correction.grad is not None
                    correction.grad.copy_(trainer.strategy.reduce(correction.grad, reduce_op="mean"))
                    optimizer.step()
                    schedule.step()
                    with torch.no_grad():
                        correction[1].clamp_(min=lowest_shift)
                    done += 1
        log_gain, shift = correction.detach()
        return log_gain.exp(), shift


@torch.no_grad()
def apply_correction_(model: SparseAutoencoder, gain: Tensor, shift: Tensor) -> None:
    """Turn the SAE into the JumpReLU f = s(h + δ)·H(h − θ): W_enc's columns times s, b_enc' = s(b_enc + δ),
    threshold θ' = s(θ + δ) (ReLU: θ = 0)."""
    norms = model.decoder_norms()
    threshold = (gain * (model.encoder.threshold(norms) + shift)).clamp(min=SMALLEST_THRESHOLD)
    encoder = model.encoder if isinstance(model.encoder, JumpReLU) else JumpReLU(model.d_sae).to(model.device)
    encoder.set_threshold_(threshold, norms)
    model.encoder = encoder
    model.W_enc.mul_(gain)
    model.b_enc.add_(shift).mul_(gain)
