"""``lightning_sae synth``: a toy-model-of-superposition activation file with known features.

Each row is x = c + Σ_i a_i·d_i + σ·ε: ``n_features`` unit directions d_i in R^d_in (more
features than dimensions: superposition), feature i active with probability p_i ∝ (i+1)^(−exponent)
(a power law, scaled so that ``mean_active`` features fire per row on average; exponent 0: all
equally frequent), magnitudes a_i ~ U(``min_magnitude``, ``max_magnitude``) when active, Gaussian
noise ε ~ N(0, I/d_in) of scale σ = ``noise``, and a shared offset c of norm ``offset`` in a random
direction (real activations have a large mean). The directions, probabilities and offset are
stored in the file's ``ground_truth`` group, so training can report how well the SAE recovered
them (mean max cosine similarity).

The file is written under a temporary name and renamed when complete: an interrupted ``synth``
leaves no file that reads as whole, and ``--overwrite`` replaces a file only if no run uses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_sae.data import format
from lightning_sae.errors import UserError
from lightning_sae.files import out_of_space, refuse_if_in_use, written_atomically


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
    min_magnitude: float = 0.0,
    max_magnitude: float = 1.0,
    offset: float = 0.0,
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
        min_magnitude: Smallest magnitude of an active feature.
        max_magnitude: Largest magnitude of an active feature.
        offset: Norm of the offset c added to every row.
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
    if not 0 <= min_magnitude <= max_magnitude or max_magnitude <= 0 or offset < 0 or noise < 0:
        raise UserError(
            "magnitudes need 0 <= min_magnitude <= max_magnitude, max_magnitude > 0, and offset and noise >= 0"
        )
    if dtype not in ("float32", "float16"):
        raise UserError(f"dtype must be float32 or float16, got {dtype!r}")
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, d_in))
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    probabilities = firing_probabilities(n_features, mean_active, exponent)
    shift = rng.standard_normal(d_in)
    shift = (shift * offset / np.linalg.norm(shift)).astype(np.float32)
    if overwrite:
        refuse_if_in_use(out, "overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    attrs = {
        "source": "synthetic", "n_features": n_features, "mean_active": mean_active, "exponent": exponent,
        "noise": noise, "min_magnitude": min_magnitude, "max_magnitude": max_magnitude, "offset": offset, "seed": seed,
    }
    try:
        with (
            written_atomically(out) as temporary,
            format.create(temporary, d_in=d_in, dtype=dtype, chunk_rows=chunk_rows, attrs=attrs) as file,
        ):
            truth = file.create_group(format.GROUND_TRUTH)
            truth["features"] = directions
            truth["firing_probabilities"] = probabilities
            truth["offset"] = shift
            for start in range(0, n_rows, chunk_rows):
                rows = min(chunk_rows, n_rows - start)
                active = rng.random((rows, n_features), dtype=np.float32) < probabilities
                magnitudes = np.zeros((rows, n_features), dtype=np.float32)
                magnitudes[active] = rng.uniform(min_magnitude, max_magnitude, int(active.sum()))
                noise_rows = rng.standard_normal((rows, d_in), dtype=np.float32) * (noise / np.sqrt(d_in))
                x = magnitudes @ directions + shift + noise_rows
                format.append(file, x.astype(dtype))
    except OSError as error:
        if out_of_space(error):
            message = f"no space left on the disk to write {out}; nothing was written (free space and rerun)"
            raise UserError(message) from None
        raise
    return out
