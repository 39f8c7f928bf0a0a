"""Encoders: forward passes and the straight-through gradients of seed 000 and the JumpReLU paper."""

from __future__ import annotations

import pytest
import torch

from lightning_sae.encoders import BatchTopK, JumpReLU, ReLU, StepFunction, TopK
from lightning_sae.errors import UserError

EPS = 0.5


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 if -1/2 < u < 1/2 else 0 (JumpReLU paper, eq. 10), written out."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def jumprelu_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations placed inside and outside the STE window around θ = exp(t)."""
    log_threshold = torch.tensor([0.0, 0.5, -0.3])
    theta = log_threshold.exp()
    offsets = torch.tensor([[-0.4, -0.1, 0.1], [0.2, 0.3, -0.2], [1.0, -1.0, 0.05], [-0.05, 0.6, 2.0]])
    return theta + offsets, log_threshold


def test_relu_forward() -> None:
    pre = torch.tensor([[-1.0, 0.0, 2.0]])
    assert torch.equal(ReLU(3)(pre, torch.ones(3)), torch.tensor([[0.0, 0.0, 2.0]]))


def test_jumprelu_forward_zeroes_below_threshold() -> None:
    pre, log_threshold = jumprelu_inputs()
    encoder = JumpReLU(3, bandwidth=EPS)
    encoder.log_threshold.data = log_threshold
    expected = torch.where(pre > log_threshold.exp(), pre, torch.zeros_like(pre))
    assert torch.equal(encoder(pre, torch.ones(3)), expected)


def test_jumprelu_initialisation_follows_seed() -> None:
    encoder = JumpReLU(5)
    assert encoder.bandwidth == 2.0 and encoder.ste == "anthropic"
    assert torch.allclose(encoder.log_threshold, torch.full((5,), 0.1))


@pytest.mark.parametrize("ste", ["anthropic", "paper"])
def test_jumprelu_gradients_match_the_formulas(ste: str) -> None:
    pre, log_threshold = jumprelu_inputs()
    pre.requires_grad_(True)
    encoder = JumpReLU(3, bandwidth=EPS, ste=ste)
    encoder.log_threshold.data = log_threshold.clone()
    upstream = torch.randn_like(pre)
    (encoder(pre, torch.ones(3)) * upstream).sum().backward()

    theta = log_threshold.exp()
    window = (((pre.detach() - theta) / EPS).abs() < 0.5).float()
    active = (pre.detach() > theta).float()
    assert window.sum() > 0 and (1 - window).sum() > 0, "inputs must straddle the window"
    if ste == "anthropic":
        # seed 000: dJumpReLU/dt = -exp(t)/ε in the window; the same STE also reaches the input
        expected_t = (upstream * -(theta / EPS) * window).sum(0)
        expected_pre = upstream * (active + theta / EPS * window)
    else:
        # JumpReLU paper eq. 11: dJumpReLU/dθ = -(θ/ε) K((z-θ)/ε), chained through θ = exp(t)
        expected_t = (upstream * -(theta / EPS) * window * theta).sum(0)
        expected_pre = upstream * active
    torch.testing.assert_close(encoder.log_threshold.grad, expected_t)
    torch.testing.assert_close(pre.grad, expected_pre)


@pytest.mark.parametrize("ste", ["anthropic", "paper"])
def test_step_gradients_match_the_formulas(ste: str) -> None:
    pre, log_threshold = jumprelu_inputs()
    pre.requires_grad_(True)
    log_threshold.requires_grad_(True)
    upstream = torch.randn_like(pre)
    (StepFunction.apply(pre, log_threshold, EPS, ste) * upstream).sum().backward()

    theta = log_threshold.detach().exp()
    kernel = rectangle((pre.detach() - theta) / EPS) / EPS
    if ste == "anthropic":
        expected_t = -(upstream * kernel).sum(0)
        expected_pre = upstream * kernel
    else:
        # JumpReLU paper eq. 12: dH/dθ = -(1/ε) K((z-θ)/ε), chained through θ = exp(t); dH/dz = 0
        expected_t = -(upstream * kernel * theta).sum(0)
        expected_pre = torch.zeros_like(pre)
    torch.testing.assert_close(log_threshold.grad, expected_t)
    torch.testing.assert_close(pre.grad, expected_pre)


