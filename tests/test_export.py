"""Export to SAELens' layout and ``load_export`` back: same predictions, documented format."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_sae.encoders import BatchTopK, Encoder, JumpReLU, ReLU, TopK
from lightning_sae.errors import UserError
from lightning_sae.export import export, load_export
from lightning_sae.metrics import log10_feature_density
from lightning_sae.model import SparseAutoencoder

D_IN, D_SAE, D_OUT, K = 8, 24, 6, 4
INPUT_SCALE, TARGET_SCALE = 2.5, 0.4
SOURCE = {"model": "tiny-llama", "layer": 2, "site": "resid_post", "context_length": 16, "text": "docs.jsonl"}

ENCODERS: dict[str, Callable[[int], Encoder]] = {
    "relu": ReLU,
    "jumprelu": functools.partial(JumpReLU, initial_log_threshold=-1.0),
    "jumprelu-effective": functools.partial(JumpReLU, initial_log_threshold=-1.0, threshold_units="effective"),
    "topk": functools.partial(TopK, k=K),
    "batchtopk": functools.partial(BatchTopK, k=K),
}
SAELENS_ARCHITECTURES = {
    "relu": "standard",
    "jumprelu": "jumprelu",
    "jumprelu-effective": "jumprelu",
    "topk": "topk",
    "batchtopk": "jumprelu",
}
CASES = [(name, None) for name in ENCODERS] + [("relu", D_OUT), ("jumprelu", D_OUT), ("topk", D_OUT)]
"""(encoder, d_out): the four SAEs, then transcoders (d_out ≠ d_in)."""


def trained_like(encoder: str, d_out: int | None) -> SparseAutoencoder:
    """A model with random biases and thresholds, non-unit decoder rows and non-trivial scales, in eval mode.

    A BatchTopK gets its inference threshold from one training-mode batch.
    """
    model = SparseAutoencoder(
        d_in=D_IN,
        d_sae=D_SAE,
        d_out=d_out,
        encoder=ENCODERS[encoder],
        input_scale=INPUT_SCALE,
        target_scale=TARGET_SCALE if d_out else None,
    )
    with torch.no_grad():
        model.W_enc.normal_(0, D_IN**-0.5)
        model.b_enc.normal_(0, 0.3)
        model.W_dec.mul_(torch.empty(D_SAE, 1).uniform_(0.3, 3.0))
        model.b_dec.normal_(0, 0.5)
        if encoder.startswith("jumprelu"):
            model.encoder.log_threshold.normal_(-1.0, 0.5)
    if encoder == "batchtopk":
        model.train()
        model(torch.randn(64, D_IN))
    return model.eval()


def saelens_forward(directory: Path, x: Tensor) -> Tensor:
    """SAELens' inference, written out from its formulas with the exported tensors and cfg.json.

    h = x·W_enc + b_enc; standard: f = ReLU(h); jumprelu: f = ReLU(h)·(h > threshold);
    topk: the k largest h, ReLU'd, others 0; ŷ = f·W_dec + b_dec.
    """
    config = json.loads((directory / "cfg.json").read_text())
    weights = load_file(directory / "sae_weights.safetensors")
    pre = x @ weights["W_enc"] + weights["b_enc"]
    architecture = config["architecture"]
    if architecture in ("standard", "transcoder"):
        features = torch.relu(pre)
    elif architecture in ("jumprelu", "jumprelu_transcoder"):
        features = torch.relu(pre) * (pre > weights["threshold"])
    else:
        top = pre.topk(config["k"], dim=-1)
        features = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return features @ weights["W_dec"] + weights["b_dec"]


def active_fraction(model: SparseAutoencoder, x: Tensor) -> float:
    """Fraction of features active over ``x``: the cases must neither all fire nor all be silent."""
    return (model.encode(x) > 0).float().mean().item()


@pytest.mark.parametrize(("encoder", "d_out"), CASES)
def test_load_export_reproduces_the_model(encoder: str, d_out: int | None, tmp_path: Path) -> None:
    model = trained_like(encoder, d_out)
    x = torch.randn(256, D_IN) * 1.5
    assert 0.02 < active_fraction(model, x) < 0.9
    loaded = load_export(export(model, tmp_path / "sae"))
    assert loaded.input_scale.item() == loaded.target_scale.item() == 1.0
    assert (loaded.d_in, loaded.d_sae, loaded.d_out) == (model.d_in, model.d_sae, model.d_out)
    assert loaded.reconstructs_input == (d_out is None)
    expected_encoder = {"relu": ReLU, "jumprelu": JumpReLU, "jumprelu-effective": JumpReLU, "topk": TopK,
                        "batchtopk": JumpReLU}[encoder]
    assert type(loaded.encoder) is expected_encoder
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("encoder", "d_out"), CASES)
def test_export_format(encoder: str, d_out: int | None, tmp_path: Path) -> None:
    model = trained_like(encoder, d_out)
    density = torch.rand(D_SAE)
    out = export(model, tmp_path / "sae", source=SOURCE, log10_feature_density=log10_feature_density(density))
    config = json.loads((out / "cfg.json").read_text())
    architecture = SAELENS_ARCHITECTURES[encoder]
    if d_out is not None:
        architecture = {"standard": "transcoder"}.get(architecture, f"{architecture}_transcoder")
    assert config["architecture"] == architecture
    assert (config["d_in"], config["d_sae"], config.get("d_out", D_IN)) == (D_IN, D_SAE, d_out or D_IN)
    assert config["apply_b_dec_to_input"] is False
    assert config["normalize_activations"] == "none"
    assert config["dtype"] == "float32"
    if encoder == "topk":
        assert config["k"] == K
    metadata = config["metadata"]
    assert metadata["sae_lens_version"].startswith("6.")
    assert metadata["model_name"] == "tiny-llama"
    assert metadata["hook_name"] == "blocks.2.hook_resid_post"
    assert metadata["context_size"] == 16
    assert metadata["lightning_sae_source"] == SOURCE
    if d_out is not None:
        assert metadata["hook_name_out"] == "blocks.2.hook_mlp_out"

    weights = load_file(out / "sae_weights.safetensors")
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, d_out or D_IN), "b_dec": (d_out or D_IN,)}
    if architecture.startswith("jumprelu"):
        shapes["threshold"] = (D_SAE,)
    assert {name: tuple(tensor.shape) for name, tensor in weights.items()} == shapes
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(D_SAE))

    x = torch.randn(256, D_IN) * 1.5
    torch.testing.assert_close(saelens_forward(out, x), model(x), atol=1e-5, rtol=1e-5)
    sparsity = load_file(out / "sparsity.safetensors")
    torch.testing.assert_close(sparsity["sparsity"], log10_feature_density(density))


def test_no_sparsity_file_without_density(tmp_path: Path) -> None:
    out = export(trained_like("relu", None), tmp_path / "sae")
    assert not (out / "sparsity.safetensors").exists()


def test_load_export_folds_saelens_b_dec_subtraction(tmp_path: Path) -> None:
    """An SAELens 'standard' file with apply_b_dec_to_input: h = (x − b_dec)·W_enc + b_enc."""
    weights = {
        "W_enc": torch.randn(D_IN, D_SAE) / D_IN**0.5,
        "b_enc": torch.randn(D_SAE) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN),
        "b_dec": torch.randn(D_IN),
    }
    save_file(weights, tmp_path / "sae_weights.safetensors")
    config = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    x = torch.randn(32, D_IN)
    features = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    expected = features @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(load_export(tmp_path)(x), expected, atol=1e-5, rtol=1e-5)


def test_load_export_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cfg.json not found"):
        load_export(tmp_path / "missing")
    out = export(trained_like("relu", None), tmp_path / "sae")
    config = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**config, "architecture": "gated"}))
    with pytest.raises(UserError, match="'gated' is not supported"):
        load_export(out)
    (out / "cfg.json").write_text(json.dumps({**config, "d_sae": D_SAE + 1}))
    with pytest.raises(UserError, match="d_sae=25 but the weights have 24"):
        load_export(out)
    (out / "sae_weights.safetensors").unlink()
    with pytest.raises(UserError, match="sae_weights.safetensors not found"):
        load_export(out)


def test_weights_holding_nan_or_inf_are_neither_exported_nor_loaded(tmp_path: Path) -> None:
    diverged = trained_like("jumprelu", None)
    with torch.no_grad():
        diverged.W_enc[0, 0] = float("nan")
    with pytest.raises(UserError, match="the SAE's W_enc holds NaN or Inf"):
        export(diverged, tmp_path / "diverged")
    assert not (tmp_path / "diverged" / "sae_weights.safetensors").exists()
    out = export(trained_like("jumprelu", None), tmp_path / "sae")
    weights = load_file(out / "sae_weights.safetensors")
    weights["threshold"][3] = float("inf")
    save_file(weights, out / "sae_weights.safetensors")
    with pytest.raises(UserError, match="sae_weights.safetensors holds NaN or Inf in threshold: it is corrupt"):
        load_export(out)


def test_an_encoder_without_a_saelens_form_is_refused_not_mislabelled(readme_plugins: Any, tmp_path: Path) -> None:
    model = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, encoder=readme_plugins.SoftplusGate)
    with pytest.raises(UserError, match="SoftplusGate has no SAELens architecture"):
        export(model, tmp_path / "sae")
    assert not (tmp_path / "sae").exists(), "nothing is written"


def test_a_topk_ranking_h_alone_with_non_unit_decoder_rows_is_refused(tmp_path: Path) -> None:
    model = trained_like("topk", None)
    export(model, tmp_path)
    weights = load_file(tmp_path / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"] * 2.0
    save_file(weights, tmp_path / "sae_weights.safetensors")
    with pytest.raises(UserError, match="would select other features"):
        load_export(tmp_path)


def test_an_export_replaces_an_earlier_one_whole_and_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    wider = SparseAutoencoder(d_in=D_IN, d_sae=2 * D_SAE)
    out = export(wider, tmp_path / "sae", log10_feature_density=torch.full((2 * D_SAE,), -2.0))
    with pytest.raises(UserError, match="exists; pass --overwrite true to replace it"):
        export(trained_like("relu", None), out)
    assert load_file(out / "sparsity.safetensors")["sparsity"].shape == (2 * D_SAE,)
    export(trained_like("relu", None), out, overwrite=True)
    assert not (out / "sparsity.safetensors").exists(), "no file of the earlier export is left beside the new one"
    assert load_export(out).d_sae == D_SAE

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_sae.export.save_file", full)
    with pytest.raises(OSError, match="No space left"):
        export(wider, out, overwrite=True)
    assert load_export(out).d_sae == D_SAE, "a failed write leaves the export as it was"
    assert [path.name for path in tmp_path.iterdir()] == ["sae"], "and no temporary directory"


def test_a_folder_that_is_not_an_export_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="with other files than an SAE export"):
        export(trained_like("relu", None), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
