"""Folding and the SAELens on-disk layout.

Folding rewrites the parameters of a model without changing its predictions:

- decoder norms (seed 000): W_e' = W_e·‖W_d‖, b_e' = b_e·‖W_d‖, W_d' = W_d/‖W_d‖, b_d' = b_d, and
  the encoder's own parameters follow (JumpReLU: t' = t + log‖W_d‖);
- input scaling: with scales s_in, s_out, raw rows give h = s_in·x·W_e + b_e and
  ŷ_raw = (f·W_d + b_d)/s_out; dividing h by s_out (W_e' = W_e·s_in/s_out, b_e' = b_e/s_out,
  thresholds likewise) and b_d by s_out gives the same ŷ_raw with scales 1.

An export holds the model after both foldings: unit-norm decoder rows, working on raw
activations. Its directory has SAELens' layout: ``cfg.json``, ``sae_weights.safetensors``
(W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, ``threshold`` for JumpReLU-type
encoders) and, when known, ``sparsity.safetensors`` (log10 feature density).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_sae.model import SparseAutoencoder

SAELENS_VERSION = "6.0.0"
"""The SAELens major version whose layout the export follows."""

HOOK_NAMES = {"resid_post": "blocks.{layer}.hook_resid_post", "mlp_out": "blocks.{layer}.hook_mlp_out", "mlp_in_out": "blocks.{layer}.ln2.hook_normalized"}
"""TransformerLens hook names of the cache sites (metadata only; SAELens tools read them)."""


@torch.no_grad()
def fold_decoder_norms_(model: SparseAutoencoder) -> None:
    """Make every decoder row unit-norm in place, keeping the model's predictions (seed 000)."""
    norms = model.decoder_norms()
    model.W_enc.mul_(norms)
    model.b_enc.mul_(norms)
    model.W_dec.div_(norms[:, None])
    model.encoder.rescale_(norms, 1 / norms)


@torch.no_grad()
def fold_scales_(model: SparseAutoencoder) -> None:
    """Fold input_scale and target_scale into the weights in place and set both to 1."""
    s_in, s_out = model.input_scale.clone(), model.target_scale.clone()
    model.W_enc.mul_(s_in / s_out)
    model.b_enc.div_(s_out)
    model.b_dec.div_(s_out)
    model.encoder.rescale_(torch.full_like(model.b_enc, 1 / s_out.item()), torch.ones_like(model.b_enc))
    model.input_scale.fill_(1.0)
    model.target_scale.fill_(1.0)


def folded_copy(model: SparseAutoencoder) -> SparseAutoencoder:
    """A copy with decoder norms and scales folded: unit decoder rows, raw activations in."""
    folded = copy.deepcopy(model).cpu().float().eval()
    fold_decoder_norms_(folded)
    fold_scales_(folded)
    return folded


def saelens_weights(folded: SparseAutoencoder) -> dict[str, Tensor]:
    """The tensors of ``sae_weights.safetensors`` from a folded model."""
    weights = {
        "W_enc": folded.W_enc,
        "b_enc": folded.b_enc,
        "W_dec": folded.W_dec,
        "b_dec": folded.b_dec,
    }
    if folded.encoder.saelens_architecture == "jumprelu":
        weights["threshold"] = folded.encoder.threshold(folded.decoder_norms())
    return {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}


def saelens_config(model: SparseAutoencoder, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json: architecture, sizes, and metadata taken from the activation file's attributes."""
    source = source or {}
    layer, site = source.get("layer"), source.get("site")
    hook_name = HOOK_NAMES[site].format(layer=layer) if site in HOOK_NAMES and layer is not None else None
    config: dict[str, Any] = {
        "architecture": model.encoder.saelens_architecture,
        "d_in": model.d_in,
        "d_sae": model.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "model_name": source.get("model"),
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": source.get("context_length"),
            "dataset_path": source.get("text_source"),
            "trained_with": "lightning_sae",
            "lightning_sae_source": {key: value for key, value in source.items() if _is_json(value)},
        },
        **model.encoder.saelens_config(),
    }
    if not model.reconstructs_input:
        config["d_out"] = model.d_out
    return config


def export(
    model: SparseAutoencoder,
    out: str | Path,
    source: dict[str, Any] | None = None,
    log10_feature_density: Tensor | None = None,
) -> Path:
    """Write ``model`` to directory ``out`` in SAELens' layout; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folded = folded_copy(model)
    save_file(saelens_weights(folded), out / "sae_weights.safetensors")
    if log10_feature_density is not None:
        save_file({"sparsity": log10_feature_density.detach().float().cpu().contiguous()}, out / "sparsity.safetensors")
    (out / "cfg.json").write_text(json.dumps(saelens_config(model, source), indent=2) + "\n")
    return out


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
