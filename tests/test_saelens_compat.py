"""SAELens reads our exports and we read SAELens' files, with identical encode/decode.

Skipped unless sae-lens is installed (``pip install 'lightning_sae[compat]'``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sae.export import export, load_export
from test_export import CASES, D_IN, SOURCE, trained_like

sae_lens = pytest.importorskip("sae_lens")

SAELENS_CLASSES = {
    ("relu", False): "StandardSAE",
    ("jumprelu", False): "JumpReLUSAE",
    ("jumprelu-effective", False): "JumpReLUSAE",
    ("topk", False): "TopKSAE",
    ("batchtopk", False): "JumpReLUSAE",
    ("relu", True): "Transcoder",
    ("jumprelu", True): "JumpReLUTranscoder",
}


LOADABLE = [(encoder, d_out) for encoder, d_out in CASES if (encoder, d_out is not None) in SAELENS_CLASSES]
"""The export cases SAELens can read: all but the TopK transcoder."""


@pytest.mark.parametrize(("encoder", "d_out"), LOADABLE)
def test_sae_lens_loads_the_export(encoder: str, d_out: int | None, tmp_path: Path) -> None:
    model = trained_like(encoder, d_out)
    out = export(model, tmp_path / "sae", source=SOURCE)
    sae = sae_lens.SAE.load_from_disk(out)
    assert type(sae).__name__ == SAELENS_CLASSES[encoder, d_out is not None]
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = torch.randn(256, D_IN) * 1.5
    with torch.no_grad():
        features = sae.encode(x)
        torch.testing.assert_close(features, model.folded().encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae.decode(features), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "architecture", ["standard", "jumprelu", "topk", "topk-rescaled", "transcoder", "jumprelu_transcoder"]
)
def test_load_export_reads_sae_lens_files(architecture: str, tmp_path: Path) -> None:
    """SAELens' own save_model output, randomised (apply_b_dec_to_input on where SAELens allows it);
    ``topk-rescaled``: a TopK ranking h·‖W_d‖ (rescale_acts_by_decoder_norm) with non-unit decoder rows."""
    rescaled = architecture == "topk-rescaled"
    architecture = architecture.removesuffix("-rescaled")
    sae_class, config_class = sae_lens.registry.get_sae_class(architecture)
    is_transcoder = architecture.endswith("transcoder")
    options = {"apply_b_dec_to_input": not is_transcoder, **({"d_out": D_IN - 2} if is_transcoder else {})}
    if architecture == "topk":
        options["k"] = 4
        options["rescale_acts_by_decoder_norm"] = rescaled
    sae = sae_class(config_class(d_in=D_IN, d_sae=24, **options))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.normal_(0, 0.5)
        if architecture.startswith("jumprelu"):
            sae.threshold.abs_()
        if architecture == "topk" and not rescaled:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    sae.save_model(tmp_path)
    loaded = load_export(tmp_path)
    x = torch.randn(256, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
