"""``L0Controller``: the coefficient follows the L0 error, bounded, with a warmup of the target."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sae.errors import UserError
from lightning_sae.target_l0 import L0Controller


def test_the_factor_grows_while_too_dense_and_shrinks_while_too_sparse() -> None:
    controller = L0Controller(target=4.0, gain=0.1)
    controller.update(torch.tensor(9.0), step=0, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(0.1 * math.log(10 / 5))
    controller.update(torch.tensor(4.0), step=1, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(0.1 * math.log(10 / 5)), "no error, no change"
    controller.update(torch.tensor(1.0), step=2, total_steps=100)
    assert controller.factor().item() == pytest.approx(math.exp(0.1 * (math.log(2) + math.log(2 / 5))))


def test_the_factor_stays_bounded() -> None:
    controller = L0Controller(target=1.0, gain=1.0, max_log_factor=3.0)
    for step in range(50):
        controller.update(torch.tensor(1000.0), step=step, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(3.0)


def test_the_warmup_target_falls_geometrically_from_the_first_step_l0() -> None:
    controller = L0Controller(target=3.0, warmup_fraction=0.5)
    controller.update(torch.tensor(63.0), step=0, total_steps=100)
    assert controller.start_log_l0.item() == pytest.approx(math.log(64))
    assert controller.log_target(0, 100).item() == pytest.approx(math.log(64))
    assert controller.log_target(25, 100).item() == pytest.approx((math.log(64) + math.log(4)) / 2)
    assert controller.log_target(50, 100) == pytest.approx(math.log(4))
    assert controller.log_target(90, 100) == pytest.approx(math.log(4))


def test_state_is_saved_with_the_model() -> None:
    controller = L0Controller(target=2.0)
    controller.update(torch.tensor(7.0), step=0, total_steps=10)
    restored = L0Controller(target=2.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.log_factor == controller.log_factor and restored.start_log_l0 == controller.start_log_l0


def test_bad_targets_are_refused() -> None:
    with pytest.raises(UserError, match="target_l0"):
        L0Controller(target=0.0)
    with pytest.raises(UserError, match="target_l0_warmup"):
        L0Controller(target=3.0, warmup_fraction=1.5)
