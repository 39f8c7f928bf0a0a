"""Penalty plugins: the loss terms added to the reconstruction loss ‖y − ŷ‖².

Each penalty returns its *unweighted* value, averaged over the batch; the model adds
``coefficient · factor · value``. ``coefficient`` is the configured value; ``factor`` (1 unless a
callback sets it: a float or a scalar tensor on the device) is what a schedule (``SparsityWarmup``)
or a controller (``TargetL0``) changes during training.
A new penalty subclasses :class:`Penalty` and implements ``forward``.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_sae.decoding import decode_selected
from lightning_sae.encoders import Encoder, JumpReLU
from lightning_sae.errors import UserError
from lightning_sae.output import SAEOutput


class Penalty(nn.Module):
    """Base class: a weighted loss term computed from one forward pass."""

    sparsity: ClassVar[bool] = False
    """Whether the penalty prices active features (a sparsity penalty, warmed up by default)."""

    def __init__(self, coefficient: float) -> None:
        super().__init__()
        if coefficient < 0:
            raise UserError(f"{type(self).__name__} coefficient must be >= 0, got {coefficient}")
        self.coefficient = coefficient
        self.factor: float | Tensor = 1.0

    @property
    def name(self) -> str:
        """snake_case class name, used for logging (``train/<name>``)."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(self).__name__).lower()

    @property
    def current_coefficient(self) -> float | Tensor:
        """The coefficient in force now: coefficient · factor."""
        return self.coefficient * self.factor

    def bind(self, d_in: int, d_sae: int, encoder: Encoder) -> None:
        """Check compatibility with the model and allocate state; called once by the model."""

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        raise NotImplementedError


class L1(Penalty):
    """λ Σ_i |f_i|·‖W_d,i‖₂ (Towards Monosemanticity; seed 002).

    Equal to the L1 norm of the per-feature decoder contributions ‖f_i W_d,i‖₂, computed from the
    [m] column norms without materialising the [B, m, o] tensor (seed 002's memory trick).
    """

    sparsity: ClassVar[bool] = True

    def __init__(self, coefficient: float = 5.0) -> None:
        """
        Args:
            coefficient: λ (seed 002: Anthropic used 5 with a summed L2 loss).
        """
        super().__init__(coefficient)

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        return (out.features.abs() * out.decoder_norms).sum(-1).mean()


class Tanh(Penalty):
    """λ_S Σ_i tanh(c·|f_i|·‖W_d,i‖₂) (seed 000).

    Through a :class:`~lightning_sae.encoders.JumpReLU` the same value is computed as
    Σ_i H(h_i − θ_i)·tanh(c·h_i·‖W_d,i‖), with H taken through the encoder's straight-through
    estimator, so the gradient at a threshold is the penalty's jump there, tanh(c·θ_i‖W_d,i‖).
    The chain rule through the JumpReLU's pseudo-derivative would use tanh's slope at f = θ_i
    instead, ≈ 0 once c·θ_i‖W_d,i‖ ≫ 1, and leave the thresholds without sparsity pressure (on
    the recipe test's toy: MMCS 0.80 that way, 0.93 this way).
    """

    sparsity: ClassVar[bool] = True

    def __init__(self, coefficient: float = 20.0, c: float = 4.0) -> None:
        """
        Args:
            coefficient: λ_S (seed 000: "a reasonable default for λ_S is 20").
            c: Tanh sharpness (seed 000: c=4).
        """
        super().__init__(coefficient)
        self.c = c

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        if isinstance(encoder, JumpReLU):
            gate = encoder.step(out.pre_acts, out.decoder_norms)
            return (gate * torch.tanh(self.c * out.pre_acts.clamp_min(0) * out.decoder_norms)).sum(-1).mean()
        return torch.tanh(self.c * out.features.abs() * out.decoder_norms).sum(-1).mean()


