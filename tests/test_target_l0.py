"""``L0Controller``: a ramp that stops at the target, then a bounded search on log φ."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sae.errors import UserError
from lightning_sae.target_l0 import L0Controller


def test_the_factor_grows_while_too_dense_and_shrinks_while_too_sparse() -> None:
    controller = L0Controller(target=4.0, gain=0.1, smoothing=(0.0, 0.0))
    assert controller.factor(0, 100).item() == 1.0
    controller.update(torch.tensor(9.0), step=0, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(0.1 * math.log(10 / 5))
    controller.update(torch.tensor(4.0), step=1, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(0.1 * math.log(10 / 5)), "no error, no change"
    controller.update(torch.tensor(1.0), step=2, total_steps=100)
    assert controller.factor(3, 100).item() == pytest.approx(math.exp(0.1 * (math.log(2) + math.log(2 / 5))))


def test_the_factor_holds_while_the_l0_already_moves_towards_the_target() -> None:
    controller = L0Controller(target=4.0, gain=0.1, smoothing=(0.5, 0.5))
    controller.update(torch.tensor(20.0), step=0, total_steps=100)  # no trend yet: integrate
    grown = controller.log_factor.item()
    assert grown > 0
    for step, l0 in enumerate([16.0, 12.0, 9.0], start=1):  # too dense, but falling: hold
        controller.update(torch.tensor(l0), step=step, total_steps=100)
        assert controller.log_factor.item() == grown
    controller.update(torch.tensor(14.0), step=4, total_steps=100)  # rising again while too dense
    assert controller.log_factor.item() > grown
    assert controller.mean_l0.item() == pytest.approx(0.5 * (0.5 * (0.5 * (0.5 * 20 + 8) + 6) + 4.5) + 7)


def test_an_approach_too_slow_to_reach_the_target_within_the_horizon_is_pushed() -> None:
    controller = L0Controller(target=3.0, gain=0.1, smoothing=(0.0, 0.0), approach_horizon=0.2)  # 20 of 100 steps
    controller.update(torch.tensor(16.0), step=0, total_steps=100)
    pushed = controller.log_factor.item()
    controller.update(torch.tensor(15.9), step=1, total_steps=100)  # falling, but ~240 steps from the target
    assert controller.log_factor.item() == pytest.approx(pushed + 0.1 * math.log(16.9 / 4))
    held = controller.log_factor.item()
    controller.update(torch.tensor(12.0), step=2, total_steps=100)  # falling fast enough: reaches it in ~5 steps
    assert controller.log_factor.item() == held


def test_bad_horizons_are_refused() -> None:
    with pytest.raises(UserError, match="approach_horizon"):
        L0Controller(target=3.0, approach_horizon=-0.1)
    with pytest.raises(UserError, match="settle_fraction"):
        L0Controller(target=3.0, settle_fraction=1.5)


def test_the_factor_holds_through_the_settling_after_a_resampling() -> None:
    controller = L0Controller(target=3.0, gain=0.1, smoothing=(0.5, 0.5), settle_fraction=0.1)  # 10 of 100 steps
    controller.update(torch.tensor(3.0), step=0, total_steps=100)
    controller.hold(step=0, total_steps=100)
    for step in range(1, 11):  # revived features fire everywhere: L0 jumps, φ waits
        controller.update(torch.tensor(500.0), step=step, total_steps=100)
        assert controller.log_factor.item() == 0.0
    assert controller.mean_l0.item() > 400, "the averages follow the L0 while φ holds"
    controller.update(torch.tensor(500.0), step=11, total_steps=100)
    assert controller.log_factor.item() > 0, "the search resumes after the settling"


def test_the_factor_stays_bounded() -> None:
    controller = L0Controller(target=1.0, gain=1.0, max_log_factor=3.0, smoothing=(0.0, 0.0))
    for step in range(50):
        controller.update(torch.tensor(1000.0), step=step, total_steps=100)
    assert controller.log_factor.item() == pytest.approx(3.0)


def test_the_ramp_rises_linearly_while_too_dense_and_hands_over_at_its_end() -> None:
    controller = L0Controller(target=3.0, warmup_fraction=0.1, gain=0.1, smoothing=(0.0, 0.0))
    for step in range(10):
        assert controller.factor(step, 100).item() == pytest.approx((step + 1) / 10)
        controller.update(torch.tensor(20.0), step=step, total_steps=100)
    assert not controller.ramping
    assert controller.factor(10, 100).item() == pytest.approx(math.exp(0.1 * math.log(21 / 4)))


def test_the_ramp_stops_where_the_target_is_reached() -> None:
    controller = L0Controller(target=3.0, warmup_fraction=0.5, gain=0.1, smoothing=(0.0, 0.0))
    controller.update(torch.tensor(20.0), step=0, total_steps=100)
    controller.update(torch.tensor(20.0), step=1, total_steps=100)
    controller.update(torch.tensor(2.0), step=2, total_steps=100)  # sparse enough at φ = 3/50
    assert not controller.ramping
    expected = math.log(3 / 50) + 0.1 * math.log(3 / 4)
    assert controller.log_factor.item() == pytest.approx(expected)
    assert controller.factor(40, 100).item() == pytest.approx(math.exp(expected)), "the ramp does not resume"


def test_a_ramp_starting_at_or_below_the_target_runs_until_l0_falls_back_to_it_from_above() -> None:
    controller = L0Controller(target=10.0, warmup_fraction=0.5, gain=0.1, smoothing=(0.0, 0.0))
    controller.update(torch.tensor(9.0), step=0, total_steps=100)  # b_enc calibrated to the target
    assert controller.ramping, "an L0 that has not yet risen above the target does not end the ramp"
    assert controller.factor(1, 100).item() == pytest.approx(2 / 50)
    controller.update(torch.tensor(300.0), step=1, total_steps=100)  # λ ≈ 0 lets features wake
    assert controller.ramping
    controller.update(torch.tensor(10.0), step=2, total_steps=100)
    assert not controller.ramping
    assert controller.log_factor.item() == pytest.approx(math.log(3 / 50))


def test_state_is_saved_with_the_model() -> None:
    controller = L0Controller(target=2.0, warmup_fraction=0.5)
    controller.update(torch.tensor(3.0), step=0, total_steps=10)
    controller.update(torch.tensor(1.0), step=1, total_steps=10)
    restored = L0Controller(target=2.0, warmup_fraction=0.5)
    restored.load_state_dict(controller.state_dict())
    assert restored.log_factor == controller.log_factor and not restored.ramping
    assert restored.mean_l0 == controller.mean_l0 and restored.slow_mean_l0 == controller.slow_mean_l0
    controller.hold(step=3, total_steps=10)
    restored.load_state_dict(controller.state_dict())
    assert restored.held_until == controller.held_until and restored.was_above == controller.was_above


def test_bad_targets_are_refused() -> None:
    with pytest.raises(UserError, match="target_l0"):
        L0Controller(target=0.0)
    with pytest.raises(UserError, match="target_l0_warmup"):
        L0Controller(target=3.0, warmup_fraction=1.5)


def test_a_gliding_target_falls_geometrically_over_the_warmup() -> None:
    controller = L0Controller(target=3.0, warmup_fraction=0.5, glide=10.0)
    assert controller.target_at(-1, 100) == pytest.approx(30.0)
    assert controller.target_at(24, 100) == pytest.approx(3.0 * 10**0.5)
    assert controller.target_at(49, 100) == pytest.approx(3.0)
    assert controller.target_at(80, 100) == pytest.approx(3.0)
    assert L0Controller(target=3.0, warmup_fraction=0.5).target_at(0, 100) == 3.0


def test_a_glide_searches_from_the_configured_coefficient_towards_the_moving_target() -> None:
    controller = L0Controller(target=3.0, warmup_fraction=0.5, gain=0.1, smoothing=(0.0, 0.0), glide=10.0)
    assert not controller.ramping and controller.factor(0, 100).item() == 1.0, "no ramp from 0"
    controller.update(torch.tensor(20.0), step=0, total_steps=100)  # sparser than the target of 30 · 10^(-1/50)
    first_target = controller.target_at(0, 100)
    assert controller.log_factor.item() == pytest.approx(0.1 * (math.log(21) - math.log1p(first_target)))
    controller.update(torch.tensor(20.0), step=1, total_steps=100)  # no trend, 20 below the target: keeps falling
    assert controller.log_factor.item() < 0
    late = L0Controller(target=3.0, warmup_fraction=0.5, gain=0.1, smoothing=(0.0, 0.0), glide=10.0)
    late.update(torch.tensor(20.0), step=60, total_steps=100)  # after the glide the target is T itself
    assert late.log_factor.item() == pytest.approx(0.1 * math.log(21 / 4))


def test_a_glide_below_one_is_refused() -> None:
    with pytest.raises(UserError, match="target_l0_glide"):
        L0Controller(target=3.0, glide=0.5)
