"""``SparseAutoencoder``: parameters, initialisation, forward pass, loss and optimiser.

Notation of the Anthropic January 2025 recipe (seed 000): n = d_in, o = d_out, m = d_sae. Weights
are stored in SAELens' layout: ``W_enc`` [n, m], ``W_dec`` [m, o], so h = x·W_enc + b_enc and
ŷ = f·W_dec + b_dec; the recipe's decoder column W_d,i is row i of ``W_dec``.

The model works in a scaled space: x·input_scale and y·target_scale, with scales chosen so that
E‖x‖₂ = √n (seed 000). The scales are buffers, saved with the weights and folded in on export.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor, nn

from lightning_sae.encoders import Encoder, ReLU
from lightning_sae.errors import UserError
from lightning_sae.lr_schedule import WarmupDecaySchedule
from lightning_sae.metrics import reconstruction_metrics
from lightning_sae.output import SAEOutput
from lightning_sae.penalties import Penalty

Batch = tuple[Tensor, Tensor]
"""(x, y) rows of a batch; y is x itself when the SAE reconstructs its input."""


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
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_warmup_steps: int = 0,
        lr_rewarmup_steps: int = 0,
        lr_decay_fraction: float = 0.2,
        input_scale: float = 1.0,
        target_scale: float | None = None,
    ) -> None:
        """
        Args:
            d_in: Input dimension n (read from the data file).
            d_sae: Number of features m.
            d_out: Output dimension o of a separate target Y (read from the data file's ``targets``;
                None: the SAE reconstructs its input, X = Y).
            encoder: The nonlinearity, e.g. ``lightning_sae.encoders.JumpReLU``.
            penalties: Loss terms added to the reconstruction loss, each with its coefficient.
            lr: Adam learning rate (seed 000: 2e-4).
            betas: Adam betas (seed 000: 0.9, 0.999; no weight decay).
            lr_warmup_steps: Cosine warmup from lr/10 at the start (seed 001: 1000; 0: none).
            lr_rewarmup_steps: Cosine re-warmup from lr/10 after each resampling (seed 001: 1000).
            lr_decay_fraction: Linear decay to zero over this last fraction of training (seed 000: 0.2).
            input_scale: Multiplier of x making E‖x‖₂ = √d_in (estimated from the data file).
            target_scale: Multiplier of y making E‖y‖₂ = √d_out (None: input_scale).
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
        self.encoder = encoder(d_sae)
        self.penalties = nn.ModuleList(penalties or [])
        self.penalty_names = _unique_names([penalty.name for penalty in self.penalties])
        for penalty in self.penalties:
            penalty.bind(d_in, d_sae, self.encoder)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.register_buffer("target_scale", torch.tensor(float(target_scale or input_scale)))
        self.val_metrics = reconstruction_metrics(d_sae, prefix="val/")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seed 000's initialisation.

        W_d ~ U(−1/√n, 1/√n); W_e = (n/m)·W_dᵀ when X = Y, else W_e ~ U(−1/√m, 1/√m);
        b_e = 0 (the calibration callback sets it), b_d = 0.
        """
        bound = self.d_in**-0.5
        self.W_dec.uniform_(-bound, bound)
        if self.reconstructs_input:
            self.W_enc.copy_(self.W_dec.T * (self.d_in / self.d_sae))
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
        if y is None or y is x:
            y_scaled = x_scaled if self.reconstructs_input else None
        else:
            y_scaled = y.to(self.W_enc.dtype) * self.target_scale
        if y_scaled is None:
            raise UserError("this model maps X to a different Y: batches must carry targets")
        pre_acts = x_scaled @ self.W_enc + self.b_enc
        decoder_norms = self.decoder_norms()
        features = self.encoder(pre_acts, decoder_norms)
        reconstruction = features @ self.W_dec + self.b_dec
        return SAEOutput(x_scaled, y_scaled, pre_acts, features, reconstruction, decoder_norms, self.W_dec)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations f of raw rows x, [B, m]."""
        pre_acts = x.to(self.W_enc.dtype) * self.input_scale @ self.W_enc + self.b_enc
        return self.encoder(pre_acts, self.decoder_norms())

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ŷ of raw rows x, in the raw (unscaled) target space."""
        return (self.encode(x) @ self.W_dec + self.b_dec) / self.target_scale

    # -------------------------------------------------------------------- loss
    def loss(self, out: SAEOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its unweighted terms: ``mse`` = ‖y − ŷ‖² and one per penalty."""
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
        total, terms = self.loss(out)
        rows = out.input.shape[0]
        if self.logs_this_step():
            logs = {f"train/{name}": value.detach() for name, value in terms.items()}
            logs["train/loss"] = total.detach()
            logs["train/l0"] = (out.features > 0).sum(-1).float().mean()
            logs["train/lr"] = self.optimizers().param_groups[0]["lr"]
            for name, penalty in zip(self.penalty_names, self.penalties):
                logs[f"train/{name}_coefficient"] = penalty.current_coefficient
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=rows)
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

    # --------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas, weight_decay=0.0)
        total_steps = self.trainer.estimated_stepping_batches
        if not 0 < total_steps < float("inf"):
            raise UserError("the number of training steps is unknown: set trainer.max_steps")
        schedule = WarmupDecaySchedule(
            optimizer,
            total_steps=int(total_steps),
            warmup_steps=self.hparams.lr_warmup_steps,
            rewarmup_steps=self.hparams.lr_rewarmup_steps,
            decay_fraction=self.hparams.lr_decay_fraction,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def restart_lr_warmup(self) -> None:
        """Start the post-resampling learning-rate re-warmup (seed 001)."""
        schedule = self.lr_schedulers()
        assert isinstance(schedule, WarmupDecaySchedule)
        schedule.restart_warmup()

    # ----------------------------------------------------------- persistence
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["plugins"] = {
            "encoder": plugin_spec(self.encoder, skip=("d_sae",)),
            "penalties": [plugin_spec(penalty) for penalty in self.penalties],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint["state_dict"]["W_enc"].shape
        if tuple(stored) != tuple(self.W_enc.shape):
            raise UserError(
                f"checkpoint has d_in={stored[0]}, d_sae={stored[1]} but this run has "
                f"d_in={self.d_in}, d_sae={self.d_sae}: is it the same data file and config?"
            )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SparseAutoencoder:
        """Rebuild a model, plugins included, from a Lightning checkpoint written by ``fit``."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "plugins" not in checkpoint:
            raise UserError(f"{path} is not a lightning_sae checkpoint (no plugin description)")
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

    @classmethod
    def from_export(cls, directory: str | Path) -> SparseAutoencoder:
        """Rebuild a model from an export directory (see :func:`lightning_sae.export.load_export`)."""
        from lightning_sae.export import load_export

        return load_export(directory)


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
