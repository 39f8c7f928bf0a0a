"""``FeatureRecovery``: how well the decoder recovered known features (synthetic data only)."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_sae.data.datamodule import ActivationDataModule

RECOVERED_COSINE = 0.9
"""A true feature counts as recovered when some learned direction has a cosine above this."""


def max_cosine_similarities(true_directions: Tensor, learned_directions: Tensor) -> Tensor:
    """For every true feature, the largest cosine similarity to any learned direction, [n_true].

    Their mean is the MMCS (mean max cosine similarity; Sharkey et al. 2022, "Taking features out
    of superposition with sparse autoencoders"). Shapes: [n_true, d] and [n_learned, d].
    """
    true_unit = torch.nn.functional.normalize(true_directions.float(), dim=-1)
    learned_unit = torch.nn.functional.normalize(learned_directions.float(), dim=-1)
    return (true_unit @ learned_unit.T).max(dim=1).values


class FeatureRecovery(Callback):
    """Logs ``val/mmcs`` and ``val/recovered`` (share of true features found at cosine > 0.9) of
    the decoder rows against the data file's ``ground_truth/features``.

    Does nothing when the data has no ground truth (real activations).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        truth = ActivationDataModule.of(trainer).ground_truth()
        self.true_features = torch.from_numpy(truth["features"]) if truth and "features" in truth else None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.true_features is None or trainer.sanity_checking:
            return
        cosines = max_cosine_similarities(self.true_features.to(pl_module.device), pl_module.W_dec.detach())
        pl_module.log("val/mmcs", cosines.mean())
        pl_module.log("val/recovered", (cosines > RECOVERED_COSINE).float().mean())
