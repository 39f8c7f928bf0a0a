"""``FiringCounter``: rows since each feature fired, the dead mask, the step's L0, revival."""

from __future__ import annotations

import pytest
import torch

from lightning_sae.errors import UserError
from lightning_sae.firing import FiringCounter


def test_counts_rows_since_firing_and_calls_features_dead_after_the_threshold() -> None:
    counter = FiringCounter(d_sae=4, dead_after_tokens=5)
    counter.update(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    assert counter.rows_since_fired.tolist() == [0, 3, 0, 3]
    assert counter.step_counts.tolist() == [2, 0, 1, 0] and counter.step_rows == 3
    assert counter.step_l0().item() == pytest.approx(1.0)
    assert not counter.dead_mask().any()
    counter.update(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert counter.rows_since_fired.tolist() == [2, 5, 0, 5]
    assert counter.dead_mask().tolist() == [False, True, False, True]
    assert counter.known_dead_count == 2  # read at once on a CPU
    counter.revive_(torch.tensor([3]))
    assert counter.dead_mask().tolist() == [False, True, False, False]
    assert counter.known_dead_count == -1  # unknown until the next update


def test_declared_dead_features_are_dead_until_they_fire() -> None:
    counter = FiringCounter(d_sae=3, dead_after_tokens=5)
    counter.update(torch.tensor([[0.0, 1.0, 0.0]] * 2))  # rows since fired: 2, 0, 2
    counter.declare_dead_(torch.tensor([0, 1]))
    assert counter.dead_mask().tolist() == [True, True, False]
    assert counter.known_dead_count == -1  # unknown until the next update
    counter.update(torch.tensor([[0.0, 1.0, 0.0]]))
    assert counter.dead_mask().tolist() == [True, False, False] and counter.known_dead_count == 1


def test_only_the_counts_are_saved() -> None:
    counter = FiringCounter(d_sae=3, dead_after_tokens=2)
    counter.update(torch.tensor([[0.0, 1.0, 0.0]]))
    assert list(counter.state_dict()) == ["rows_since_fired"]
    restored = FiringCounter(d_sae=3, dead_after_tokens=2)
    restored.load_state_dict(counter.state_dict())
    assert restored.rows_since_fired.tolist() == [1, 0, 1]


def test_a_threshold_below_one_row_is_refused() -> None:
    with pytest.raises(UserError, match="dead_after_tokens"):
        FiringCounter(d_sae=3, dead_after_tokens=0)


@pytest.mark.cuda
def test_the_dead_count_reaches_the_host_without_a_synchronisation() -> None:
    counter = FiringCounter(d_sae=64, dead_after_tokens=4).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            counter.update(torch.zeros(8, 64, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    counter.update(torch.zeros(8, 64, device="cuda"))
    assert counter.known_dead_count == 64
