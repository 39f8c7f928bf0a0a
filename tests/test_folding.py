"""``DecoderNormFolding``: identical predictions, unit decoder rows, for every encoder."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks.folding import DecoderNormFolding
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import BatchTopK, Encoder, JumpReLU, ReLU, TopK
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import Tanh

ENCODERS: dict[str, Callable[[int], Encoder]] = {
    "relu": ReLU,
    "jumprelu": lambda d_sae: JumpReLU(d_sae, initial_log_threshold=-1.0),
    "jumprelu-effective": lambda d_sae: JumpReLU(d_sae, initial_log_threshold=-1.0, threshold_units="effective"),
    "topk": lambda d_sae: TopK(d_sae, k=4),
    "batchtopk": lambda d_sae: BatchTopK(d_sae, k=4),
}


def skewed_model(encoder: Callable[[int], Encoder]) -> SparseAutoencoder:
    """A model whose decoder rows have norms between 0.2 and 5, with non-zero biases."""
    model = SparseAutoencoder(d_in=16, d_sae=48, encoder=encoder, input_scale=1.7)
    with torch.no_grad():
        model.W_dec.mul_(torch.empty(48, 1).uniform_(0.2, 5.0))
        model.b_enc.uniform_(-0.3, 0.3)
        model.b_dec.normal_()
        if isinstance(model.encoder, JumpReLU):
            model.encoder.log_threshold.uniform_(-2.0, 0.0)
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_predictions_are_unchanged_and_decoder_rows_unit_norm(name: str, mode: str) -> None:
    model = skewed_model(ENCODERS[name])
    x = torch.randn(256, 16)
    model.train()
    model(torch.randn(256, 16))  # gives BatchTopK its inference threshold (from other rows: no ties)
    model.train(mode == "train")
    with torch.no_grad():
        before = model(x)
        DecoderNormFolding().on_fit_end(Trainer(logger=False, accelerator="cpu"), model)
        after = model(x)
    assert (after - before).abs().max() <= 1e-5
    torch.testing.assert_close(model.decoder_norms(), torch.ones(48))


class KeepUnfolded(Callback):
    """Copies the model at ``on_train_end``, which Lightning calls before ``on_fit_end``."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.model = copy.deepcopy(pl_module)


def test_fit_ends_with_the_folded_model(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=48, encoder=JumpReLU, penalties=[Tanh(1.0)], lr=1e-2,
                              input_scale=data.input_scale)
    keep = KeepUnfolded()
    callback_trainer(8, [DecoderNormFolding(), keep]).fit(model, data)
    x = torch.randn(128, 16)
    unfolded = keep.model
    assert not torch.allclose(unfolded.decoder_norms(), torch.ones(48))
    torch.testing.assert_close(model.decoder_norms(), torch.ones(48))
    with torch.no_grad():
        assert (model(x) - unfolded(x)).abs().max() <= 1e-5


def test_an_encoder_that_cannot_follow_the_folding_is_refused_before_training(
    readme_plugins: Any, toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=48, encoder=readme_plugins.SoftplusGate, input_scale=data.input_scale)
    trainer = callback_trainer(4, [DecoderNormFolding()])
    with pytest.raises(UserError, match="SoftplusGate does not implement rescale_"):
        trainer.fit(model, data)
    assert trainer.global_step == 0
    with pytest.raises(UserError, match="cannot be folded"):
        model.fold_decoder_norms_()


def test_centred_models_fold_too() -> None:
    model = skewed_model(ReLU)
    model.center_input = True
    x = torch.randn(64, 16)
    with torch.no_grad():
        before = model(x)
        model.fold_decoder_norms_()
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
