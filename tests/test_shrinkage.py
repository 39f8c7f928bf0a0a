"""``ShrinkageCorrection``: a penalty-trained ReLU or JumpReLU SAE gets its unshrunk magnitudes, firing unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks.folding import DecoderNormFolding
from lightning_sae.callbacks.shrinkage import ShrinkageCorrection, apply_correction_
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import JumpReLU, ThresholdUnits, TopK
from lightning_sae.errors import UserError
from lightning_sae.export import export, load_export
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1, Tanh


class KeepUncorrected(Callback):
    """Copies the model at ``on_train_end``, which Lightning calls before ``on_fit_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.model = copy.deepcopy(pl_module)


def fvu(model: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((x - model(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("encoder", [None, "pre_activation", "effective"])  # None: ReLU
def test_the_correction_is_the_jumprelu_that_keeps_the_firing_pattern(encoder: ThresholdUnits | None) -> None:
    model = SparseAutoencoder(d_in=8, d_sae=32, input_scale=1.3)
    if encoder is not None:
        model.encoder = JumpReLU(32, initial_log_threshold=-1.0, threshold_units=encoder)
    with torch.no_grad():
        model.b_enc.uniform_(-0.3, 0.3)
        model.W_dec.mul_(torch.rand(32, 1) + 0.5)  # decoder norms other than 1: the effective units matter
    x = torch.randn(128, 8)
    gain = torch.rand(32) + 0.5
    with torch.no_grad():
        pre_acts = model.pre_activations(x * model.input_scale)
        firing = model.encode(x) != 0
        # δ down to −θ: a JumpReLU feature may start above 0, never below
        shift = torch.rand(32) - model.encoder.threshold(model.decoder_norms()) * torch.rand(32)
        apply_correction_(model, gain, shift)
        corrected = model.encode(x)
    assert isinstance(model.encoder, JumpReLU)
    assert firing.any() and not firing.all()
    torch.testing.assert_close(corrected, gain * (pre_acts + shift) * firing, atol=1e-6, rtol=0)


def relu_l1(d_in: int, input_scale: float) -> SparseAutoencoder:
    return SparseAutoencoder(d_in=d_in, d_sae=64, input_scale=input_scale, lr=3e-3, penalties=[L1(coefficient=3.0)])


def jumprelu_tanh(d_in: int, input_scale: float) -> SparseAutoencoder:
    """Seed 000's pair: the tanh penalty shrinks the small activations, not all alike as L1 does."""
    return SparseAutoencoder(
        d_in=d_in, d_sae=64, input_scale=input_scale, lr=3e-3,
        encoder=lambda m: JumpReLU(m, bandwidth=0.25, initial_log_threshold=-3.0, threshold_units="effective"),
        penalties=[Tanh(coefficient=1.0)],
    )


# measured: 0.33 and 0.69; a shift alone (no gain) gave 0.35 and 0.87: the tanh penalty's pull depends on the magnitude
@pytest.mark.parametrize(("build", "fvu_ratio"), [(relu_l1, 0.5), (jumprelu_tanh, 0.8)])
def test_a_penalty_trained_sae_reconstructs_better_at_the_same_l0(
    build: Callable[[int, float], SparseAutoencoder], fvu_ratio: float, toy_file: Path, tmp_path: Path
) -> None:
    data = ActivationDataModule(str(toy_file), batch_size=256, val_rows=1024, buffer_rows=4096)
    model = build(data.d_in, data.input_scale)
    kept = KeepUncorrected()
    trainer = Trainer(
        accelerator="cpu", max_steps=400, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[kept, ShrinkageCorrection(rows=4096, steps=200, batch_size=512),
                                               DecoderNormFolding()],
    )
    trainer.fit(model, datamodule=data)
    x = next(iter(data.val_dataloader()))[0].float()
    before, after = kept.model, model
    with torch.no_grad():
        assert torch.equal(before.encode(x) != 0, after.encode(x) != 0), "the same features fire"
    assert fvu(after, x) < fvu_ratio * fvu(before, x)
    export(after, tmp_path / "sae")
    loaded = load_export(tmp_path / "sae")
    assert isinstance(loaded.encoder, JumpReLU)
    torch.testing.assert_close(loaded(x), after(x).detach(), atol=1e-5, rtol=1e-4)


def test_only_a_threshold_sae_is_accepted(toy_file: Path) -> None:
    model = SparseAutoencoder(d_in=16, d_sae=32, encoder=lambda m: TopK(m, k=4))
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[ShrinkageCorrection()])
    with pytest.raises(UserError, match="ReLU or JumpReLU SAE"):
        trainer.fit(model, datamodule=ActivationDataModule(str(toy_file), batch_size=64, val_rows=512))
