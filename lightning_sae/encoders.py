"""Encoder plugins: the nonlinearity that maps pre-activations h = x·W_enc + b_enc to features f.

An encoder is constructed with the dictionary size ``d_sae`` (the model passes it; YAML names the
class by ``class_path`` and sets the other arguments). A new encoder subclasses :class:`Encoder`
and implements ``forward``; nothing else needs editing.

Every encoder receives the decoder row norms ‖W_d,i‖ together with h. Selection-based encoders
(TopK, BatchTopK) rank features by the *effective* activation h_i·‖W_d,i‖ (Anthropic, seed 000:
"a feature's activation is now f_i‖W_d,i‖"), so folding the decoder norms into the encoder
(:meth:`Encoder.rescale_`) never changes which features are selected.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_sae.errors import UserError

SteVariant = Literal["anthropic", "paper"]


def in_window(pre_acts: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((h − θ)/ε) for the rectangle kernel K(u) = 1 if −1/2 < u < 1/2 else 0 (JumpReLU paper,
    eq. 10), as a bool mask θ − ε/2 < h < θ + ε/2 computed without a [..., m] float temporary."""
    half = bandwidth / 2
    return (pre_acts > threshold - half) & (pre_acts < threshold + half)


def _sum_to_features(grad: Tensor) -> Tensor:
    """Sum a [..., m] gradient over every leading dimension to the [m] parameter shape."""
    return grad.reshape(-1, grad.shape[-1]).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """f = h·H(h − θ), θ = exp(t), with straight-through pseudo-derivatives of bandwidth ε.

    ``variant="anthropic"`` (seed 000):
        ∂f/∂t = −(exp(t)/ε)·K((h − exp(t))/ε)                      (taken w.r.t. t, as written)
        ∂f/∂h = H(h − θ) + (exp(t)/ε)·K((h − exp(t))/ε)            (the STE also reaches h,
                                                                    hence W_enc, b_enc, …)
    ``variant="paper"`` (Rajamanoharan et al. 2024, eq. 11):
        ∂f/∂θ = −(θ/ε)·K((h − θ)/ε), chained through θ = exp(t):  ∂f/∂t = −(θ²/ε)·K(...)
        ∂f/∂h = H(h − θ)                                           (only θ gets the STE)
    """

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, log_threshold: Tensor, bandwidth: float, variant: str) -> Tensor:
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.variant = bandwidth, variant
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        windowed = grad * in_window(pre_acts, threshold, ctx.bandwidth)  # grad·K((h − θ)/ε)
        grad_pre_acts = grad * (pre_acts > threshold)
        scale = threshold / ctx.bandwidth  # θ/ε, per feature
        if ctx.variant == "anthropic":
            grad_pre_acts = torch.addcmul(grad_pre_acts, windowed, scale.to(windowed.dtype))
            grad_log_threshold = -scale * _sum_to_features(windowed)
        else:
            grad_log_threshold = -scale * threshold * _sum_to_features(windowed)
        return grad_pre_acts, grad_log_threshold, None, None


class StepFunction(torch.autograd.Function):
    """H(h − θ), θ = exp(t): the L0 indicator with straight-through pseudo-derivatives.

    ``variant="anthropic"``: ∂H/∂t = −(1/ε)·K((h − θ)/ε) and ∂H/∂h = +(1/ε)·K((h − θ)/ε).
    ``variant="paper"`` (Rajamanoharan et al. 2024, eq. 12): ∂H/∂θ = −(1/ε)·K((h − θ)/ε), chained
    through θ = exp(t) to ∂H/∂t = −(θ/ε)·K(...), and ∂H/∂h = 0.
    """

    @staticmethod
    def forward(ctx: Any, pre_acts: Tensor, log_threshold: Tensor, bandwidth: float, variant: str) -> Tensor:
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth, ctx.variant = bandwidth, variant
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        pre_acts, threshold = ctx.saved_tensors
        windowed = grad * in_window(pre_acts, threshold, ctx.bandwidth)  # grad·K((h − θ)/ε)
        grad_log_threshold = -_sum_to_features(windowed) / ctx.bandwidth
        if ctx.variant == "anthropic":
            return windowed / ctx.bandwidth, grad_log_threshold, None, None
        return torch.zeros_like(pre_acts), grad_log_threshold * threshold, None, None


