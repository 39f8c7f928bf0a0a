"""``SparseAutoencoder``: parameters, initialisation, forward pass, loss and optimiser.

Notation of the Anthropic January 2025 recipe (seed 000): n = d_in, o = d_out, m = d_sae. Weights
are stored in SAELens' layout: ``W_enc`` [n, m], ``W_dec`` [m, o], so h = x·W_enc + b_enc and
ŷ = f·W_dec + b_dec; the recipe's decoder column W_d,i is row i of ``W_dec``.

The model works in a scaled space: x·input_scale and y·target_scale, with scales chosen so that
E‖x‖₂ = √n (seed 000). The scales are buffers, saved with the weights and folded in on export.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_sae.checkpoint_io import read_checkpoint
from lightning_sae.decoding import Decoding, gather_decode, gathers
from lightning_sae.encoders import Encoder, ReLU
from lightning_sae.errors import UserError
from lightning_sae.firing import FiringCounter
from lightning_sae.lr_schedule import WarmupDecaySchedule
from lightning_sae.metrics import reconstruction_metrics
from lightning_sae.output import SAEOutput
from lightning_sae.penalties import Penalty
from lightning_sae.target_l0 import L0Controller

Batch = tuple[Tensor, Tensor | None]
"""(x, y) rows of a batch; y is None when the SAE reconstructs its input."""


class SparseAutoencoder(LightningModule):
    """A sparse autoencoder (or transcoder when d_out ≠ d_in) with plug-in encoder and penalties.

    loss = ‖y − ŷ‖²₂ (summed over dims, averaged over the batch; seed 000) + Σ_p λ_p·penalty_p.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int = 4096,
        d_out: int | None = None,
        encoder: Callable[[int], Encoder] = ReLU,
        penalties: list[Penalty] | None = None,
        lr: float | None = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int | float = 0,
        lr_rewarmup_steps: int | float = 0,
        lr_decay_fraction: float = 0.2,
        input_scale: float = 1.0,
        target_scale: float | None = None,
        center_input: bool = False,
        dead_after_tokens: int = 10_000_000,
        target_l0: float | None = None,
        target_l0_warmup: float = 0.0,
        target_l0_glide: float = 1.0,
        decoding: Decoding = "auto",
        compile: bool = False,
        allow_tf32: bool = True,
        decoder_init_norm: float | None = None,
        encoder_init_scale: float | None = None,
    ) -> None:
        """
        Args:
            d_in: Input dimension n (read from the data file).
            d_sae: Number of features m.
            d_out: Output dimension o of a separate target Y (read from the data file's ``targets``;
                None: the SAE reconstructs its input, X = Y).
            encoder: The nonlinearity, e.g. ``lightning_sae.encoders.JumpReLU``.
            penalties: Loss terms added to the reconstruction loss, each with its coefficient.
            lr: Adam learning rate (seed 000: 2e-4); None: Gao et al. 2024's rule 2e-4·(2^14/m)^½.
            betas: Adam betas (seed 000: 0.9, 0.999; no weight decay).
            lr_warmup_steps: Cosine warmup from lr/10 at the start, in steps, or as a fraction of the run
                when below 1 (seed 001: 1000; 0: none).
            lr_rewarmup_steps: Cosine re-warmup from lr/10 after each resampling, in steps or as a
                fraction of the run (seed 001: 1000).
            lr_decay_fraction: Linear decay to zero over this last fraction of training (seed 000: 0.2).
            input_scale: Multiplier of x making E‖x‖₂ = √d_in (estimated from the data file).
            target_scale: Multiplier of y making E‖y‖₂ = √d_out (None: input_scale).
            center_input: Encode x − b_dec instead of x (Bricken et al. 2023; Gao et al. 2024's b_pre;
                SAELens' apply_b_dec_to_input); needs X = Y.
            dead_after_tokens: Training rows without firing after which a feature is dead (AuxK's
                dead latents, resampling, the dead fraction; Gao et al. 2024: 10M tokens).
            target_l0: Mean active features per row at which to hold the model's sparsity penalty: its
                coefficient is then found while training (:class:`~lightning_sae.target_l0.L0Controller`),
                starting from the configured one. None: the coefficient as configured.
            target_l0_warmup: Fraction of the run over which that coefficient first rises linearly
                from 0 (seed 000's sparsity warmup), stopping early once the target is reached; the
                search for it starts afterwards.
            target_l0_glide: L0 asked for at the start as a multiple G of ``target_l0``: above 1 the
                coefficient has no ramp from 0; it is searched for from the first step, starting at the
                configured one, while the L0 target falls geometrically from G·target_l0 to target_l0
                over ``target_l0_warmup``. 1: the linear ramp. Made for JumpReLU, whose thresholds
                integrate the penalty; a ReLU's L0 answers λ at once and the search then oscillates
                (ReLU + L1: docs/benchmarks.md, stop 30).
            decoding: "dense": ŷ = f·W_dec; "sparse": for an encoder that keeps k features per row
                (TopK), ŷ = Σ_k f_k·W_dec[i_k] from the k gathered rows, whose cost grows with k
                rather than d_sae, forward and backward; "auto": sparse where k/d_sae is small
                enough for that to be faster on the device (``decoding.GATHER_BELOW_K_OVER_M``).
            compile: ``torch.compile`` the forward pass (encoder and decoder) when fitting.
            allow_tf32: On a CUDA device, let float32 matrix products use TF32
                (``torch.set_float32_matmul_precision("high")``, a process-wide setting); it only
                matters under ``precision: 32-true``, and false keeps full float32.
            decoder_init_norm: Initial norm of every decoder row, in random directions (Gao et al. 2024: 1);
                None: seed 000's W_d ~ U(−1/√n, 1/√n).
            encoder_init_scale: W_e = s·W_dᵀ at initialisation when X = Y (Gao et al. 2024: 1); None: seed
                000's s = n/m.
        """
        super().__init__()
        if d_in < 1 or d_sae < 1 or (d_out is not None and d_out < 1):
            raise UserError(f"dimensions must be positive: d_in={d_in}, d_sae={d_sae}, d_out={d_out}")
        for name, scale in (("input_scale", input_scale), ("target_scale", target_scale)):
            if scale is not None and not (0 < scale < float("inf")):
                raise UserError(f"{name} must be positive and finite, got {scale}")
        self.save_hyperparameters(ignore=["encoder", "penalties"])
        self.d_in = d_in
        self.d_sae = d_sae
        self.d_out = d_out or d_in
        self.reconstructs_input = d_out is None
        if center_input and not self.reconstructs_input:
            raise UserError("center_input subtracts b_dec from the input, so it needs d_out = d_in (no targets)")
        self.center_input = center_input
        self.encoder = encoder(d_sae)
        self.decoding = self._checked_decoding(decoding)
        self.firing = FiringCounter(d_sae, dead_after_tokens)
        self.penalties = nn.ModuleList(penalties or [])
        self.penalty_names = _unique_names([penalty.name for penalty in self.penalties])
        for penalty in self.penalties:
            penalty.bind(d_in, d_sae, self.encoder)
        self.l0_controller = (
            None if target_l0 is None else L0Controller(target_l0, target_l0_warmup, glide=target_l0_glide)
        )
        self._controlled = None if target_l0 is None else self._sparsity_penalty_index()
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale or input_scale)))
        self.val_metrics = reconstruction_metrics(d_sae, prefix="val/", d_target=self.d_out)
        self.train_metrics = reconstruction_metrics(d_sae, prefix="train/", d_target=self.d_out, densities=False)
        self.validated_step = -1
        """The optimizer step of the last completed validation pass (−1: none yet)."""
        self.reset_parameters()

    def _checked_decoding(self, decoding: Decoding) -> Decoding:
        """``decoding``, refused where the encoder cannot decode sparsely."""
        if decoding not in ("auto", "dense", "sparse"):
            raise UserError(f"decoding must be 'auto', 'dense' or 'sparse', got {decoding!r}")
        if decoding == "sparse" and self.encoder.selection_size() is None:
            name = type(self.encoder).__name__
            raise UserError(f"decoding='sparse' needs an encoder that keeps k features per row, not {name}")
        return decoding

    def _sparsity_penalty_index(self) -> int:
        """Index of the one penalty with ``sparsity`` set, which ``target_l0`` controls."""
        sparsity = [index for index, penalty in enumerate(self.penalties) if penalty.sparsity]
        if len(sparsity) != 1:
            names = [self.penalty_names[index] for index in sparsity]
            raise UserError(f"target_l0 needs exactly one sparsity penalty (L1, Tanh, L0), the model has {names}")
        return sparsity[0]

    @property
    def controlled_penalty(self) -> Penalty | None:
        """The penalty whose coefficient ``target_l0`` controls (None without a target)."""
        return None if self._controlled is None else self.penalties[self._controlled]

    def target_l0(self, needed_by: str) -> float:
        """The L0 the controller holds the sparsity penalty at; one clear error for ``needed_by`` without one."""
        if self.l0_controller is None:
            raise UserError(f"{needed_by} needs model.target_l0")
        return self.l0_controller.target

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seed 000's initialisation.

        W_d ~ U(−1/√n, 1/√n); W_e = (n/m)·W_dᵀ when X = Y, else W_e ~ U(−1/√m, 1/√m);
        b_e = 0 (the calibration callback sets it), b_d = 0.
        """
        bound = self.d_in**-0.5
        self.W_dec.uniform_(-bound, bound)
        if self.hparams.decoder_init_norm is not None:
            self.W_dec.mul_(self.hparams.decoder_init_norm / self.W_dec.norm(dim=1, keepdim=True))
        if self.reconstructs_input:
            scale = self.hparams.encoder_init_scale
            self.W_enc.copy_(self.W_dec.T * (self.d_in / self.d_sae if scale is None else scale))
        else:
            self.W_enc.uniform_(-(self.d_sae**-0.5), self.d_sae**-0.5)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ----------------------------------------------------------------- forward
    def decoder_norms(self) -> Tensor:
        """‖W_d,i‖₂ for every feature, [m]."""
        return self.W_dec.norm(dim=1)

    def forward_pass(self, x: Tensor, y: Tensor | None = None) -> SAEOutput:
        """Run the SAE on raw rows x (and targets y, default x) and return every intermediate."""
        x_scaled = x.to(self.W_enc.dtype) * self.input_scale
        if y is None:
            y_scaled = x_scaled if self.reconstructs_input else None
        else:
            y_scaled = y.to(self.W_enc.dtype) * self.target_scale
        if y_scaled is None:
            raise UserError("this model maps X to a different Y: batches must carry targets")
        pre_acts = self.pre_activations(x_scaled)
        decoder_norms = self.decoder_norms()
        features, reconstruction = self._encode_decode(pre_acts, decoder_norms)
        return SAEOutput(
            x_scaled, y_scaled, pre_acts, features, reconstruction, decoder_norms, self.W_dec, self.firing.dead_mask()
        )

    def _encode_decode(self, pre_acts: Tensor, decoder_norms: Tensor) -> tuple[Tensor, Tensor]:
        """Features f and the scaled reconstruction f·W_dec + b_dec, gathered where ``decoding`` says."""
        k = self.encoder.selection_size()
        if k is None or not gathers(self.decoding, k, self.d_sae, pre_acts.device):
            features = self.encoder(pre_acts, decoder_norms)
            return features, features @ self.W_dec + self.b_dec
        values, indices = self.encoder.select(pre_acts, decoder_norms)
        features = torch.zeros_like(pre_acts).scatter(-1, indices, values)
        return features, gather_decode(values, indices, self.W_dec) + self.b_dec

    def encoder_input(self, x_scaled: Tensor) -> Tensor:
        """What W_enc multiplies: the scaled rows, less b_dec with ``center_input``, [B, n]."""
        return x_scaled - self.b_dec if self.center_input else x_scaled

    def pre_activations(self, x_scaled: Tensor) -> Tensor:
        """h = x·W_enc + b_enc, or (x − b_dec)·W_enc + b_enc with ``center_input``, of scaled rows, [B, m].

        One ``addmm``: under autocast h stays in bfloat16 (a separate ``+ b_enc`` would promote the
        [B, m] product to float32 and double the memory traffic of everything that reads h).
        """
        x = self.encoder_input(x_scaled)
        h = torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc)
        return h.reshape(*x.shape[:-1], self.d_sae)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f of raw rows x, [B, m]."""
        pre_acts = self.pre_activations(x.to(self.W_enc.dtype) * self.input_scale)
        return self.encoder(pre_acts, self.decoder_norms())

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ŷ of raw rows x, in the raw (unscaled) target space."""
        pre_acts = self.pre_activations(x.to(self.W_enc.dtype) * self.input_scale)
        return self._encode_decode(pre_acts, self.decoder_norms())[1] / self.target_scale

    # -------------------------------------------------------------------- loss
    def loss(self, out: SAEOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its unweighted terms: ``mse`` = ‖y − ŷ‖² and one per penalty."""
        out = dataclasses.replace(out, dead_count=self.firing.known_dead_count)
        mse = (out.target - out.reconstruction).pow(2).sum(-1).mean()
        terms = {"mse": mse}
        total = mse
        for name, penalty in zip(self.penalty_names, self.penalties):
            value = penalty(out, self.encoder)
            terms[name] = value
            total = total + penalty.current_coefficient * value
        return total, terms

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.forward_pass(*batch)
        self.firing.update(out.features)
        if self.l0_controller is not None:
            self.penalties[self._controlled].factor = self.l0_controller.factor(self.global_step, self.total_steps)
        total, terms = self.loss(out)
        if self.l0_controller is not None:
            self.l0_controller.update(self.firing.step_l0(), self.global_step, self.total_steps)
        rows = out.input.shape[0]
        if self.logs_this_step():
            logs = {f"train/{name}": value.detach() for name, value in terms.items()}
            logs["train/loss"] = total.detach()
            with torch.no_grad():  # this batch's values, no cross-rank sync (forward, not compute)
                batch_metrics = self.train_metrics(
                    out.target, out.reconstruction, out.features, decoder_norms=out.decoder_norms
                )
                logs.update(batch_metrics)
                self.train_metrics.reset()
            logs["train/lr"] = self.optimizers().param_groups[0]["lr"]
            for name, penalty in zip(self.penalty_names, self.penalties):
                logs[f"train/{name}_coefficient"] = penalty.current_coefficient
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=rows)
            # the progress bar shows the loss of the last logged step: reading it every step would
            # make every step wait for the device
            self.log("loss", total.detach(), prog_bar=True, logger=False, batch_size=rows)
        return total

    def logs_this_step(self) -> bool:
        """Whether the logger writes this training step (Lightning's every-n-steps rule).

        Each ``self.log`` call costs about 2 ms of Lightning bookkeeping, more than a whole step
        of a small SAE on a CPU, so training scalars are only computed and logged when written.
        """
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        out = self.forward_pass(*batch)
        total, _ = self.loss(out)
        self.val_metrics.update(out.target, out.reconstruction, out.features, decoder_norms=out.decoder_norms)
        self.log("val/loss", total, on_epoch=True, sync_dist=True, batch_size=out.input.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), sync_dist=False)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.validated_step = self.global_step

    # --------------------------------------------------------------- optimiser
    def setup(self, stage: str) -> None:
        """Device-dependent settings: TF32 matmuls on CUDA, and the compiled forward pass."""
        if self.hparams.allow_tf32 and self.trainer.strategy.root_device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        if self.hparams.compile and stage == "fit":
            self.forward_pass = torch.compile(self.forward_pass)  # type: ignore[method-assign]

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam without weight decay and the warmup/decay schedule, stepped every step.

        Adam is fused (one kernel for all parameters) on CUDA unless a float16 loss scaler
        unscales the gradients, which it then would have to do inside the fused step.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        parameters = dict(self.named_parameters())
        groups = [
            {"params": [parameters[name] for name in names], "lr": self.learning_rate() * scale}
            for scale, names in self.parameter_groups()
        ]
        optimizer = torch.optim.Adam(
            groups,
            lr=self.learning_rate(),
            betas=self.hparams.betas,
            weight_decay=0.0,
            fused=self.device.type == "cuda" and scaler is None,
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not 0 < total_steps < float("inf"):
            raise UserError("the number of training steps is unknown: set trainer.max_steps")
        self.total_steps = int(total_steps)
        schedule = WarmupDecaySchedule(
            optimizer,
            total_steps=self.total_steps,
            warmup_steps=self._steps(self.hparams.lr_warmup_steps),
            rewarmup_steps=self._steps(self.hparams.lr_rewarmup_steps),
            decay_fraction=self.hparams.lr_decay_fraction,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def parameter_groups(self) -> list[tuple[float, list[str]]]:
        """The optimizer's parameter groups, as (multiplier of the learning rate, parameter names).

        The multiplier-1 group comes first (its learning rate is the one logged); parameters the
        encoder gives another multiplier (:meth:`Encoder.learning_rate_scales`, e.g. JumpReLU's
        thresholds) form a group per multiplier.
        """
        scales = {f"encoder.{name}": scale for name, scale in self.encoder.learning_rate_scales().items()}
        groups: dict[float, list[str]] = {1.0: []}
        for name, _ in self.named_parameters():
            groups.setdefault(float(scales.get(name, 1.0)), []).append(name)
        return [(scale, names) for scale, names in groups.items() if names]

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's ``gradient_clip_val`` clipping, also for fused Adam under ``bf16-mixed``.

        Lightning refuses to clip for any fused optimizer under mixed precision, because a float16
        loss scaler would leave the gradients scaled; Adam is fused only where no scaler exists
        (``configure_optimizers``), so the gradients are the true ones and are clipped here.
        """
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def _steps(self, steps_or_fraction: int | float) -> int:
        """A step count given as steps, or as a fraction of the run when below 1."""
        if steps_or_fraction < 0:
            raise UserError(f"warmup lengths must be >= 0, got {steps_or_fraction}")
        if steps_or_fraction < 1:
            return round(steps_or_fraction * self.total_steps)
        return int(steps_or_fraction)

    def learning_rate(self) -> float:
        """The base learning rate: ``lr``, or Gao et al. 2024's 2e-4·(2^14/m)^½ when it is None."""
        if self.hparams.lr is not None:
            return self.hparams.lr
        return 2e-4 * (2**14 / self.d_sae) ** 0.5

    def settle_after_resampling(self) -> None:
        """Start the post-resampling learning-rate re-warmup (seed 001) and hold the L0 controller's
        coefficient while the revived features settle (:meth:`~lightning_sae.target_l0.L0Controller.hold`)."""
        schedule = self.lr_schedulers()
        assert isinstance(schedule, WarmupDecaySchedule)
        schedule.restart_warmup()
        if self.l0_controller is not None:
            self.l0_controller.hold(self.global_step, self.total_steps)

    @torch.no_grad()
    def reset_optimizer_state_(self, optimizers: Iterable[Optimizer], indices: Tensor) -> None:
        """Zero the optimizers' per-element state (Adam's exp_avg, exp_avg_sq) of features ``indices``:
        their W_enc columns, b_enc entries and W_dec rows, as for freshly initialised weights."""
        rows = ((self.W_dec, indices), (self.W_enc, (slice(None), indices)), (self.b_enc, indices))
        for param, index in rows:
            for optimizer in optimizers:
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        value[index] = 0

    @torch.no_grad()
    def silence_features_(self, indices: Tensor, optimizers: Iterable[Optimizer] = ()) -> None:
        """Silence features ``indices``: W_enc[:, i] = 0 and b_enc[i] = −1, their optimizer state zeroed.

        Then h_i = −1 on every row (folding keeps it negative), so no ReLU-family encoder (ReLU,
        JumpReLU, TopK) fires it, and it writes nothing and gets no gradient, except from a penalty
        on features that do not fire (the pre-act loss pulls h_i up: at least 238 of 791 silenced
        features fired again within 80 steps, anthropic-jan2025 on the wide-input set, stop 42). It
        counts as dead at once (:meth:`FiringCounter.declare_dead_`), and resampling can revive it.
        The decoder row stays, so every exported row keeps unit norm (tools that divide by it, such
        as SAELens' ``fold_W_dec_norm``).
        """
        self.W_enc[:, indices] = 0
        self.b_enc[indices] = -1.0
        self.reset_optimizer_state_(optimizers, indices)
        self.firing.declare_dead_(indices)

    # ----------------------------------------------------------------- folding
    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Make every decoder row unit-norm in place, keeping the predictions (seed 000).

        W_e' = W_e·‖W_d‖, b_e' = b_e·‖W_d‖, W_d' = W_d/‖W_d‖, b_d' = b_d, and the encoder's own
        parameters follow (:meth:`Encoder.rescale_`; JumpReLU: t' = t + log‖W_d‖). With
        ``center_input`` the encoder reads x − b_dec, which is unchanged. An all-zero decoder row
        (a feature that writes nothing) is left as it is.
        """
        norms = self.decoder_norms()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.encoder.rescale_(norms, 1 / norms)
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None])

    @torch.no_grad()
    def fold_centering_(self) -> None:
        """Turn h = (x − b_dec)·W_enc + b_enc into h = x·W_enc + b_enc' in place.

        b_enc' = b_enc − b_dec·W_enc.
        """
        if self.center_input:
            self.b_enc.sub_(self.b_dec @ self.W_enc)
            self.center_input = False

    @torch.no_grad()
    def fold_scales_(self) -> None:
        """Fold input_scale s_in and target_scale s_out into the weights in place and set both to 1.

        Raw rows give h = s_in·x·W_e + b_e and ŷ_raw = (f·W_d + b_d)/s_out; dividing h by s_out
        (W_e' = W_e·s_in/s_out, b_e' = b_e/s_out, thresholds likewise) and b_d by s_out gives the
        same ŷ_raw with scales 1. Needs the centering folded first.
        """
        self.fold_centering_()
        s_in, s_out = self.input_scale.clone(), self.target_scale.clone()
        self.encoder.rescale_(torch.full_like(self.b_enc, 1 / s_out.item()), torch.ones_like(self.b_enc))
        self.W_enc.mul_(s_in / s_out)
        self.b_enc.div_(s_out)
        self.b_dec.div_(s_out)
        self.input_scale.fill_(1.0)
        self.target_scale.fill_(1.0)

    def folded(self) -> SparseAutoencoder:
        """A float32 CPU copy in eval mode with every folding applied: unit decoder rows, no
        centering, raw activations in. It makes the same predictions; exports hold it."""
        folded = copy.deepcopy(self).cpu().float().eval()
        folded.__dict__.pop("forward_pass", None)  # a compiled forward pass (``compile``) belongs to self
        folded.fold_centering_()
        folded.fold_decoder_norms_()
        folded.fold_scales_()
        return folded

    # ----------------------------------------------------------- persistence
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Describe the plugins; refuse to write weights or optimizer state holding NaN or Inf."""
        name = first_non_finite(self.checkpoint_tensors(checkpoint))
        if name is not None:
            raise UserError(
                f"{name} holds NaN or Inf at step {self.global_step}: training diverged, so no checkpoint is "
                "written (lower the learning rate or check the data)"
            )
        checkpoint["plugins"] = {
            "encoder": plugin_spec(self.encoder, skip=("d_sae",)),
            "penalties": [plugin_spec(penalty) for penalty in self.penalties],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning's restore (``--ckpt_path``): upgrade an earlier version's state, and refuse a
        checkpoint of another size or one whose weights or optimizer state hold NaN or Inf."""
        upgrade_state_dict(checkpoint["state_dict"])
        stored = checkpoint["state_dict"]["W_enc"].shape
        if tuple(stored) != tuple(self.W_enc.shape):
            raise UserError(
                f"checkpoint has d_in={stored[0]}, d_sae={stored[1]} but this run has "
                f"d_in={self.d_in}, d_sae={self.d_sae}: is it the same data file and config?"
            )
        trainer = self._trainer
        where = str(trainer.ckpt_path) if trainer is not None and trainer.ckpt_path else "the checkpoint"
        check_finite(self.checkpoint_tensors(checkpoint), where)
        groups = self.parameter_groups()
        for optimizer_state in checkpoint.get("optimizer_states", []):
            stored = [len(group["params"]) for group in optimizer_state["param_groups"]]
            if stored != [len(names) for _, names in groups]:
                multipliers = ", ".join(f"{scale:g}" for scale, _ in groups)
                raise UserError(
                    f"{where} was trained with {len(stored)} optimizer parameter group(s), this run has "
                    f"{len(groups)} (learning-rate multipliers {multipliers}): resume with the encoder's "
                    "learning-rate multipliers of that run (e.g. --model.encoder.init_args.threshold_lr_scale 1)"
                )

    def checkpoint_tensors(self, checkpoint: dict[str, Any]) -> Iterator[tuple[str, Tensor]]:
        """The weights (by state-dict key) and the optimizer state of a Lightning checkpoint, each with
        its name in messages, e.g. "the optimizer state of W_enc (exp_avg)"."""
        yield from checkpoint["state_dict"].items()
        names = [name for _, group in self.parameter_groups() for name in group]  # the optimizer's order
        for optimizer_state in checkpoint.get("optimizer_states", []):
            indices = [index for group in optimizer_state["param_groups"] for index in group["params"]]
            owners = dict(zip(indices, names))
            for index, state in optimizer_state["state"].items():
                owner = owners.get(index, f"parameter {index}")
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        yield f"the optimizer state of {owner} ({key})", value

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SparseAutoencoder:
        """Rebuild a model, plugins included, from a Lightning checkpoint written by ``fit``."""
        return cls.from_checkpoint_dict(read_checkpoint(path), str(path))

    @classmethod
    def from_checkpoint_dict(cls, checkpoint: dict[str, Any], where: str = "the checkpoint") -> SparseAutoencoder:
        """Rebuild a model, plugins included, from a loaded ``fit`` checkpoint; ``where`` names it in errors."""
        if "plugins" not in checkpoint:
            raise UserError(f"{where} is not a lightning_sae checkpoint (no plugin description)")
        upgrade_checkpoint(checkpoint)
        check_finite(checkpoint["state_dict"].items(), where)
        encoder_spec = checkpoint["plugins"]["encoder"]
        encoder_cls = _import(encoder_spec["class_path"])
        accepted = inspect.signature(cls.__init__).parameters
        hyper_parameters = {key: value for key, value in checkpoint["hyper_parameters"].items() if key in accepted}
        model = cls(
            **hyper_parameters,
            encoder=lambda d_sae: encoder_cls(d_sae, **encoder_spec["init_args"]),
            penalties=[instantiate(spec) for spec in checkpoint["plugins"]["penalties"]],
        )
        model.load_state_dict(checkpoint["state_dict"])
        return model


def first_non_finite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, else None (a host sync per tensor)."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            return name
    return None


def check_finite(tensors: Iterable[tuple[str, Tensor]], where: str) -> None:
    """Refuse a loaded checkpoint holding NaN or Inf: ``fit`` no longer writes one (``on_save_checkpoint``),
    so its bytes were damaged or an older version saved a diverged run; resuming or exporting it would
    train on or ship NaN."""
    name = first_non_finite(tensors)
    if name is not None:
        raise UserError(
            f"{where} holds NaN or Inf in {name}: it is corrupt (or from a diverged run); use an earlier checkpoint"
        )


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Bring a checkpoint of an earlier version to this one, in place.

    Before the model owned its firing counter, AuxK had its own ``dead_after_tokens``: it becomes
    the model's (unless the checkpoint has one), and its count moves (:func:`upgrade_state_dict`).
    """
    upgrade_state_dict(checkpoint["state_dict"])
    for spec in checkpoint.get("plugins", {}).get("penalties", []):
        dead_after_tokens = spec.get("init_args", {}).pop("dead_after_tokens", None)
        if dead_after_tokens is not None:
            checkpoint.setdefault("hyper_parameters", {}).setdefault("dead_after_tokens", dead_after_tokens)


def upgrade_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Bring a state dict of an earlier version to this one's keys, in place; returns it.

    Before the model owned its firing counter, AuxK kept ``penalties.<i>.tokens_since_fired``:
    that count becomes ``firing.rows_since_fired`` (zeros when there was none). Before the L0
    controller smoothed its L0, it had no ``l0_controller.mean_l0`` and ``slow_mean_l0``: they start
    unset (−1); before it held after a resampling, no ``l0_controller.held_until`` (−1: not holding);
    before its ramp waited for L0 to fall to the target from above, no ``l0_controller.was_above``
    (True: the earlier ramp ended at any L0 ≤ T).
    """
    if "l0_controller.log_factor" in state:
        state.setdefault("l0_controller.mean_l0", torch.tensor(-1.0))
        state.setdefault("l0_controller.slow_mean_l0", torch.tensor(-1.0))
        state.setdefault("l0_controller.held_until", torch.tensor(-1))
        state.setdefault("l0_controller.was_above", torch.tensor(True))
    if "firing.rows_since_fired" not in state:
        old = [key for key in state if key.endswith(".tokens_since_fired")]
        counts = state[old[0]] if old else torch.zeros(state["b_enc"].shape[0], dtype=torch.long)
        for key in old:
            del state[key]
        state["firing.rows_since_fired"] = counts
    return state


def plugin_spec(plugin: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of an encoder or penalty, read back from its attributes.

    Plugins keep each constructor argument as an attribute of the same name; arguments that only
    seed a parameter (e.g. ``initial_log_threshold``) are restored by the state dict instead.
    """
    cls = type(plugin)
    names = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", *skip)]
    init_args = {name: getattr(plugin, name) for name in names if hasattr(plugin, name)}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def instantiate(spec: dict[str, Any]) -> Any:
    """Build an object from a ``{"class_path", "init_args"}`` spec."""
    return _import(spec["class_path"])(**spec.get("init_args", {}))


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"cannot import {class_path!r}: {exc}") from exc


def _unique_names(names: list[str]) -> list[str]:
    """Names with ``_2``, ``_3``... appended to repeats, so two L1 penalties log separately."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique
