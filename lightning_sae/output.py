"""``SAEOutput``: every tensor one forward pass produces, the input of penalties and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SAEOutput:
    """One forward pass, in the model's scaled space (x·input_scale, y·target_scale).

    Shapes: B rows, n = d_in, m = d_sae, o = d_out.
    """

    input: Tensor
    """x [B, n], scaled."""
    target: Tensor
    """y [B, o], scaled: what the decoder must reconstruct (y = x for an SAE)."""
    pre_acts: Tensor
    """h = x·W_enc + b_enc [B, m]."""
    features: Tensor
    """f = encoder(h) [B, m]."""
    reconstruction: Tensor
    """ŷ = f·W_dec + b_dec [B, o]."""
    decoder_norms: Tensor
    """‖W_d,i‖₂ [m], differentiable."""
    W_dec: Tensor
    """The decoder weight [m, o] (penalties such as AuxK decode with it)."""
    dead: Tensor
    """[m] bool: the features the model's firing counter calls dead (before this batch)."""
    dead_count: int = -1
    """How many features ``dead`` holds as last known on the host, without waiting for the device
    (:meth:`FiringCounter.known_dead_count`; exact on a CPU, a step or two old on a GPU);
    −1: unknown."""