class Encoder(nn.Module):
    """Base class: features f = encoder(h, ‖W_d‖) from pre-activations h [..., d_sae].

    A subclass states what it is: ``saelens_architecture`` names the SAELens encoder it computes
    exactly (None: none, and the SAE cannot be exported), and ``rescale_`` says how it follows a
    rescaling of the pre-activations (not implemented: the SAE cannot be folded). Neither is
    guessed: an SAE is never exported or folded as something it is not.
    """

    saelens_architecture: ClassVar[str | None] = None
    """The ``architecture`` an export of this encoder declares in SAELens' cfg.json, if any."""

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.d_sae = d_sae

    def forward(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        raise NotImplementedError

    def threshold(self, decoder_norms: Tensor) -> Tensor:
        """Per-feature value h_i must exceed to fire, [d_sae] (0 for a ReLU)."""
        return torch.zeros_like(decoder_norms)

    def selection_size(self) -> int | None:
        """k when every row keeps exactly k features (TopK), else None."""
        return None

    def select(self, pre_acts: Tensor, decoder_norms: Tensor) -> tuple[Tensor, Tensor]:
        """The features as (values [..., k], indices [..., k]) of an encoder with a
        :meth:`selection_size`, so the decoder can gather k rows of W_dec instead of multiplying
        all d_sae; ``forward`` is the scatter of these."""
        raise NotImplementedError(f"{type(self).__name__} keeps no fixed number of features per row")

    def rescale_(self, pre_act_scale: Tensor, decoder_norm_scale: Tensor) -> None:
        """Adjust own parameters after h_i is multiplied by ``pre_act_scale[i]`` and ‖W_d,i‖ by
        ``decoder_norm_scale[i]`` (both > 0), so that f_i is multiplied by ``pre_act_scale[i]``.

        Folding calls it with products pre_act_scale·decoder_norm_scale equal for all features,
        so the ranking of effective activations h_i·‖W_d,i‖ is unchanged. Positively homogeneous
        encoders (f(a·h) = a·f(h) for a > 0: ReLU, TopK) have nothing to do; the base class refuses,
        since an encoder that does not implement this cannot be folded exactly.
        """
        raise UserError(
            f"{type(self).__name__} cannot be folded: implement its rescale_ (nothing to do if f(a·h) = a·f(h) "
            "for a > 0), or leave out DecoderNormFolding and the export"
        )

    def learning_rate_scales(self) -> dict[str, float]:
        """Multipliers of the model's learning rate for some of this encoder's own parameters, by
        parameter name (the others: 1)."""
        return {}

    @classmethod
    def can_fold(cls) -> bool:
        """Whether the encoder implements :meth:`rescale_`, so that the SAE can be folded."""
        return cls.rescale_ is not Encoder.rescale_

    def saelens_config(self) -> dict[str, Any]:
        """Extra cfg.json entries of an SAELens export (e.g. ``k`` for TopK)."""
        return {}


class ReLU(Encoder):
    """f = ReLU(h): the standard SAE (Towards Monosemanticity; Bricken et al. 2023)."""

    saelens_architecture: ClassVar[str | None] = "standard"

    def forward(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        return torch.relu(pre_acts)

    def rescale_(self, pre_act_scale: Tensor, decoder_norm_scale: Tensor) -> None:
        """Positively homogeneous: nothing to adjust."""


ThresholdUnits = Literal["pre_activation", "effective"]


class JumpReLU(Encoder):
    """f = h·H(h − exp(t)) with learned log-thresholds t (seed 000; Rajamanoharan et al. 2024).

    Gradients through the discontinuity use the straight-through estimator of
    :class:`JumpReLUFunction`, selected by ``ste``. With ``threshold_units="effective"`` the jump
    is taken on the effective activation u = h·‖W_d,i‖ instead (seed 000: "a feature's activation
    is now f_i‖W_d,i‖"): f = h·H(u − exp(t)), with the STE and its bandwidth in the units of u.
    Both are the same once the decoder rows have unit norm (after folding), but only the effective
    form is invariant to trading decoder norm against encoder scale: with the threshold on h,
    training can shrink ‖W_d,i‖ and grow h until the threshold no longer cuts anything.
    """

    saelens_architecture: ClassVar[str | None] = "jumprelu"

    def __init__(
        self,
        d_sae: int,
        bandwidth: float = 2.0,
        initial_log_threshold: float = 0.1,
        ste: SteVariant = "anthropic",
        threshold_units: ThresholdUnits = "pre_activation",
        threshold_lr_scale: float = 1.0,
    ) -> None:
        """
        Args:
            d_sae: Number of features (set by the model).
            bandwidth: STE bandwidth ε of the rectangle kernel (seed 000: ε=2).
            initial_log_threshold: Initial log-threshold t (seed 000: t=0.1).
            ste: "anthropic": the STE gradient reaches every parameter (seed 000); "paper": only
                the thresholds (Rajamanoharan et al. 2024).
            threshold_units: "pre_activation": the jump at h = exp(t), as seed 000 and the paper
                write it; "effective": at h·‖W_d,i‖ = exp(t).
            threshold_lr_scale: Multiplier of the model's learning rate for the log-thresholds t (1: one
                learning rate, as in seed 000 and the paper). Adam moves t by about the learning rate
                per step, so at weight learning rates a threshold needs thousands of steps to move by
                a factor e.
        """
        super().__init__(d_sae)
        if bandwidth <= 0:
            raise UserError(f"JumpReLU bandwidth must be positive, got {bandwidth}")
        if ste not in ("anthropic", "paper"):
            raise UserError(f"JumpReLU ste must be 'anthropic' or 'paper', got {ste!r}")
        if not threshold_lr_scale > 0:
            raise UserError(f"JumpReLU threshold_lr_scale must be positive, got {threshold_lr_scale}")
        if threshold_units not in ("pre_activation", "effective"):
            raise UserError(
                f"JumpReLU threshold_units must be 'pre_activation' or 'effective', got {threshold_units!r}"
            )
        self.bandwidth = bandwidth
        self.ste = ste
        self.threshold_units = threshold_units
        self.threshold_lr_scale = threshold_lr_scale
        self.log_threshold = nn.Parameter(torch.full((d_sae,), float(initial_log_threshold)))

    def _gated(self, pre_acts: Tensor, decoder_norms: Tensor) -> tuple[Tensor, Tensor | None]:
        """What the jump is taken on (h, or u = h·‖W_d‖) and the factor back to h (None: 1)."""
        if self.threshold_units == "effective":
            return pre_acts * decoder_norms, decoder_norms
        return pre_acts, None

    def forward(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        gated, norms = self._gated(pre_acts, decoder_norms)
        features = JumpReLUFunction.apply(gated, self.log_threshold, self.bandwidth, self.ste)
        return features if norms is None else features / norms

    def step(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        """H(h − exp(t)) (or H(h·‖W_d‖ − exp(t))) with this encoder's STE: the differentiable L0 indicator."""
        gated, _ = self._gated(pre_acts, decoder_norms)
        return StepFunction.apply(gated, self.log_threshold, self.bandwidth, self.ste)

    def learning_rate_scales(self) -> dict[str, float]:
        return {"log_threshold": self.threshold_lr_scale}

    def threshold(self, decoder_norms: Tensor) -> Tensor:
        threshold = self.log_threshold.exp()
        return threshold / decoder_norms if self.threshold_units == "effective" else threshold

    @torch.no_grad()
    def rescale_(self, pre_act_scale: Tensor, decoder_norm_scale: Tensor) -> None:
        scale = pre_act_scale * decoder_norm_scale if self.threshold_units == "effective" else pre_act_scale
        self.log_threshold.add_(scale.log())

    @torch.no_grad()
    def set_threshold_(self, threshold: Tensor, decoder_norms: Tensor) -> None:
        """Make :meth:`threshold` return ``threshold`` (> 0, in pre-activation units) at these decoder norms."""
        gated = threshold * decoder_norms if self.threshold_units == "effective" else threshold
        self.log_threshold.copy_(gated.log())


class TopK(Encoder):
    """Keep the k largest effective activations h_i·‖W_d,i‖ per row, ReLU'd (Gao et al. 2024)."""

    saelens_architecture: ClassVar[str | None] = "topk"

    def __init__(self, d_sae: int, k: int = 32) -> None:
        """
        Args:
            d_sae: Number of features (set by the model).
            k: Active features per row.
        """
        super().__init__(d_sae)
        if not 0 < k <= d_sae:
            raise UserError(f"TopK k={k} must be between 1 and d_sae={d_sae}")
        self.k = k

    def forward(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        values, indices = self.select(pre_acts, decoder_norms)
        return torch.zeros_like(pre_acts).scatter(-1, indices, values)

    def selection_size(self) -> int:
        return self.k

    def select(self, pre_acts: Tensor, decoder_norms: Tensor) -> tuple[Tensor, Tensor]:
        keys = (pre_acts * decoder_norms.to(pre_acts.dtype)).detach()  # bfloat16 under bf16-mixed
        indices = keys.topk(self.k, dim=-1).indices
        return torch.relu(pre_acts.gather(-1, indices)), indices

    def rescale_(self, pre_act_scale: Tensor, decoder_norm_scale: Tensor) -> None:
        """Positively homogeneous, and folding keeps the ranking of h_i·‖W_d,i‖: nothing to adjust."""

    def saelens_config(self) -> dict[str, Any]:
        return {"k": self.k}


class BatchTopK(Encoder):
    """Keep the batch_size·k largest effective activations in the whole batch (Bussmann et al. 2024).

    Training selects over the batch, so rows average k active features. Inference (``eval()``)
    uses a global threshold on h_i·‖W_d,i‖: a running mean, with momentum, of the smallest
    selected positive key of each training batch.
    """

    saelens_architecture: ClassVar[str | None] = "jumprelu"

    def __init__(self, d_sae: int, k: int = 32, threshold_momentum: float = 0.99) -> None:
        """
        Args:
            d_sae: Number of features (set by the model).
            k: Active features per row, on average over the batch.
            threshold_momentum: Momentum of the running inference threshold.
        """
        super().__init__(d_sae)
        if not 0 < k <= d_sae:
            raise UserError(f"BatchTopK k={k} must be between 1 and d_sae={d_sae}")
        self.k = k
        self.threshold_momentum = threshold_momentum
        self.register_buffer("key_threshold", torch.tensor(-1.0))

    def forward(self, pre_acts: Tensor, decoder_norms: Tensor) -> Tensor:
        keys = (pre_acts * decoder_norms.to(pre_acts.dtype)).detach()
        if not self.training:
            return torch.relu(pre_acts) * (keys > self.key_threshold.clamp(min=0))
        flat_keys = keys.reshape(-1)
        n_keep = min(self.k * keys[..., 0].numel(), flat_keys.numel())
        selected = flat_keys.topk(n_keep).indices
        mask = torch.zeros_like(flat_keys, dtype=torch.bool).index_fill_(0, selected, True).view_as(keys)
        mask &= keys > 0
        self._update_threshold(keys, mask)
        return torch.relu(pre_acts) * mask

    @torch.no_grad()
    def _update_threshold(self, keys: Tensor, selected: Tensor) -> None:
        """Move the running threshold towards the smallest selected key, on the device (no host sync)."""
        smallest = keys.masked_fill(~selected, float("inf")).min()
        running = torch.lerp(self.key_threshold, smallest, 1 - self.threshold_momentum)
        moved = torch.where(self.key_threshold < 0, smallest, running)
        self.key_threshold.copy_(torch.where(selected.any(), moved, self.key_threshold))

    def threshold(self, decoder_norms: Tensor) -> Tensor:
        return self.key_threshold.clamp(min=0) / decoder_norms

    @torch.no_grad()
    def rescale_(self, pre_act_scale: Tensor, decoder_norm_scale: Tensor) -> None:
        key_scale = pre_act_scale * decoder_norm_scale
        if not torch.allclose(key_scale, key_scale[0].expand_as(key_scale)):
            raise ValueError("BatchTopK can only be rescaled by the same key factor for every feature")
        if self.key_threshold >= 0:
            self.key_threshold.mul_(key_scale[0])
