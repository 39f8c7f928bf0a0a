"""Evaluation metrics for sparse autoencoders, as torchmetrics ``Metric`` subclasses.

Every metric keeps only additive states registered with ``dist_reduce_fx="sum"``: a metric
updated on several ranks and synced (or combined with ``Metric.merge_state``) equals the
same metric updated once on the concatenated rows. Ratios are formed in ``compute`` from
the summed totals, never by averaging per-batch ratios.

All metrics share one update signature so that a ``MetricCollection`` can feed them the
same arguments::

    update(target, reconstruction, features, decoder_norms=None)

- ``target``          [B, d]  the vector the SAE must reconstruct, y (the input activation
  for a plain SAE, the output activation for a transcoder);
- ``reconstruction``  [B, d]  the SAE's output, ŷ;
- ``features``        [B, m]  the feature activations f >= 0; a feature is *active* on a
  row when f > 0, so the exact zeros of TopK or JumpReLU count as inactive;
- ``decoder_norms``   [m], optional, the L2 norms of the decoder rows ‖W_d,i‖; only
  ``L1`` reads it.

Arguments a metric does not need are ignored. Inputs may be float16/bfloat16: per-row
quantities are computed in at least float32, totals are accumulated in float64 (counts in
int64) and ``compute`` returns float32.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = [
    "L0",
    "L1",
    "MSE",
    "CosineSimilarity",
    "DeadFraction",
    "DenseFraction",
    "ExplainedVariance",
    "FeatureDensity",
    "FractionOfVarianceUnexplained",
    "RelativeReconstructionBias",
    "log10_feature_density",
    "reconstruction_metrics",
]

DEFAULT_DENSE_THRESHOLD = 0.1


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` unchanged if it is float32 or float64, else converted to float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_inputs(target: Tensor, reconstruction: Tensor, features: Tensor) -> None:
    """Raise ``ValueError`` unless target/reconstruction are [B, d] and features is [B, m]."""
    if target.ndim != 2 or reconstruction.shape != target.shape:
        raise ValueError(
            "target and reconstruction must both have shape [batch, d]; got "
            f"{tuple(target.shape)} and {tuple(reconstruction.shape)}"
        )
    if features.ndim != 2 or features.shape[0] != target.shape[0]:
        raise ValueError(
            f"features must have shape [batch, d_sae] with batch {target.shape[0]}; "
            f"got {tuple(features.shape)}"
        )


class _SAEMetric(Metric):
    """Base of every metric here: the shared update signature and its input checks.

    Subclasses register their states in ``__init__`` and implement ``_accumulate``.
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None

    def _add_sum_state(self, name: str, default: Tensor) -> None:
        """Register an additive state: synced across ranks by summation."""
        self.add_state(name, default=default, dist_reduce_fx="sum")

    def update(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None = None,
    ) -> None:
        """Add one batch of rows; see the module docstring for the arguments."""
        _check_inputs(target, reconstruction, features)
        self._accumulate(target, reconstruction, features, decoder_norms)

    @abstractmethod
    def _accumulate(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> None:
        """Add the batch's contribution to the states; inputs are already checked."""


class _RowMean(_SAEMetric):
    """Base of the metrics that average one value per row over every evaluated row."""

    total: Tensor
    rows: Tensor

    def __init__(self) -> None:
        super().__init__()
        self._add_sum_state("total", torch.tensor(0.0, dtype=torch.float64))
        self._add_sum_state("rows", torch.tensor(0, dtype=torch.int64))

    def _accumulate(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> None:
        self.total += self.row_values(target, reconstruction, features, decoder_norms).sum(dtype=torch.float64)
        self.rows += target.shape[0]

    @abstractmethod
    def row_values(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> Tensor:
        """The per-row value [B] to average."""

    def compute(self) -> Tensor:
        """Mean of the per-row values over all rows (float32 scalar)."""
        return (self.total / self.rows).float()


class L0(_RowMean):
    """Mean number of active features per row: L0 = (1/N) Σ_n #{i : f_n,i > 0}.

    The standard sparsity measure of the SAE literature (e.g. Bricken et al. 2023, "Towards
    Monosemanticity"). Exact zeros are inactive; negative values would be too, but SAE
    features are non-negative by construction.
    """

    def row_values(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> Tensor:
        return (features > 0).sum(dim=-1)


class MSE(_RowMean):
    """Mean squared reconstruction error per row: MSE = (1/N) Σ_n ‖y_n − ŷ_n‖².

    The squared error is *summed* over the d dimensions and averaged over rows only, the
    convention of the SAE training loss in Anthropic's "Circuits Updates — January 2025"
    (https://transformer-circuits.pub/2025/january-update/index.html). It is therefore d
    times ``torch.nn.functional.mse_loss``, which also averages over dimensions.
    """

    higher_is_better = False

    def row_values(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> Tensor:
        return (_at_least_float32(target) - _at_least_float32(reconstruction)).pow(2).sum(dim=-1)


class FractionOfVarianceUnexplained(_SAEMetric):
    """Fraction of the target's variance the reconstruction leaves unexplained, over all rows.

    FVU = Σ_n ‖y_n − ŷ_n‖² / Σ_n ‖y_n − ȳ‖², with ȳ the per-dimension mean of y over the
    whole evaluated set (the normalized MSE of e.g. Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders"). Both sums run over every evaluated row: this is not the mean of
    per-batch FVUs, which weights batches wrongly and measures each batch's variance about
    its own mean.

    The states are Σ‖y − ŷ‖², Σy [d], Σy² [d] and N, all float64; the denominator is formed
    exactly at the end as Σ_j (Σ_n y_n,j² − (Σ_n y_n,j)² / N). It is 0 (FVU inf or nan)
    when the target is constant.

    Args:
        d_target: the dimension d of the target. When given, the per-dimension states are
            allocated up front. When ``None`` they start as scalar zeros and take the shape
            [d] at the first update; under DDP every rank must then see at least one batch
            before ``compute`` syncs, since ranks cannot gather states of different shapes.
    """

    residual_sum_squares: Tensor
    target_sum: Tensor
    target_sum_squares: Tensor
    rows: Tensor

    higher_is_better = False

    def __init__(self, d_target: int | None = None) -> None:
        super().__init__()
        self.d_target = d_target
        shape = () if d_target is None else (d_target,)
        self._add_sum_state("residual_sum_squares", torch.tensor(0.0, dtype=torch.float64))
        self._add_sum_state("target_sum", torch.zeros(shape, dtype=torch.float64))
        self._add_sum_state("target_sum_squares", torch.zeros(shape, dtype=torch.float64))
        self._add_sum_state("rows", torch.tensor(0, dtype=torch.int64))

    def _accumulate(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> None:
        if self.d_target is not None and target.shape[1] != self.d_target:
            raise ValueError(f"target has dimension {target.shape[1]}, expected {self.d_target}")
        y = target.double()
        self.residual_sum_squares += (y - reconstruction.double()).pow(2).sum()
        self.target_sum = self.target_sum + y.sum(dim=0)
        self.target_sum_squares = self.target_sum_squares + y.pow(2).sum(dim=0)
        self.rows += target.shape[0]

    def _fvu(self) -> Tensor:
        """FVU in float64, from the summed states."""
        total_sum_squares = (self.target_sum_squares - self.target_sum.pow(2) / self.rows).sum()
        return self.residual_sum_squares / total_sum_squares

    def compute(self) -> Tensor:
        """Residual sum of squares over total sum of squares (float32 scalar)."""
        return self._fvu().float()


class ExplainedVariance(FractionOfVarianceUnexplained):
    """Fraction of the target's variance explained by the reconstruction: 1 − FVU.

    Same states and definition as ``FractionOfVarianceUnexplained`` (whole-set, not per
    batch); in a ``MetricCollection`` the two share one set of states.
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        """One minus the fraction of variance unexplained (float32 scalar)."""
        return (1.0 - self._fvu()).float()


class CosineSimilarity(_RowMean):
    """Mean cosine similarity between target and reconstruction: (1/N) Σ_n cos(y_n, ŷ_n).

    cos(y, ŷ) = y·ŷ / (max(‖y‖, ε) · max(‖ŷ‖, ε)) with ε = 1e-8, as in
    ``torch.nn.functional.cosine_similarity``; a zero vector has similarity 0.
    """

    higher_is_better = True

    def row_values(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> Tensor:
        return F.cosine_similarity(_at_least_float32(target), _at_least_float32(reconstruction), dim=-1, eps=1e-8)


class RelativeReconstructionBias(_SAEMetric):
    """Relative reconstruction bias γ of Rajamanoharan et al. 2024, "Improving Dictionary
    Learning with Gated Sparse Autoencoders" (arXiv:2404.16014).

    γ = argmin_γ' E‖ŷ/γ' − y‖², whose closed form is γ = E[‖ŷ‖²] / E[ŷ·y]
    (set c = 1/γ': the least-squares scale c = E[ŷ·y] / E[‖ŷ‖²]). γ = 1 for an unbiased
    reconstruction; γ < 1 means the reconstruction is shrunk towards zero, the bias the L1
    penalty induces. The expectations are taken over every evaluated row. γ is inf or nan
    when Σ ŷ·y = 0.
    """

    reconstruction_sum_squares: Tensor
    reconstruction_dot_target: Tensor

    def __init__(self) -> None:
        super().__init__()
        self._add_sum_state("reconstruction_sum_squares", torch.tensor(0.0, dtype=torch.float64))
        self._add_sum_state("reconstruction_dot_target", torch.tensor(0.0, dtype=torch.float64))

    def _accumulate(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> None:
        y = _at_least_float32(target)
        y_hat = _at_least_float32(reconstruction)
        self.reconstruction_sum_squares += y_hat.pow(2).sum(dim=-1).sum(dtype=torch.float64)
        self.reconstruction_dot_target += (y_hat * y).sum(dim=-1).sum(dtype=torch.float64)

    def compute(self) -> Tensor:
        """Σ‖ŷ‖² / Σ ŷ·y (float32 scalar)."""
        return (self.reconstruction_sum_squares / self.reconstruction_dot_target).float()


class L1(_RowMean):
    """Mean L1 norm of the feature activations per row: (1/N) Σ_n Σ_i f_n,i.

    When ``decoder_norms`` [m] is passed to ``update``, each feature is weighted by the norm
    of its decoder row: (1/N) Σ_n Σ_i f_n,i ‖W_d,i‖, the sparsity penalty of Anthropic's
    "Circuits Updates — April 2024" training recipe, which makes the penalty invariant to
    moving a scale factor between a feature's activation and its decoder row. Pass it on
    every update or on none.
    """

    def row_values(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> Tensor:
        f = _at_least_float32(features)
        if decoder_norms is None:
            return f.sum(dim=-1)
        if decoder_norms.shape != (features.shape[1],):
            raise ValueError(
                f"decoder_norms must have shape [{features.shape[1]}]; got {tuple(decoder_norms.shape)}"
            )
        return f @ decoder_norms.to(f.dtype)


class FeatureDensity(_SAEMetric):
    """Per-feature firing frequency: density_i = #{n : f_n,i > 0} / N over the evaluated rows.

    The feature density of Bricken et al. 2023, "Towards Monosemanticity", usually shown
    as a histogram of log10 density (see ``log10_feature_density``). The states are the
    firing counts [m] (int64) and the row count N. ``DeadFraction`` and ``DenseFraction``
    reuse these states and only change ``compute``.

    Args:
        d_sae: the number of features m.
    """

    fire_counts: Tensor
    rows: Tensor

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        if d_sae < 1:
            raise ValueError(f"d_sae must be positive; got {d_sae}")
        self.d_sae = d_sae
        self._add_sum_state("fire_counts", torch.zeros(d_sae, dtype=torch.int64))
        self._add_sum_state("rows", torch.tensor(0, dtype=torch.int64))

    def _accumulate(
        self,
        target: Tensor,
        reconstruction: Tensor,
        features: Tensor,
        decoder_norms: Tensor | None,
    ) -> None:
        if features.shape[1] != self.d_sae:
            raise ValueError(
                f"features have {features.shape[1]} columns, expected d_sae={self.d_sae}"
            )
        self.fire_counts += (features > 0).sum(dim=0)
        self.rows += features.shape[0]

    def _density(self) -> Tensor:
        """Firing frequency of each feature [m], float64."""
        return self.fire_counts.double() / self.rows

    def compute(self) -> Tensor:
        """Firing frequency of each feature, shape [m] (float32)."""
        return self._density().float()


class DeadFraction(FeatureDensity):
    """Fraction of features that never fired on the evaluated rows: #{i : density_i = 0} / m.

    "Dead" is relative to the rows seen since the last ``reset``: evaluate on enough rows
    (typically millions of tokens) for a rare feature to have a chance to fire. Shares the
    states of ``FeatureDensity``.
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        """Fraction of the m features with zero firings (float32 scalar)."""
        return (self.fire_counts == 0).double().mean().float()


class DenseFraction(FeatureDensity):
    """Fraction of features firing on more than ``threshold`` of the evaluated rows.

    #{i : density_i > threshold} / m. Features active on over 10% of tokens (the default
    threshold) are the "high-frequency" features reported by Rajamanoharan et al. 2024,
    "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders"
    (arXiv:2407.14435). Shares
    the states of ``FeatureDensity``.

    Args:
        d_sae: the number of features m.
        threshold: density above which a feature counts as dense, in [0, 1).
    """

    higher_is_better = False

    def __init__(self, d_sae: int, threshold: float = DEFAULT_DENSE_THRESHOLD) -> None:
        super().__init__(d_sae)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1); got {threshold}")
        self.threshold = threshold

    def compute(self) -> Tensor:
        """Fraction of the m features with density above ``threshold`` (float32 scalar)."""
        return (self._density() > self.threshold).double().mean().float()


def log10_feature_density(density: Tensor, eps: float = 1e-10) -> Tensor:
    """log10(density + eps), elementwise: the x-axis of the usual feature-density histogram.

    ``density`` is the [m] output of ``FeatureDensity.compute``. ``eps`` keeps dead features
    finite: they land at log10(eps) (-10 by default), well left of any feature that fired.
    """
    return torch.log10(density.double() + eps).float()


def reconstruction_metrics(
    d_sae: int,
    prefix: str,
    d_target: int | None = None,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
    densities: bool = True,
) -> MetricCollection:
    """All scalar SAE metrics in one ``MetricCollection``, keys prefixed by ``prefix``.

    Keys (after the prefix): ``l0``, ``mse``, ``fvu``, ``cosine_similarity``,
    ``relative_reconstruction_bias``, ``l1``, and with ``densities`` ``dead_fraction`` and
    ``dense_fraction``. Update it with ``update(target=..., reconstruction=..., features=...,
    decoder_norms=...)``. ``dead_fraction`` and ``dense_fraction`` share one set of
    firing counts through the collection's compute groups, named here: torchmetrics' automatic
    grouping would merge every metric whose states happen to be equal after the first update
    (L0, L1 and cosine similarity are all 0 on a first batch where no feature fires) and then
    report one value for all of them.

    Args:
        d_sae: the number of features m.
        prefix: prepended to every key, e.g. ``"val/"``.
        d_target: the target dimension d; pass it under DDP so the FVU states have their
            final shape before any update (see ``FractionOfVarianceUnexplained``).
        dense_threshold: see ``DenseFraction``.
        densities: include the dead and dense fractions (which need many rows to mean anything:
            training logs them from the model's firing counter instead).
    """
    metrics: dict[str, Metric] = {
        "l0": L0(),
        "mse": MSE(),
        "fvu": FractionOfVarianceUnexplained(d_target),
        "cosine_similarity": CosineSimilarity(),
        "relative_reconstruction_bias": RelativeReconstructionBias(),
        "l1": L1(),
    }
    if densities:
        metrics["dead_fraction"] = DeadFraction(d_sae)
        metrics["dense_fraction"] = DenseFraction(d_sae, dense_threshold)
    groups = [["dead_fraction", "dense_fraction"]] if densities else False
    return MetricCollection(metrics, prefix=prefix, compute_groups=groups)
