"""``DecoderNormFolding``: at the end of fitting, make every decoder row unit-norm."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer

from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder


class DecoderNormFolding(Callback):
    """Replace the weights by ones with identical predictions and ‖W_d,i‖₂ = 1 for every feature.

    Seed 000 (Anthropic, January 2025): W_e' = W_e·‖W_d‖, b_e' = b_e·‖W_d‖, W_d' = W_d/‖W_d‖,
    b_d' = b_d; the encoder follows (JumpReLU: t' = t + log‖W_d‖; TopK and BatchTopK keep their
    selections). The folding is :meth:`SparseAutoencoder.fold_decoder_norms_`, the one the
    export uses. Runs in ``on_fit_end`` on every rank, after the last checkpoint was written, so
    checkpoints keep the training parametrisation that their optimizer state belongs to.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse, before training, an encoder that cannot follow the folding."""
        assert isinstance(pl_module, SparseAutoencoder)
        if not pl_module.encoder.can_fold():
            raise UserError(
                f"DecoderNormFolding: {type(pl_module.encoder).__name__} does not implement rescale_, so its SAE "
                "cannot be folded exactly; implement it or remove the callback"
            )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, SparseAutoencoder)
        pl_module.fold_decoder_norms_()