class L0(Penalty):
    """λ Σ_i H(h_i − θ_i), trained through the JumpReLU's straight-through estimator.

    Rajamanoharan et al. 2024, eq. 12; needs a :class:`~lightning_sae.encoders.JumpReLU` encoder,
    whose bandwidth and STE variant it uses.
    """

    sparsity: ClassVar[bool] = True

    def __init__(self, coefficient: float = 1e-3) -> None:
        """
        Args:
            coefficient: λ, the price of one active feature per row.
        """
        super().__init__(coefficient)

    def bind(self, d_in: int, d_sae: int, encoder: Encoder) -> None:
        if not isinstance(encoder, JumpReLU):
            raise UserError(f"the L0 penalty needs a JumpReLU encoder, not {type(encoder).__name__}")

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        assert isinstance(encoder, JumpReLU)
        return encoder.step(out.pre_acts, out.decoder_norms).sum(-1).mean()


class PreAct(Penalty):
    """λ_P Σ_i ReLU(θ_i − h_i)·‖W_d,i‖₂ on the pre-activation h (seed 000's pre-act loss).

    θ_i is the encoder's threshold (exp(t_i) for JumpReLU, 0 for ReLU). The seed writes f_i, but
    f_i = 0 for an inactive feature would give it no gradient; on h every feature that does not
    fire is pulled towards its threshold, which is what the recipe uses it for.
    """

    def __init__(self, coefficient: float = 3e-6) -> None:
        """
        Args:
            coefficient: λ_P (seed 000: 3e-6).
        """
        super().__init__(coefficient)

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        gap = torch.relu(encoder.threshold(out.decoder_norms) - out.pre_acts)
        return (gap * out.decoder_norms).sum(-1).mean()


class AuxK(Penalty):
    """α‖e − ê‖² with e = y − ŷ and ê the decoding of the top-k_aux *dead* features' activations.

    Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", section A.2): gives dead
    latents of TopK/BatchTopK SAEs a gradient. The dead features are those of the model's firing
    counter (``model.dead_after_tokens``); with none dead the term is 0. No host synchronisation:
    the search runs over the columns of the D dead features that the host last knew of
    (``SAEOutput.dead_count``, then a selection of D columns on the device), or over every
    feature with the alive ones at −∞ when D is unknown or large.
    """

    def __init__(self, coefficient: float = 1 / 32, k_aux: int | None = None) -> None:
        """
        Args:
            coefficient: α (Gao et al.: 1/32).
            k_aux: Dead features used for the auxiliary reconstruction (default d_in // 2).
        """
        super().__init__(coefficient)
        self.k_aux = k_aux

    def bind(self, d_in: int, d_sae: int, encoder: Encoder) -> None:
        self.k_aux = min(self.k_aux or max(1, d_in // 2), d_sae)
        if self.k_aux < 1:
            raise UserError(f"AuxK k_aux must be >= 1, got {self.k_aux}")

    def forward(self, out: SAEOutput, encoder: Encoder) -> Tensor:
        d_sae = out.pre_acts.shape[-1]
        if out.dead_count == 0:
            return out.pre_acts.new_zeros((), dtype=torch.float32)
        if 0 < out.dead_count <= d_sae // 2:  # search only the columns of the (known) dead features
            columns = out.dead.to(out.pre_acts.dtype).topk(out.dead_count).indices
            dead_pre_acts = out.pre_acts[..., columns].masked_fill(~out.dead[columns], float("-inf"))
        else:
            columns = None
            dead_pre_acts = out.pre_acts.masked_fill(~out.dead, float("-inf"))
        top = dead_pre_acts.topk(min(self.k_aux, dead_pre_acts.shape[-1]), dim=-1)
        indices = top.indices if columns is None else columns[top.indices]
        residual = (out.target - out.reconstruction).detach()
        decoded = decode_selected(torch.relu(top.values), indices, out.W_dec)
        return (residual - decoded).pow(2).sum(-1).mean() * out.dead.any()
