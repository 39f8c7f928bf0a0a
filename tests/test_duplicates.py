"""``DuplicatePruning``: the weaker of two features with one decoder direction is silenced, for good,
alike on every rank. (That it lets the ReLU-L1 recipe reconstruct as well as TopK at the same L0 is
tested by outcome in ``test_recipes.py``.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, LightningModule, Trainer

from lightning_sae.callbacks import duplicates as duplicates_module
from lightning_sae.callbacks.duplicates import DuplicatePruning, duplicates
from lightning_sae.callbacks.resampling import Resampling
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder
from lightning_sae.penalties import L1

PRUNE_STEP = 3


def test_the_weaker_of_two_parallel_rows_is_the_duplicate() -> None:
    decoder = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    contributions = torch.tensor([1.0, 5.0, 1.0, 0.0, 2.0])
    # row 0 repeats the stronger row 1 (cos 0.999); row 2 is orthogonal; an empty row repeats nothing
    assert duplicates(decoder, contributions, cosine=0.9).tolist() == [True, False, False, False, False]
    assert duplicates(decoder, contributions, cosine=0.9999).tolist() == [False] * 5


def test_on_a_tie_the_lower_index_stays() -> None:
    decoder = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert duplicates(decoder, torch.ones(3), cosine=0.5).tolist() == [False, True, True]


def test_blocks_give_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, 8, generator=generator)
    decoder = torch.cat([base, base[:20] + 0.05 * torch.randn(20, 8, generator=generator)])
    contributions = torch.rand(60, generator=generator)
    whole = duplicates(decoder, contributions, cosine=0.95)
    monkeypatch.setattr(duplicates_module, "SIMILARITY_BLOCK", 7 * 60)  # 7 rows per block
    assert torch.equal(duplicates(decoder, contributions, cosine=0.95), whole)
    assert whole.sum() == 20  # one of each of the 20 pairs


class Snapshot(Callback):
    """The model just before and just after the pruning step's batch starts (listed around the pruning)."""

    def __init__(self) -> None:
        self.models: list[SparseAutoencoder] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == PRUNE_STEP:
            assert isinstance(pl_module, SparseAutoencoder)
            self.models.append(copy.deepcopy(pl_module))
            state = trainer.optimizers[0].state
            self.exp_avg = {name: state[param]["exp_avg"].clone() for name, param in pl_module.named_parameters()}


def duplicated_model(data: ActivationDataModule) -> SparseAutoencoder:
    """A ReLU + L1 SAE whose features 16..31 copy features 0..15 (encoder and decoder), at half strength."""
    model = SparseAutoencoder(d_in=data.d_in, d_sae=32, penalties=[L1(0.05)], lr=1e-3, input_scale=data.input_scale)
    with torch.no_grad():
        model.W_enc[:, 16:] = 0.5 * model.W_enc[:, :16]
        model.W_dec[16:] = 0.5 * model.W_dec[:16]
    return model


def test_duplicates_are_silenced_for_good(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = duplicated_model(data)
    before, after = Snapshot(), Snapshot()
    pruning = DuplicatePruning(steps=[PRUNE_STEP], cosine=0.99, sample_rows=1024)
    callback_trainer(PRUNE_STEP + 20, [before, pruning, after]).fit(model, data)
    pruned = after.models[0]

    silenced = (pruned.W_enc.abs().sum(0) == 0).nonzero().flatten()
    assert silenced.tolist() == list(range(16, 32))  # the weaker copy of each pair
    assert torch.all(pruned.b_enc[silenced] == -1)
    kept = torch.arange(16)
    assert torch.equal(pruned.W_enc[:, kept], before.models[0].W_enc[:, kept])
    assert torch.all(after.exp_avg["W_enc"][:, silenced] == 0) and torch.all(after.exp_avg["b_enc"][silenced] == 0)
    assert after.exp_avg["W_enc"][:, kept].abs().sum() > 0

    x = next(iter(data.val_dataloader()))[0]
    with torch.no_grad():
        assert not (model.encode(x)[:, silenced] > 0).any(), "silenced features never fire again"
        assert torch.all(model.W_enc[:, silenced] == 0)
    assert pruning.state_dict() == {"last_step": PRUNE_STEP}


class SavePruned(DuplicatePruning):
    """Writes the features each rank pruned, and its final weights, to ``<directory>/rank<r>.pt``."""

    def __init__(self, directory: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = directory

    def intervene(self, trainer: Trainer, model: SparseAutoencoder) -> torch.Tensor:
        self.pruned = super().intervene(trainer, model)
        return self.pruned

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        weights = {name: value.clone() for name, value in pl_module.state_dict().items()}
        torch.save({"pruned": self.pruned, "weights": weights}, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_ranks_prune_the_same_features(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    """Each rank measures the contributions on its own rows; the sums over both ranks decide."""
    data = toy_data()
    model = SparseAutoencoder(d_in=data.d_in, d_sae=32, penalties=[L1(0.1)], lr=3e-3, input_scale=data.input_scale)
    pruning = SavePruned(tmp_path, steps=[PRUNE_STEP], cosine=0.5, sample_rows=1024)
    callback_trainer(PRUNE_STEP + 3, [pruning], strategy="ddp_spawn", devices=2).fit(model, data)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert len(ranks[0]["pruned"]) > 0
    assert torch.equal(ranks[0]["pruned"], ranks[1]["pruned"])
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], value), name


def test_a_resampling_after_the_pruning_repoints_the_pruned_features(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    """Silenced features count as dead at once, so a resampling point one step later (far inside the
    dead-feature window) hands them to badly reconstructed rows, and they fire again."""
    data = toy_data()
    model = duplicated_model(data)
    after = Snapshot()
    pruning = DuplicatePruning(steps=[PRUNE_STEP - 1], cosine=0.99, sample_rows=256)
    callbacks = [pruning, Resampling(steps=[PRUNE_STEP], sample_rows=256), after]
    callback_trainer(PRUNE_STEP + 1, callbacks).fit(model, data)
    (revived,) = after.models  # just after the resampling
    assert model.firing.dead_after_tokens > PRUNE_STEP * 64
    assert revived.W_enc[:, 16:].abs().sum(0).min() > 0, "every pruned feature was re-pointed"
    x = next(iter(data.val_dataloader()))[0]
    with torch.no_grad():
        assert (revived.encode(x)[:, 16:] > 0).any(0).all(), "and fires again"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "either steps or fractions"),
        ({"fractions": [1.5]}, "between 0 and 1"),
        ({"steps": [3], "cosine": 1.0}, "cosine"),
        ({"steps": [3], "sample_rows": 0}, "sample_rows"),
    ],
)
def test_bad_arguments_are_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        DuplicatePruning(**kwargs)
