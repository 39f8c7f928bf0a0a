"""Decoding k selected features per row: ŷ = Σ_j v_j·W_dec[i_j], at a cost that grows with k.

A TopK-style encoder keeps k of the m features of each row. The dense decoder scatters them into
an [N, m] matrix and multiplies it by W_dec (O(N·m·o) multiply-adds in the forward and both
backward products); :func:`gather_decode` gathers the k rows of W_dec instead (O(N·k·o) memory
traffic), in the forward and the backward pass. Which is faster depends on k/m and the hardware:
:func:`decode_selected` chooses by :data:`GATHER_BELOW_K_OVER_M`, measured with
``benchmarks/decoding.py`` (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Decoding = Literal["auto", "dense", "sparse"]

GATHER_BELOW_K_OVER_M = {"cpu": 1 / 16, "cuda": 1 / 2048}
"""``decoding="auto"`` gathers when k/m is at most this, per device type (dense on other devices).
Measured: on 2 CPU cores gathering was 2.5× faster already at k/m = 1/32; on an H100 in bf16 the
dense product (tensor cores) stays faster down to k/m ≈ 1/1024 and gathering wins from 1/2048
(k = 32 of m = 65536: 1.2×; of m = 131072: 2.2×)."""


def gather_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[..., j]·W_dec[indices[..., j]], [..., o], by ``embedding_bag``: it gathers and sums
    the k rows in one kernel and adds into only those rows in its backward, in W_dec's dtype."""
    rows = indices.reshape(-1, indices.shape[-1])
    weights = values.reshape(rows.shape).to(W_dec.dtype)
    decoded = torch.nn.functional.embedding_bag(rows, W_dec, per_sample_weights=weights, mode="sum")
    return decoded.reshape(*indices.shape[:-1], W_dec.shape[1])


def dense_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """The same sum as a dense product: values scattered into [..., m] zeros, times W_dec."""
    features = torch.zeros(*values.shape[:-1], W_dec.shape[0], dtype=values.dtype, device=values.device)
    return features.scatter(-1, indices, values) @ W_dec.to(values.dtype)


def gathers(decoding: Decoding, k: int, d_sae: int, device: torch.device) -> bool:
    """Whether ``decoding`` gathers k of d_sae features on ``device`` ("auto": by k/m, see above)."""
    if decoding == "auto":
        return k <= GATHER_BELOW_K_OVER_M.get(device.type, 0.0) * d_sae
    return decoding == "sparse"


def decode_selected(values: Tensor, indices: Tensor, W_dec: Tensor, decoding: Decoding = "auto") -> Tensor:
    """Σ_j values[..., j]·W_dec[indices[..., j]] (no bias), gathered or dense as ``decoding`` says."""
    if gathers(decoding, indices.shape[-1], W_dec.shape[0], W_dec.device):
        return gather_decode(values, indices, W_dec)
    return dense_decode(values, indices, W_dec)
