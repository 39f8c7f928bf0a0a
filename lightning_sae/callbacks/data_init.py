"""``DataInitialisation``: the base of callbacks that set one parameter from training rows."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.model import SparseAutoencoder


class DataInitialisation(Callback):
    """Sets one parameter of the model from a sample of training rows at the start of a fresh fit.

    Rank 0 reads ``sample_rows`` training rows (:meth:`ActivationDataModule.sample_batches` with
    ``seed``), computes the value and broadcasts it, so every rank starts alike; a fit resumed from
    a checkpoint keeps the checkpoint's value. Subclasses name the parameter and the computation.
    """

    def __init__(self, sample_rows: int, seed: int) -> None:
        self.sample_rows = sample_rows
        self.seed = seed

    def parameter(self, model: SparseAutoencoder) -> nn.Parameter:
        """The parameter to set."""
        raise NotImplementedError

    def compute(self, model: SparseAutoencoder, x: Tensor, y: Tensor | None) -> Tensor:
        """Its value from the sampled raw rows x (and targets y, None when the SAE reconstructs x)."""
        raise NotImplementedError

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is not None:
            return
        assert isinstance(pl_module, SparseAutoencoder)
        value = None
        if trainer.is_global_zero:
            batches = list(ActivationDataModule.of(trainer).sample_batches(self.sample_rows, self.seed))
            x = torch.cat([x for x, _ in batches]).to(pl_module.device)
            y = None if batches[0][1] is None else torch.cat([y for _, y in batches]).to(pl_module.device)
            value = self.compute(pl_module, x, y).cpu()
        value = trainer.strategy.broadcast(value, src=0)
        parameter = self.parameter(pl_module)
        with torch.no_grad():
            parameter.copy_(value.to(parameter))
