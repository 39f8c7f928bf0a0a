"""``Resampling``: re-initialise dead features towards badly reconstructed inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from lightning_sae.callbacks.calibration import firing_rate_biases
from lightning_sae.callbacks.scheduled import ScheduledIntervention
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder


class Resampling(ScheduledIntervention):
    """Neuron resampling of Bricken et al. 2023 ("Towards Monosemanticity"), at the given steps.

    Seed 001 ranks it the second most important trick, after width. At each step in ``steps``,
    with D the dead features of the model's firing counter:

    1. compute the reconstruction loss l_n = ‖y_n − ŷ_n‖² of ``sample_rows`` training rows;
    2. draw |D| rows with probability ∝ l_n² (successive draws without replacement, by
       Gumbel-top-k, so no two revived features start alike);
    3. for dead feature i and its row (x, y): W_dec[i] = y/‖y‖ (decoder row i is the recipe's
       dictionary vector i; y = x for an SAE, the target for a transcoder),
       W_enc[:, i] = s·x/‖x‖ with s = ``encoder_scale`` · mean_{j alive} ‖W_enc[:, j]‖ and b_enc[i] = θ_i,
       the encoder's threshold, so the feature fires wherever x·W_enc[:, i] > 0 (Bricken et al.'s
       b = 0 for a ReLU); or, with ``firing_rate``, b_enc[i] set so that it fires on that fraction
       of ``calibration_rows`` training rows
       (:func:`~lightning_sae.callbacks.calibration.firing_rate_biases`);
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
        firing_rate: float | None = None,
        calibration_rows: int = 65_536,
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
            firing_rate: Fraction of rows a revived feature starts firing on; None: wherever its
                projection is positive.
            calibration_rows: Training rows that set the revived biases for ``firing_rate``.
            seed: Seed of the choice of rows and of the draws.
        """
        super().__init__(steps, fractions)
        if sample_rows < 1 or encoder_scale <= 0:
            raise UserError(
                f"Resampling needs sample_rows >= 1 and encoder_scale > 0, got {sample_rows} and {encoder_scale}"
            )
        if firing_rate is not None and not 0 < firing_rate < 1:
            raise UserError(f"Resampling firing_rate must be in (0, 1), got {firing_rate}")
        if calibration_rows < 2:
            raise UserError(f"Resampling calibration_rows must be at least 2, got {calibration_rows}")
        if firing_rate is not None and not 1 <= round(firing_rate * calibration_rows) < calibration_rows:
            raise UserError(
                f"Resampling: {calibration_rows} calibration_rows cannot resolve a firing_rate of {firing_rate:.3g}"
            )
        self.sample_rows = sample_rows
        self.encoder_scale = encoder_scale
        self.firing_rate = firing_rate
        self.calibration_rows = calibration_rows
        self.seed = seed

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
        inputs, targets = trainer.strategy.broadcast(draws, src=0)
        indices = indices[: len(inputs)]
        if len(indices) == 0:
            return indices
        self.reinitialise_(model, trainer.optimizers, indices, inputs.to(model.device), targets.to(model.device), ~dead)
        if self.firing_rate is not None:
            self.calibrate_(trainer, model, indices)
        model.firing.revive_(indices)
        model.settle_after_resampling()
        rank_zero_info(f"Resampling: {len(indices)} dead features resampled at step {trainer.global_step}")
        return indices

    @torch.no_grad()
    def draw(self, trainer: Trainer, model: SparseAutoencoder, count: int) -> tuple[Tensor, Tensor]:
        """Up to ``count`` rows (scaled x, scaled y), drawn ∝ squared loss without replacement, on the CPU.

        Gumbel-top-k: the rows with the largest log(l_n²) + G_n, G_n ~ Gumbel(0, 1), kept while streaming.
        """
        seed = self.seed * 1_000_003 + trainer.global_step
        generator = torch.Generator().manual_seed(seed)
        keys = torch.empty(0, dtype=torch.float64)
        inputs = torch.empty(0, model.d_in)
        targets = torch.empty(0, model.d_out)
        encoder_was_training = model.encoder.training
        model.encoder.eval()
        for x, y in ActivationDataModule.of(trainer).sample_batches(self.sample_rows, seed):
            out = model.forward_pass(x.to(model.device), None if y is None else y.to(model.device))
            loss = (out.target - out.reconstruction).pow(2).sum(-1).double().cpu()
            uniform = torch.rand(len(loss), dtype=torch.float64, generator=generator)
            keys = torch.cat([keys, 2 * loss.log() - (-uniform.log()).log()])
            inputs = torch.cat([inputs, out.input.float().cpu()])
            targets = torch.cat([targets, out.target.float().cpu()])
            top = keys.topk(min(count, len(keys))).indices
            keys, inputs, targets = keys[top], inputs[top], targets[top]
        model.encoder.train(encoder_was_training)
        drawn = keys > float("-inf")
        return inputs[drawn], targets[drawn]

    @torch.no_grad()
    def reinitialise_(
        self,
        model: SparseAutoencoder,
        optimizers: list[Optimizer],
        indices: Tensor,
        inputs: Tensor,
        targets: Tensor,
        alive: Tensor,
    ) -> None:
        """Point features ``indices`` at rows (``inputs``, ``targets``) and reset their optimizer state."""
        encoder_norms = model.W_enc.norm(dim=0)
        reference = encoder_norms[alive] if alive.any() else encoder_norms
        scale = self.encoder_scale * reference.mean()
        model.W_dec[indices] = F.normalize(targets.to(model.W_dec), dim=-1)
        model.W_enc[:, indices] = (F.normalize(inputs.to(model.W_enc), dim=-1) * scale).T
        model.b_enc[indices] = model.encoder.threshold(model.decoder_norms())[indices]
        model.reset_optimizer_state_(optimizers, indices)

    def calibrate_(self, trainer: Trainer, model: SparseAutoencoder, indices: Tensor) -> None:
        """Set b_enc of the revived features ``indices`` so each fires on ``firing_rate`` of the rows."""
        assert self.firing_rate is not None
        biases = None
        if trainer.is_global_zero:
            seed = self.seed * 1_000_003 + trainer.global_step + 1
            rows = ActivationDataModule.of(trainer).sample_batches(self.calibration_rows, seed)
            x = torch.cat([x for x, _ in rows]).to(model.device)
            biases = firing_rate_biases(model, x, self.firing_rate, "Resampling calibration_rows", indices).cpu()
        biases = trainer.strategy.broadcast(biases, src=0)
        with torch.no_grad():
            model.b_enc[indices] = biases.to(model.b_enc)
