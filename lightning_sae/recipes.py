"""The one knob every recipe config shares: its sparsity, set as a target L0."""

from __future__ import annotations

from pathlib import Path

import yaml

SELECTING_ENCODERS = ("TopK", "BatchTopK")
"""Encoders whose ``k`` sets the L0 directly; every other recipe sets it with ``model.target_l0``."""


def sparsity_arguments(config: str | Path, l0: float) -> list[str]:
    """``fit`` arguments that set the L0 of the recipe in ``config`` to ``l0``.

    ``--model.encoder.init_args.k`` (rounded) for a TopK or BatchTopK encoder, else
    ``--model.target_l0``, which finds the sparsity penalty's coefficient while training.
    """
    encoder = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("encoder", "")
    class_path = encoder.get("class_path", "") if isinstance(encoder, dict) else str(encoder)
    if class_path.rpartition(".")[2] in SELECTING_ENCODERS:
        return ["--model.encoder.init_args.k", str(max(1, round(l0)))]
    return ["--model.target_l0", str(l0)]
