"""``lightning_sae synth``: a toy-model-of-superposition activation file with known features.

Each row is x = Σ_i a_i·d_i + σ·ε: ``n_features`` unit directions d_i in R^d_in (more features than
dimensions: superposition), feature i active with probability p_i ∝ (i+1)^(−exponent) (a power
law, scaled so that ``mean_active`` features fire per row on average), magnitudes a_i ~ U(0, 1)
when active, and Gaussian noise ε ~ N(0, I/d_in) of scale σ = ``noise``. The directions and
probabilities are stored in the file's ``ground_truth`` group, so training can report how well
the SAE recovered them (mean max cosine similarity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_sae.data import format
from lightning_sae.errors import UserError


def firing_probabilities(n_features: int, mean_active: float, exponent: float) -> np.ndarray:
    """Power-law probabilities p_i ∝ (i+1)^(−exponent) with Σ p_i = mean_active, capped at 1."""
    weights = np.arange(1, n_features + 1, dtype=np.float64) ** -exponent
    probabilities = weights * mean_active / weights.sum()
    if probabilities.max() > 1:
        raise UserError(
            f"mean_active={mean_active} with exponent={exponent} gives the most frequent feature a "
            f"firing probability above 1; lower mean_active or the exponent"
        )
    return probabilities


def synth(
    out: Path = Path("data/toy.h5"),
    n_rows: int = 262_144,
    d_in: int = 64,
    n_features: int = 256,
    mean_active: float = 4.0,
    exponent: float = 0.5,
    noise: float = 0.01,
    seed: int = 0,
    dtype: str = "float32",
    chunk_rows: int = 4096,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic activation file with ground-truth features.

    Args:
        out: Output HDF5 file.
        n_rows: Number of rows (tokens).
        d_in: Dimension of each row.
        n_features: Number of ground-truth feature directions (> d_in for superposition).
        mean_active: Average number of active features per row.
        exponent: Power-law exponent of the firing probabilities (0: all equally frequent).
        noise: Standard deviation σ of the isotropic noise, relative to a unit feature.
        seed: Random seed.
        dtype: Storage dtype, float32 or float16.
        chunk_rows: Rows per HDF5 chunk.
        overwrite: Replace an existing file.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite true to replace it")
    if min(n_rows, d_in, n_features, chunk_rows) < 1:
        raise UserError("n_rows, d_in, n_features and chunk_rows must be positive")
    if dtype not in ("float32", "float16"):
        raise UserError(f"dtype must be float32 or float16, got {dtype!r}")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, d_in))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    probabilities = firing_probabilities(n_features, mean_active, exponent)
    out.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"source": "synthetic", "n_features": n_features, "mean_active": mean_active, "exponent": exponent, "noise": noise, "seed": seed}
    with format.create(out, d_in=d_in, dtype=dtype, chunk_rows=chunk_rows, attrs=attrs) as file:
        truth = file.create_group(format.GROUND_TRUTH)
        truth["features"] = directions.astype(np.float32)
        truth["firing_probabilities"] = probabilities
        for start in range(0, n_rows, chunk_rows):
            rows = min(chunk_rows, n_rows - start)
            active = rng.random((rows, n_features)) < probabilities
            magnitudes = rng.random((rows, n_features)) * active
            x = magnitudes @ directions + noise * rng.standard_normal((rows, d_in)) / np.sqrt(d_in)
            format.append(file, x.astype(dtype))
    return out
