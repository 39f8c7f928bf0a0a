"""``Resampling``: re-initialise dead features towards badly reconstructed inputs."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_sae.callbacks.calibration import firing_rate_biases
from lightning_sae.callbacks.scheduled import ScheduledIntervention
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder

Direction = Literal["input", "residual"]


class Resampling(ScheduledIntervention):
    """Neuron resampling of Bricken et al. 2023 ("Towards Monosemanticity"), at the given steps.

    Seed 001 ranks it the second most important trick, after width. At each step in ``steps``,
    with D the dead features of the model's firing counter:

    1. compute the reconstruction loss l_n = ‖y_n − ŷ_n‖² of ``sample_rows`` training rows;
    2. draw |D| rows with probability ∝ l_n² (successive draws without replacement, by
       Gumbel-top-k, so no two revived features start alike);
    3. for dead feature i and its row (x, y): W_dec[i] = y/‖y‖ (decoder row i is the recipe's
       dictionary vector i; y = x for an SAE, the target for a transcoder),
       W_enc[:, i] = s·x/‖x‖ with s = ``encoder_scale`` · mean_{j alive} ‖W_enc[:, j]‖ (with
       ``direction="residual"``: W_dec[i] = e/‖e‖ for the row's error e = y − ŷ, W_enc[:, i] = s·e/‖e‖, and
       for a transcoder W_enc[:, i] = s·x̃/‖x̃‖, x̃ what the encoder reads) and b_enc[i] = θ_i, the
       encoder's threshold, so the feature fires wherever x·W_enc[:, i] > 0 (Bricken et al.'s b = 0
       for a ReLU); or, with ``firing_rate``, b_enc[i] set so that it fires on that fraction of
       ``calibration_rows`` training rows (:func:`~lightning_sae.callbacks.calibration.firing_rate_biases`);
    4. zero the optimizer's per-element state (Adam's exp_avg, exp_avg_sq) of exactly those
       rows, columns and entries, start the learning-rate re-warmup (seed 001) and hold the L0
       controller's coefficient while the revived features settle (``model.settle_after_resampling()``).

    Encoder-specific parameters (JumpReLU thresholds) are kept: with b_enc[i] = 0 a JumpReLU
    feature whose threshold rose until it died would stay dead. Rank 0 draws the rows (and
    calibrates) and broadcasts them; the dead set is the model's firing counter's, which is the same on every rank, so
    every rank applies the same update, and the revived features' counts restart. Draws are seeded
    by ``seed`` and the step, so a resumed run resamples exactly like an uninterrupted one.
    """

    def __init__(
        self,
        steps: list[int] | None = None,
        fractions: list[float] | None = None,
        sample_rows: int = 819_200,
        encoder_scale: float = 0.2,
        firing_rate: float | Literal["target"] | None = None,
        calibration_rows: int = 65_536,
        direction: Direction = "input",
        seed: int = 0,
    ) -> None:
        """
        Args:
            steps: Optimizer steps at which to resample (seed 001: 20k, 50k, 75k and 100k).
            fractions: Resampling points as fractions of the run's total steps, for recipes that
                scale with the run (seed 001's points of a 100k-step run: 0.2, 0.5, 0.75).
            sample_rows: Training rows whose loss is computed to draw from (Bricken et al. 2023: 819,200).
            encoder_scale: Encoder norm of a revived feature relative to the mean of the alive ones
                (Bricken et al. 2023: 0.2).
            firing_rate: Fraction of rows a revived feature starts firing on; "target": the model's
                target_l0/m, the rate every feature starts at; None: wherever its projection is positive.
            calibration_rows: Training rows that set the revived biases for ``firing_rate``.
            direction: What a revived feature points at: "input", its row (Bricken et al. 2023);
                "residual", the part of its row the SAE misses, so that a direction every row shares
                (an offset) or one already reconstructed does not dominate it.
            seed: Seed of the choice of rows and of the draws.
        """
        super().__init__(steps, fractions)
        if sample_rows < 1 or encoder_scale <= 0:
            raise UserError(
                f"Resampling needs sample_rows >= 1 and encoder_scale > 0, got {sample_rows} and {encoder_scale}"
            )
        if direction not in ("input", "residual"):
            raise UserError(f"Resampling direction must be 'input' or 'residual', got {direction!r}")
        if calibration_rows < 2:
            raise UserError(f"Resampling calibration_rows must be at least 2, got {calibration_rows}")
        if isinstance(firing_rate, float | int):
            self.check_firing_rate(firing_rate, calibration_rows)
        elif firing_rate not in (None, "target"):
            raise UserError(f"Resampling firing_rate must be a number, 'target' or null, got {firing_rate!r}")
        self.sample_rows = sample_rows
        self.encoder_scale = encoder_scale
        self.firing_rate = firing_rate
        self.calibration_rows = calibration_rows
        self.direction = direction
        self.seed = seed

    @staticmethod
    def check_firing_rate(rate: float, calibration_rows: int) -> None:
        """One clear error for a rate outside (0, 1) or one that ``calibration_rows`` rows cannot resolve."""
        if not 0 < rate < 1:
            raise UserError(f"Resampling firing_rate must be in (0, 1), got {rate}")
        if not 1 <= round(rate * calibration_rows) < calibration_rows:
            raise UserError(
                f"Resampling: {calibration_rows} calibration_rows cannot resolve a firing_rate of {rate:.3g}"
            )

    def revived_rate(self, model: SparseAutoencoder) -> float | None:
        """The firing rate revived features are calibrated to (None: not calibrated)."""
        if self.firing_rate != "target":
            return self.firing_rate
        return model.target_l0("Resampling with firing_rate 'target'") / model.d_sae

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, on every rank and before training, that the revived features' firing rate is defined."""
        assert isinstance(pl_module, SparseAutoencoder)
        rate = self.revived_rate(pl_module)
        if rate is not None:
            self.check_firing_rate(rate, self.calibration_rows)

    def intervene(self, trainer: Trainer, model: SparseAutoencoder) -> Tensor:
        return self.resample(trainer, model)

    def resample(self, trainer: Trainer, model: SparseAutoencoder) -> Tensor:
        """Resample the dead features now; returns the indices resampled."""
        dead = model.firing.dead_mask()
        indices = dead.nonzero().flatten()
        if len(indices) == 0:
            return indices
        draws = None
        if trainer.is_global_zero:
            draws = self.draw(trainer, model, len(indices))
        encoder_rows, decoder_rows = trainer.strategy.broadcast(draws, src=0)
        indices = indices[: len(encoder_rows)]
        if len(indices) == 0:
            return indices
        encoder_rows, decoder_rows = encoder_rows.to(model.device), decoder_rows.to(model.device)
        self.reinitialise_(model, trainer.optimizers, indices, encoder_rows, decoder_rows, ~dead)
        rate = self.revived_rate(model)
        if rate is not None:
            self.calibrate_(trainer, model, indices, rate)
        model.firing.revive_(indices)
        model.settle_after_resampling()
        rank_zero_info(f"Resampling: {len(indices)} dead features resampled at step {trainer.global_step}")
        return indices

    @torch.no_grad()
    def draw(self, trainer: Trainer, model: SparseAutoencoder, count: int) -> tuple[Tensor, Tensor]:
        """Up to ``count`` drawn rows ∝ squared loss without replacement, on the CPU: what the revived
        encoder columns and decoder rows point at (scaled x and y, or see ``direction``).

        Gumbel-top-k: the rows with the largest log(l_n²) + G_n, G_n ~ Gumbel(0, 1), kept while streaming.
        """
        seed = self.seed * 1_000_003 + trainer.global_step
        generator = torch.Generator().manual_seed(seed)
        keys = torch.empty(0, dtype=torch.float64)
        encoder_rows = torch.empty(0, model.d_in)
        decoder_rows = torch.empty(0, model.d_out)
        encoder_was_training = model.encoder.training
        model.encoder.eval()
        for x, y in ActivationDataModule.of(trainer).sample_batches(self.sample_rows, seed):
            out = model.forward_pass(x.to(model.device), None if y is None else y.to(model.device))
            error = out.target - out.reconstruction
            loss = error.pow(2).sum(-1).double().cpu()
            uniform = torch.rand(len(loss), dtype=torch.float64, generator=generator)
            keys = torch.cat([keys, 2 * loss.log() - (-uniform.log()).log()])
            decoder_row, encoder_row = out.target, out.input
            if self.direction == "residual":
                decoder_row = error
                encoder_row = error if model.reconstructs_input else model.encoder_input(out.input)
            encoder_rows = torch.cat([encoder_rows, encoder_row.float().cpu()])
            decoder_rows = torch.cat([decoder_rows, decoder_row.float().cpu()])
            top = keys.topk(min(count, len(keys))).indices
            keys, encoder_rows, decoder_rows = keys[top], encoder_rows[top], decoder_rows[top]
        model.encoder.train(encoder_was_training)
        drawn = keys > float("-inf")
        return encoder_rows[drawn], decoder_rows[drawn]

    @torch.no_grad()
    def reinitialise_(
        self,
        model: SparseAutoencoder,
        optimizers: list[Optimizer],
        indices: Tensor,
        encoder_rows: Tensor,
        decoder_rows: Tensor,
        alive: Tensor,
    ) -> None:
        """Point features ``indices``' encoder columns and decoder rows at these rows; reset their optimizer state."""
        encoder_norms = model.W_enc.norm(dim=0)
        reference = encoder_norms[alive] if alive.any() else encoder_norms
        scale = self.encoder_scale * reference.mean()
        model.W_dec[indices] = F.normalize(decoder_rows.to(model.W_dec), dim=-1)
        model.W_enc[:, indices] = (F.normalize(encoder_rows.to(model.W_enc), dim=-1) * scale).T
        model.b_enc[indices] = model.encoder.threshold(model.decoder_norms())[indices]
        model.reset_optimizer_state_(optimizers, indices)

    def calibrate_(self, trainer: Trainer, model: SparseAutoencoder, indices: Tensor, rate: float) -> None:
        """Set b_enc of the revived features ``indices`` so each fires on a fraction ``rate`` of the rows."""
        biases = None
        if trainer.is_global_zero:
            seed = self.seed * 1_000_003 + trainer.global_step + 1
            rows = ActivationDataModule.of(trainer).sample_batches(self.calibration_rows, seed)
            x = torch.cat([x for x, _ in rows]).to(model.device)
            biases = firing_rate_biases(model, x, rate, "Resampling calibration_rows", indices).cpu()
        biases = trainer.strategy.broadcast(biases, src=0)
        with torch.no_grad():
            model.b_enc[indices] = biases.to(model.b_enc)
