"""The SAELens on-disk layout: writing a model into it, and reading one back.

An export holds the model folded (:meth:`SparseAutoencoder.folded`): unit-norm decoder rows, no
centering, working on raw activations. Its directory has SAELens' layout: ``cfg.json``, ``sae_weights.safetensors``
(W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, ``threshold`` for JumpReLU-type
encoders) and, when known, ``sparsity.safetensors`` (log10 feature density).

SAELens 6 architectures (checked against sae-lens 6.54): ``standard`` (f = ReLU(x·W_enc + b_enc)),
``jumprelu`` (f = ReLU(h)·H(h − threshold)), ``topk`` (the k largest h, ReLU'd), and for
transcoders ``transcoder`` and ``jumprelu_transcoder``, which carry ``d_out``. A BatchTopK SAE
exports as ``jumprelu``: at inference it is a JumpReLU whose threshold is the global key threshold
over the (unit) decoder norms. SAELens has no TopK transcoder; one exports as ``topk_transcoder``,
which :func:`load_export` reads and SAELens does not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.encoders import Encoder, JumpReLU, ReLU, TopK
from lightning_sae.errors import UserError
from lightning_sae.files import directory_written_atomically
from lightning_sae.model import SparseAutoencoder, first_non_finite

SAELENS_VERSION = "6.0.0"
"""The SAELens major version whose layout the export follows."""

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"

HOOK_NAMES = {
    "resid_post": "blocks.{layer}.hook_resid_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_in_out": "blocks.{layer}.ln2.hook_normalized",
}
"""TransformerLens hook names of the cache sites (metadata only; SAELens tools read them)."""
TRANSCODER_OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"
"""The output hook of a transcoder trained on the ``mlp_in_out`` site."""

ENCODERS = {"standard": ReLU, "jumprelu": JumpReLU, "topk": TopK}
"""Encoder rebuilt by :func:`load_export` for each SAELens base architecture."""


def saelens_weights(folded: SparseAutoencoder) -> dict[str, Tensor]:
    """The tensors of ``sae_weights.safetensors`` from a folded model; refused when one holds NaN or Inf."""
    weights = {
        "W_enc": folded.W_enc,
        "b_enc": folded.b_enc,
        "W_dec": folded.W_dec,
        "b_dec": folded.b_dec,
    }
    if folded.encoder.saelens_architecture == "jumprelu":
        weights["threshold"] = folded.encoder.threshold(folded.decoder_norms())
    non_finite = first_non_finite(weights.items())
    if non_finite is not None:
        raise UserError(f"the SAE's {non_finite} holds NaN or Inf (training diverged): it is not exported")
    return {name: tensor.detach().contiguous().clone() for name, tensor in weights.items()}


def saelens_config(model: SparseAutoencoder, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """cfg.json: architecture, sizes, and metadata taken from the activation file's attributes."""
    source = source or {}
    layer, site = source.get("layer"), source.get("site")
    known_hook = site in HOOK_NAMES and layer is not None
    hook_name = HOOK_NAMES[site].format(layer=layer) if known_hook else None
    config: dict[str, Any] = {
        "architecture": saelens_architecture(model),
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
            "dataset_path": source.get("text"),
            "exclude_special_tokens": source.get("drop_special_tokens"),
            "trained_with": "lightning_sae",
            "lightning_sae_source": {key: value for key, value in source.items() if _is_json(value)},
        },
        **model.encoder.saelens_config(),
    }
    if not model.reconstructs_input:
        config["d_out"] = model.d_out
        config["metadata"]["hook_name_out"] = TRANSCODER_OUTPUT_HOOK.format(layer=layer) if known_hook else None
    return config


def saelens_architecture(model: SparseAutoencoder) -> str:
    """cfg.json's ``architecture``: the encoder's SAELens name, with SAELens' transcoder naming
    (``transcoder`` for a ReLU transcoder, ``<name>_transcoder`` otherwise) when d_out is separate."""
    name = model.encoder.saelens_architecture
    if name is None:
        raise UserError(
            f"{type(model.encoder).__name__} has no SAELens architecture, so it cannot be exported: set its "
            "saelens_architecture to the SAELens encoder it computes exactly, or keep using the checkpoint"
        )
    if model.reconstructs_input:
        return name
    return "transcoder" if name == "standard" else f"{name}_transcoder"


