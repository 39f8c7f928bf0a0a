"""``DecoderBiasInit``: at fit start, put b_dec at the centre of the data."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_sae.callbacks.data_init import DataInitialisation
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder

CentreMethod = Literal["geometric_median", "mean"]


def geometric_median(points: Tensor, iterations: int = 100, tolerance: float = 1e-6) -> Tensor:
    """argmin_c Σ_n ‖x_n − c‖₂ of rows ``points`` [N, d], by Weiszfeld's algorithm.

    c ← Σ w_n x_n / Σ w_n with w_n = 1 / ‖x_n − c‖, from the mean, until c moves by less than
    ``tolerance`` times its scale. Distances are floored so a c that lands on a row stays finite.
    """
    points = points.double()
    centre = points.mean(0)
    scale = points.norm(dim=1).mean().clamp_min(1e-12)
    for _ in range(iterations):
        weights = 1 / (points - centre).norm(dim=1).clamp_min(1e-12 * scale)
        moved = (weights[:, None] * points).sum(0) / weights.sum()
        converged = (moved - centre).norm() <= tolerance * scale
        centre = moved
        if converged:
            break
    return centre


class DecoderBiasInit(DataInitialisation):
    """b_dec = the geometric median (or mean) of ``sample_rows`` training targets, at a fresh fit start.

    Bricken et al. 2023 ("Towards Monosemanticity") and Gao et al. 2024 initialise the bias that is
    subtracted from the input and added back to the output (``center_input``) at the geometric
    median of a data sample, so that the features start by describing the spread of the data
    around its centre rather than the centre itself. The targets are y (= x for an SAE), scaled as
    the model scales them. Computed at a fresh start only, on rank 0 (see
    :class:`~lightning_sae.callbacks.data_init.DataInitialisation`). List it before
    ``EncoderBiasCalibration``, which reads x − b_dec.
    """

    def __init__(self, method: CentreMethod = "geometric_median", sample_rows: int = 65_536, seed: int = 0) -> None:
        """
        Args:
            method: "geometric_median" (Bricken et al. 2023, Gao et al. 2024) or "mean".
            sample_rows: Training rows the centre is computed from.
            seed: Seed of the choice of rows.
        """
        if method not in ("geometric_median", "mean"):
            raise UserError(f"DecoderBiasInit method must be 'geometric_median' or 'mean', got {method!r}")
        if sample_rows < 1:
            raise UserError(f"DecoderBiasInit sample_rows must be positive, got {sample_rows}")
        super().__init__(sample_rows, seed)
        self.method = method

    def parameter(self, model: SparseAutoencoder) -> nn.Parameter:
        return model.b_dec

    def compute(self, model: SparseAutoencoder, x: Tensor, y: Tensor | None) -> Tensor:
        targets = (x if y is None else y).double() * model.target_scale.double()
        centre = geometric_median(targets) if self.method == "geometric_median" else targets.mean(0)
        rank_zero_info(f"DecoderBiasInit: b_dec set to the {self.method.replace('_', ' ')} of {len(targets)} rows")
        return centre
