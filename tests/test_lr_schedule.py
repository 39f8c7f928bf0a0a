"""WarmupDecaySchedule: warmup, re-warmup after resampling (seed 001), linear decay (seed 000)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sae.lr_schedule import WarmupDecaySchedule, cosine_ramp


def make_schedule(**kwargs: float) -> WarmupDecaySchedule:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupDecaySchedule(optimizer, total_steps=1000, **kwargs)


def test_decay_is_linear_to_zero_over_the_last_fraction() -> None:
    schedule = make_schedule(decay_fraction=0.2)
    assert schedule.factor(0) == 1.0 and schedule.factor(800) == 1.0
    assert schedule.factor(900) == pytest.approx(0.5)
    assert schedule.factor(1000) == 0.0


def test_warmup_is_a_cosine_from_one_tenth() -> None:
    schedule = make_schedule(warmup_steps=100, decay_fraction=0.0)
    assert schedule.factor(0) == pytest.approx(0.1)
    assert schedule.factor(50) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi / 2)))
    assert schedule.factor(100) == 1.0


def test_rewarmup_restarts_from_one_tenth_at_the_current_step() -> None:
    schedule = make_schedule(rewarmup_steps=10, decay_fraction=0.0)
    for _ in range(30):
        schedule.optimizer.step()
        schedule.step()
    schedule.restart_warmup()
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    lrs = []
    for _ in range(10):
        schedule.optimizer.step()
        schedule.step()
        lrs.append(schedule.optimizer.param_groups[0]["lr"])
    assert lrs == sorted(lrs) and lrs[-1] == 1.0
    assert lrs[4] == pytest.approx(cosine_ramp(0.5, 0.1))


def test_state_dict_keeps_the_rewarmup_starts() -> None:
    schedule = make_schedule(rewarmup_steps=10)
    schedule.restart_warmup()
    restored = make_schedule(rewarmup_steps=10)
    restored.load_state_dict(schedule.state_dict())
    assert restored.rewarmup_starts == [0]
