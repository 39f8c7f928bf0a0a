"""``DuplicatePruning``: silence features that repeat the decoder direction of a stronger feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sae.callbacks.scheduled import ScheduledIntervention
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder

SIMILARITY_BLOCK = 2**24
"""Entries of the feature-by-feature cosine matrix computed at once (64 MiB of float32)."""


class DuplicatePruning(ScheduledIntervention):
    """At the scheduled steps, silence every feature whose decoder direction repeats a stronger feature's.

    Why (ReLU SAEs trained with an L1 penalty): the penalty Σ_i f_i·‖W_d,i‖ costs the same whether a
    direction's activation comes from one feature or is split between two features with the same
    decoder direction, and under L1's shrinkage two such features with staggered biases approximate
    the unshrunk magnitude better than one. Duplicates therefore form while the penalty is small and
    stay; every row on which both fire pays twice in L0, so at a target L0 fewer distinct features
    fire. On the synthetic toy-offset set (256 true features, d_sae 512, L0 5) ReLU-L1 ended with 469
    features matching a true one, and where a duplicated feature fired, two or more fired in 62% of
    the rows (docs/benchmarks.md). TopK's selection makes duplicates compete for its k slots. A
    penalty per firing (L0, or tanh past its saturation) keeps a second feature wherever it cuts
    the error by more than λ: anthropic-jan2025 on a wide synthetic set ended with 212 pairs whose
    weaker feature fires only where the stronger one does (docs/benchmarks.md, stop 39).

    With a_i = E[f_i]·‖W_d,i‖, feature i's mean contribution to the reconstruction over
    ``sample_rows`` training rows (all ranks together), feature i is a duplicate when some feature j
    with a_j > a_i (on a tie, j < i) has cos(W_d,i, W_d,j) > ``cosine``. Every duplicate that fires
    (a_i > 0) is silenced (:meth:`SparseAutoencoder.silence_features_`): it does not fire again
    (unless a penalty on features that do not fire, such as the pre-act loss, pulls it back), and
    the training after the pruning hands its share to the feature it repeated. Silenced features
    count as dead at once, so a :class:`~lightning_sae.callbacks.resampling.Resampling` point after
    a pruning point re-points them at badly reconstructed rows: to keep them silent, prune after the
    last resampling; to hand duplicates to what the SAE misses, resample after pruning (with
    ``direction="residual"``: anthropic-jan2025, where a quarter of the features were duplicates of
    frequent true features while a tenth of the true features had no feature, docs/benchmarks.md,
    stop 42). Every rank takes the same decision.
    """

    def __init__(
        self,
        steps: list[int] | None = None,
        fractions: list[float] | None = None,
        cosine: float = 0.9,
        sample_rows: int = 65_536,
        seed: int = 0,
    ) -> None:
        """
        Args:
            steps: Optimizer steps at which to prune.
            fractions: The same as fractions of the run's total steps.
            cosine: Cosine similarity of two decoder rows above which the weaker feature is a duplicate.
            sample_rows: Training rows on which each feature's contribution is measured.
            seed: Seed of the choice of those rows.
        """
        super().__init__(steps, fractions)
        if not -1 < cosine < 1:
            raise UserError(f"DuplicatePruning cosine must be between -1 and 1, got {cosine}")
        if sample_rows < 1:
            raise UserError(f"DuplicatePruning sample_rows must be positive, got {sample_rows}")
        self.cosine = cosine
        self.sample_rows = sample_rows
        self.seed = seed

    def intervene(self, trainer: Trainer, model: SparseAutoencoder) -> Tensor:
        return self.prune(trainer, model)

    def prune(self, trainer: Trainer, model: SparseAutoencoder) -> Tensor:
        """Silence the duplicates now; returns their indices."""
        contributions = self.contributions(trainer, model)
        firing_duplicates = duplicates(model.W_dec.detach(), contributions, self.cosine) & (contributions > 0)
        indices = firing_duplicates.nonzero().flatten()
        model.silence_features_(indices, trainer.optimizers)
        rank_zero_info(
            f"DuplicatePruning: {len(indices)} features silenced at step {trainer.global_step} "
            f"(decoder cosine > {self.cosine:g} with a stronger feature)"
        )
        return indices

    @torch.no_grad()
    def contributions(self, trainer: Trainer, model: SparseAutoencoder) -> Tensor:
        """a_i = E[f_i]·‖W_d,i‖ over ``sample_rows`` training rows of all ranks, [m]."""
        total = torch.zeros(model.d_sae, dtype=torch.float64, device=model.device)
        rows = torch.zeros((), dtype=torch.float64, device=model.device)
        encoder_was_training = model.encoder.training
        model.encoder.eval()
        seed = self.seed * 1_000_003 + trainer.global_step
        for x, y in ActivationDataModule.of(trainer).sample_batches(self.sample_rows, seed):
            out = model.forward_pass(x.to(model.device), None if y is None else y.to(model.device))
            total += out.features.double().sum(0)
            rows += len(x)
        model.encoder.train(encoder_was_training)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        rows = trainer.strategy.reduce(rows, reduce_op="sum")
        return (total / rows.clamp(min=1)).float() * model.decoder_norms().detach()


def duplicates(decoder: Tensor, contributions: Tensor, cosine: float) -> Tensor:
    """[m] bool: rows i of ``decoder`` [m, d] with cos(W_d,i, W_d,j) > ``cosine`` for some j that
    contributes more (``contributions`` [m]; on a tie, the lower index wins)."""
    directions = F.normalize(decoder.float(), dim=-1)
    m = len(directions)
    order = torch.arange(m, device=decoder.device)
    found = torch.zeros(m, dtype=torch.bool, device=decoder.device)
    block = max(1, SIMILARITY_BLOCK // m)
    for start in range(0, m, block):
        rows = slice(start, start + block)
        mine, theirs = contributions[rows, None], contributions[None, :]
        stronger = (theirs > mine) | ((theirs == mine) & (order[None, :] < order[rows, None]))
        found[rows] = ((directions[rows] @ directions.T > cosine) & stronger).any(1)
    return found
