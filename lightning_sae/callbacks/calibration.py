"""``EncoderBiasCalibration``: set b_enc at fit start so each feature fires at a target rate."""

from __future__ import annotations

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sae.callbacks.data_init import DataInitialisation
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder

QUANTILE_ELEMENTS = 2**24
"""Pre-activations held at once while taking quantiles ([rows, features] chunks of this size)."""


class EncoderBiasCalibration(DataInitialisation):
    """b_i = θ_i − q_i, so that feature i fires (h_i > θ_i) on a fraction r of the rows.

    Seed 000 (Anthropic, January 2025): "We initialize b_e by examining a subset of the data and
    picking a constant per feature such that each feature activates 10000/m of the time."
    Here r = min(``max_rate``, ``features_per_row`` / m), capped because 10000/m exceeds any
    sensible rate for small m (``features_per_row`` None: the model's ``target_l0``, so the SAE
    starts at the L0 it is asked for); q_i is the (1 − r)-quantile of x·W_enc[:, i] over ``sample_rows``
    training rows (scaled by input_scale), taken midway between the ⌊rN⌉-th and (⌊rN⌉+1)-th
    largest values; θ_i is the encoder's threshold (exp(t_i) for JumpReLU, 0 for ReLU).

    Runs at the start of a fresh fit only, on rank 0 (see
    :class:`~lightning_sae.callbacks.data_init.DataInitialisation`).
    """

    def __init__(
        self, features_per_row: float | None = 10_000, max_rate: float = 0.1, sample_rows: int = 65_536, seed: int = 0
    ) -> None:
        """
        Args:
            features_per_row: Features firing per row on average after calibration (seed 000: 10,000);
                None: the model's target_l0.
            max_rate: Cap on the firing rate r (features_per_row/m exceeds any sensible rate when m is small).
            sample_rows: Training rows examined (a random subset of the training data).
            seed: Seed of the choice of rows.
        """
        if features_per_row is not None and features_per_row <= 0:
            raise UserError(f"EncoderBiasCalibration features_per_row must be positive, got {features_per_row}")
        if not 0 < max_rate < 1:
            raise UserError(f"EncoderBiasCalibration max_rate must be in (0, 1), got {max_rate}")
        if sample_rows < 2:
            raise UserError(f"EncoderBiasCalibration sample_rows must be at least 2, got {sample_rows}")
        super().__init__(sample_rows, seed)
        self.features_per_row = features_per_row
        self.max_rate = max_rate

    def target_rate(self, model: SparseAutoencoder) -> float:
        """r = min(max_rate, features_per_row / m)."""
        per_row = self.features_per_row
        if per_row is None:
            per_row = model.target_l0("EncoderBiasCalibration with features_per_row null")
        return min(self.max_rate, per_row / model.d_sae)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check, on every rank and before training, that the firing rate is defined."""
        assert isinstance(pl_module, SparseAutoencoder)
        self.target_rate(pl_module)

    def parameter(self, model: SparseAutoencoder) -> nn.Parameter:
        return model.b_enc

    def compute(self, model: SparseAutoencoder, x: Tensor, y: Tensor | None) -> Tensor:
        biases = self.biases(model, x)
        rate = self.target_rate(model)
        rank_zero_info(f"EncoderBiasCalibration: b_enc set for a firing rate of {rate:.4g} per feature")
        return biases

    @torch.no_grad()
    def biases(self, model: SparseAutoencoder, x: Tensor) -> Tensor:
        """[m] encoder biases making each feature fire on a fraction r of the raw rows ``x``."""
        return firing_rate_biases(model, x, self.target_rate(model), rows_setting="EncoderBiasCalibration sample_rows")


@torch.no_grad()
def firing_rate_biases(
    model: SparseAutoencoder, x: Tensor, rate: float, rows_setting: str, features: Tensor | None = None
) -> Tensor:
    """b_i = θ_i − q_i for every feature (or those indexed by ``features``): the encoder biases
    with which feature i fires on a fraction ``rate`` of the raw rows ``x``.

    q_i is the (1 − rate)-quantile of x·W_enc[:, i] (x scaled by input_scale and as the encoder
    sees it), midway between the ⌊rate·N⌉-th and the next largest value. Too few rows to resolve
    the rate are refused, naming ``rows_setting``, the option that sets how many were read."""
    n_rows = x.shape[0]
    rank = round(rate * n_rows)
    if not 1 <= rank < n_rows:
        raise UserError(
            f"{n_rows} rows cannot resolve a firing rate of {rate:.3g}; raise {rows_setting} or the training data"
        )
    columns = torch.arange(model.d_sae, device=model.W_enc.device) if features is None else features
    x_scaled = model.encoder_input(x.to(model.W_enc.dtype) * model.input_scale)
    cutoffs = torch.empty(len(columns), dtype=model.W_enc.dtype, device=model.W_enc.device)
    width = max(1, QUANTILE_ELEMENTS // n_rows)
    for start in range(0, len(columns), width):
        projections = x_scaled @ model.W_enc[:, columns[start : start + width]]
        top = projections.topk(rank + 1, dim=0).values
        cutoffs[start : start + width] = (top[rank - 1] + top[rank]) / 2
    return model.encoder.threshold(model.decoder_norms())[columns] - cutoffs