def export(
    model: SparseAutoencoder,
    out: str | Path,
    source: dict[str, Any] | None = None,
    log10_feature_density: Tensor | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to directory ``out`` in SAELens' layout; returns ``out``.

    The directory is written whole (a temporary directory beside it, renamed into place), so no
    file of an earlier export survives beside the new ones and a failed write leaves ``out`` as it
    was. An existing export is replaced only with ``overwrite``, an empty directory in any case,
    and a directory holding anything but an export never.

    Raises:
        UserError: ``out`` exists and may not be replaced.
        OSError: the files cannot be written (disk full, read-only folder).
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise UserError(
            f"{out} is a folder with other files than an SAE export ({CONFIG_FILE} missing): give a new --out"
        )
    config = saelens_config(model, source)
    folded = model.folded()
    empty = out.is_dir() and not any(out.iterdir())
    with directory_written_atomically(out, overwrite=overwrite or empty) as directory:
        save_file(saelens_weights(folded), directory / WEIGHTS_FILE)
        if log10_feature_density is not None:
            sparsity = log10_feature_density.detach().float().cpu().contiguous()
            save_file({"sparsity": sparsity}, directory / SPARSITY_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_export_config(directory: str | Path) -> dict[str, Any]:
    """The cfg.json of an export directory; raises ``UserError`` when it is missing or unreadable."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not an SAE export: {CONFIG_FILE} not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "architecture" not in config:
        raise UserError(f"{path} has no 'architecture'")
    return config


def load_export(directory: str | Path) -> SparseAutoencoder:
    """Rebuild a :class:`SparseAutoencoder` from an export (or an SAELens directory of the same layout).

    The model takes raw activations (input_scale = target_scale = 1) and gives the export's
    outputs: ``standard``/``transcoder`` → ReLU; ``jumprelu``/``jumprelu_transcoder`` → JumpReLU
    with t = log(threshold) (a BatchTopK export also loads this way, with per-feature thresholds;
    a zero threshold gives t = −inf, i.e. a ReLU); ``topk``/``topk_transcoder`` → TopK(k). Its
    decoder rows keep the export's norms. JumpReLU gets its default bandwidth and STE, in raw
    activation units, for further training.

    SAELens files with ``apply_b_dec_to_input`` (h = (x − b_dec)·W_enc + b_enc) are folded to
    b_enc' = b_enc − b_dec·W_enc. A SAELens TopK with ``rescale_acts_by_decoder_norm`` ranks
    h_i·‖W_d,i‖ and outputs that product, which is this TopK after folding its decoder norms (done
    here); without it SAELens ranks h itself, the same only when every decoder row has unit norm
    (refused otherwise). Run-time activation normalisation is not supported.
    """
    directory = Path(directory)
    config = read_export_config(directory)
    architecture = str(config["architecture"])
    is_transcoder = architecture.endswith("transcoder")
    base = "standard" if architecture == "transcoder" else architecture.removesuffix("_transcoder")
    if base not in ENCODERS:
        raise UserError(
            f"{directory}: architecture {architecture!r} is not supported "
            f"(expected {', '.join(sorted(ENCODERS))} or a transcoder of these)"
        )
    if config.get("normalize_activations", "none") != "none":
        raise UserError(f"{directory}: normalize_activations={config['normalize_activations']!r} is not supported")
    rescaled = base == "topk" and bool(config.get("rescale_acts_by_decoder_norm", False))
    names = ("W_enc", "b_enc", "W_dec", "b_dec", *(("threshold",) if base == "jumprelu" else ()))
    weights = _read_weights(directory / WEIGHTS_FILE, names)
    d_in, d_sae = weights["W_enc"].shape
    d_out = weights["W_dec"].shape[1]
    _check_shapes(directory, weights, config, is_transcoder)
    if base == "jumprelu" and bool((weights["threshold"] < 0).any()):
        raise UserError(f"{directory}: negative JumpReLU thresholds are not supported")
    norms = weights["W_dec"].norm(dim=1)
    if base == "topk" and not rescaled and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise UserError(
            f"{directory}: this TopK ranks h without its decoder norms (rescale_acts_by_decoder_norm=false) and its "
            "decoder rows are not unit-norm; lightning_sae's TopK ranks h·‖W_d‖, so it would select other features"
        )
    model = SparseAutoencoder(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if is_transcoder else None,
        encoder=_encoder_factory(base, config, directory),
    )
    if config.get("apply_b_dec_to_input", False):
        weights["b_enc"] = weights["b_enc"] - weights["b_dec"] @ weights["W_enc"]
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(model, name).copy_(weights[name])
        if base == "jumprelu":
            assert isinstance(model.encoder, JumpReLU)
            model.encoder.set_threshold_(weights["threshold"], model.decoder_norms())
    if rescaled:
        model.fold_decoder_norms_()
    return model.eval()


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def _read_weights(path: Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The named float32 tensors of an SAE weights file; raises ``UserError`` when one is missing or
    holds NaN or Inf (an SAE computing NaN would only be evaluated or used as NaN)."""
    if not path.is_file():
        raise UserError(f"{path.parent} is not an SAE export: {path.name} not found")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    missing = [name for name in names if name not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))})")
    non_finite = first_non_finite((name, tensors[name]) for name in names)
    if non_finite is not None:
        raise UserError(f"{path} holds NaN or Inf in {non_finite}: it is corrupt; export the SAE again")
    return {name: tensors[name].float() for name in names}


def _check_shapes(directory: Path, weights: dict[str, Tensor], config: dict[str, Any], is_transcoder: bool) -> None:
    """Raise ``UserError`` unless the tensors agree with each other and with cfg.json's sizes."""
    d_in, d_sae = weights["W_enc"].shape
    d_out = weights["W_dec"].shape[1]
    if not is_transcoder and d_out != d_in:
        raise UserError(f"{directory}: W_dec has {d_out} columns but W_enc has {d_in} rows; is it a transcoder?")
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if name in weights and tuple(weights[name].shape) != shape:
            raise UserError(f"{directory}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    for key, size in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if key in config and config[key] != size:
            raise UserError(f"{directory}: cfg.json says {key}={config[key]} but the weights have {size}")


def _encoder_factory(base: str, config: dict[str, Any], directory: Path) -> Callable[[int], Encoder]:
    """The ``encoder`` argument of :class:`SparseAutoencoder` for a SAELens base architecture."""
    if base != "topk":
        return ENCODERS[base]
    if not isinstance(config.get("k"), int):
        raise UserError(f"{directory}: a topk cfg.json needs an integer 'k'")
    return functools.partial(TopK, k=config["k"])