def test_paper_threshold_gradient_is_the_smoothed_derivative() -> None:
    """The paper's pseudo-derivative is d/dθ of E[H(z-θ)] when z is spread uniformly over a window."""
    theta, width = 1.0, EPS
    z = torch.linspace(theta - 2 * width, theta + 2 * width, 200_001)
    log_threshold = torch.tensor([0.0], requires_grad=True)
    StepFunction.apply(z[:, None], log_threshold, width, "paper").mean().backward()
    density = 1 / (4 * width)
    # d/dθ P(z > θ) = -density; the STE gives -(1/ε)·P(|z-θ| < ε/2)·θ = -(1/ε)·(ε·density)·θ
    torch.testing.assert_close(log_threshold.grad, torch.tensor([-density * theta]), rtol=1e-3, atol=1e-5)


def test_topk_keeps_k_largest_effective_activations() -> None:
    pre = torch.tensor([[3.0, 2.0, 1.0, -1.0]])
    norms = torch.tensor([0.1, 1.0, 1.0, 1.0])
    f = TopK(4, k=2)(pre, norms)
    # effective activations h·‖W_d‖ = 0.3, 2, 1, -1: features 1 and 2 win although h_0 is largest
    assert torch.equal(f, torch.tensor([[0.0, 2.0, 1.0, 0.0]]))


def test_topk_relu_after_selection() -> None:
    f = TopK(3, k=2)(torch.tensor([[-1.0, -2.0, -3.0]]), torch.ones(3))
    assert torch.equal(f, torch.zeros(1, 3))


def test_batchtopk_selects_batch_times_k_and_learns_threshold() -> None:
    torch.manual_seed(0)
    encoder = BatchTopK(16, k=3)
    pre = torch.randn(8, 16).abs() + 0.01
    f = encoder(pre, torch.ones(16))
    assert int((f > 0).sum()) == 8 * 3
    smallest_selected = pre[f > 0].min()
    assert torch.isclose(encoder.key_threshold, smallest_selected)
    encoder.eval()
    f_eval = encoder(pre, torch.ones(16))
    assert torch.equal(f_eval > 0, pre > smallest_selected)


def test_batchtopk_threshold_is_a_running_mean() -> None:
    encoder = BatchTopK(4, k=1, threshold_momentum=0.5)
    encoder(torch.tensor([[4.0, 1.0, 0.0, 0.0]]), torch.ones(4))
    encoder(torch.tensor([[2.0, 1.0, 0.0, 0.0]]), torch.ones(4))
    assert torch.isclose(encoder.key_threshold, torch.tensor(3.0))


@pytest.mark.parametrize("cls", [TopK, BatchTopK])
def test_k_larger_than_d_sae_is_refused(cls: type) -> None:
    with pytest.raises(UserError, match="k=9"):
        cls(8, k=9)


def test_bad_jumprelu_arguments_are_refused() -> None:
    with pytest.raises(UserError, match="bandwidth"):
        JumpReLU(4, bandwidth=0.0)
    with pytest.raises(UserError, match="ste"):
        JumpReLU(4, ste="other")  # type: ignore[arg-type]


@pytest.mark.parametrize("ste", ["anthropic", "paper"])
def test_effective_thresholds_jump_at_h_times_the_decoder_norm(ste: str) -> None:
    """f = h·H(h‖W_d‖ − θ); its pseudo-derivatives are the pre-activation form's, taken at u = h‖W_d‖."""
    torch.manual_seed(0)
    effective = JumpReLU(6, bandwidth=0.5, initial_log_threshold=0.0, ste=ste, threshold_units="effective")
    plain = JumpReLU(6, bandwidth=0.5, initial_log_threshold=0.0, ste=ste)
    h = torch.rand(64, 6) * 3
    norms = torch.tensor([0.5, 1.0, 2.0, 0.8, 1.5, 3.0])
    u = (h * norms).requires_grad_(True)
    h = h.requires_grad_(True)
    f = effective(h, norms)
    torch.testing.assert_close(f, h * (h * norms > 1.0))
    (grad_h,) = torch.autograd.grad(f.sum(), h)
    (grad_u,) = torch.autograd.grad(plain(u, torch.ones(6)).sum(), u)
    torch.testing.assert_close(grad_h, grad_u)
    torch.testing.assert_close(effective.threshold(norms), 1.0 / norms)
    torch.testing.assert_close(effective.step(h, norms), (h * norms > 1.0).float())
