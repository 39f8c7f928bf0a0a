"""Penalties: values and gradients against the formulas of the seeds and papers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_sae.encoders import JumpReLU, ReLU, TopK
from lightning_sae.errors import UserError
from lightning_sae.output import SAEOutput
from lightning_sae.penalties import L0, L1, AuxK, PreAct, Tanh


def make_output(
    batch: int = 6, d: int = 5, m: int = 7, encoder: torch.nn.Module | None = None, dead: torch.Tensor | None = None
) -> SAEOutput:
    """A forward pass with leaf tensors for pre-activations and the decoder; ``dead``: the dead mask."""
    torch.manual_seed(1)
    x = torch.randn(batch, d)
    pre_acts = torch.randn(batch, m, requires_grad=True)
    W_dec = (torch.randn(m, d) * 0.5).requires_grad_(True)
    norms = W_dec.norm(dim=1)
    features = encoder(pre_acts, norms) if encoder is not None else torch.relu(pre_acts)
    reconstruction = features @ W_dec
    dead = torch.zeros(m, dtype=torch.bool) if dead is None else dead
    return SAEOutput(x, x, pre_acts, features, reconstruction, norms, W_dec, dead)


def test_l1_equals_the_materialised_formula_in_value_and_gradient() -> None:
    out = make_output()
    penalty = L1(coefficient=5.0)
    value = penalty(out, ReLU(7))
    # seed 002's naive route: the [batch, m, d] tensor of feature vectors f_i·W_d,i, then L2, then L1
    naive = (out.features[:, :, None] * out.W_dec[None]).norm(dim=-1).sum(-1).mean()
    torch.testing.assert_close(value, naive)
    grads = torch.autograd.grad(value, (out.pre_acts, out.W_dec), retain_graph=True)
    naive_grads = torch.autograd.grad(naive, (out.pre_acts, out.W_dec))
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got, want)


def test_tanh_value_and_gradient() -> None:
    out = make_output()
    c = 4.0
    value = Tanh(coefficient=20.0, c=c)(out, ReLU(7))
    u = c * out.features * out.decoder_norms
    torch.testing.assert_close(value, torch.tanh(u).sum(-1).mean())
    (grad_pre,) = torch.autograd.grad(value, out.pre_acts, retain_graph=True)
    active = (out.pre_acts > 0).float()
    # d/dh tanh(c·relu(h)·‖W_d‖) = c·‖W_d‖·(1 − tanh²)·1[h > 0], averaged over the batch
    expected = c * out.decoder_norms * (1 - torch.tanh(u) ** 2) * active / out.pre_acts.shape[0]
    torch.testing.assert_close(grad_pre, expected.detach())


def test_preact_pulls_inactive_features_towards_their_threshold() -> None:
    encoder = JumpReLU(7, bandwidth=1.0)
    out = make_output(encoder=encoder)
    value = PreAct(coefficient=3e-6)(out, encoder)
    theta = encoder.log_threshold.exp()
    gap = torch.relu(theta - out.pre_acts)
    torch.testing.assert_close(value, (gap * out.decoder_norms).sum(-1).mean())
    grad_pre, grad_t = torch.autograd.grad(value, (out.pre_acts, encoder.log_threshold))
    below = (out.pre_acts < theta).float()
    batch = out.pre_acts.shape[0]
    torch.testing.assert_close(grad_pre, (-out.decoder_norms * below / batch).detach())
    torch.testing.assert_close(grad_t, (theta * out.decoder_norms * below).sum(0).detach() / batch)


def test_preact_with_relu_uses_zero_threshold() -> None:
    out = make_output()
    value = PreAct()(out, ReLU(7))
    torch.testing.assert_close(value, (torch.relu(-out.pre_acts) * out.decoder_norms).sum(-1).mean())


@pytest.mark.parametrize("ste", ["anthropic", "paper"])
def test_l0_counts_active_features_and_trains_the_threshold(ste: str) -> None:
    encoder = JumpReLU(7, bandwidth=1.0, ste=ste)
    out = make_output(encoder=encoder)
    value = L0(coefficient=1.0)(out, encoder)
    theta = encoder.log_threshold.exp()
    torch.testing.assert_close(value, (out.pre_acts > theta).float().sum(-1).mean())
    (grad_t,) = torch.autograd.grad(value, encoder.log_threshold)
    kernel = (((out.pre_acts - theta) / 1.0).abs() < 0.5).float().detach()
    chain = 1.0 if ste == "anthropic" else theta.detach()
    torch.testing.assert_close(grad_t, -(kernel.sum(0) * chain) / out.pre_acts.shape[0])


def test_tanh_through_a_jumprelu_has_the_same_value_and_the_jump_as_its_threshold_gradient() -> None:
    """Σ H(h − θ)·tanh(c·h·‖W_d‖): the threshold gradient is −(1/ε)·K·tanh(c·h·‖W_d‖)
    (the penalty's jump), not −(θ/ε)·K times tanh's slope at f."""
    encoder = JumpReLU(7, bandwidth=1.0, initial_log_threshold=0.0)
    out = make_output(encoder=encoder)
    c = 4.0
    value = Tanh(coefficient=20.0, c=c)(out, encoder)
    torch.testing.assert_close(value, torch.tanh(c * out.features * out.decoder_norms).sum(-1).mean())
    (grad_t,) = torch.autograd.grad(value, encoder.log_threshold, retain_graph=True)
    h = out.pre_acts.detach()
    window = ((h - 1.0).abs() < 0.5).float()
    jump = torch.tanh(c * h.clamp_min(0) * out.decoder_norms.detach())
    torch.testing.assert_close(grad_t, -(window * jump).sum(0) / h.shape[0])


def test_l0_needs_a_jumprelu() -> None:
    with pytest.raises(UserError, match="JumpReLU"):
        L0().bind(4, 8, ReLU(8))


def test_auxk_is_zero_without_dead_features_and_reconstructs_the_residual_with_dead_ones() -> None:
    encoder = TopK(7, k=2)
    penalty = AuxK(coefficient=1 / 32, k_aux=2)
    penalty.bind(5, 7, encoder)
    assert float(penalty(make_output(encoder=encoder), encoder)) == 0.0
    dead = torch.tensor([True, False, True, True, False, False, False])
    out = make_output(encoder=encoder, dead=dead)
    value = penalty(out, encoder)
    masked = out.pre_acts.detach().masked_fill(~dead, float("-inf"))
    top = masked.topk(2, dim=-1)
    aux = torch.zeros_like(masked).scatter(-1, top.indices, torch.relu(top.values))
    residual = (out.target - out.reconstruction).detach()
    expected = (residual - aux @ out.W_dec.detach()).pow(2).sum(-1).mean()
    torch.testing.assert_close(value, expected)
    (grad_pre,) = torch.autograd.grad(value, out.pre_acts)
    assert (grad_pre[:, ~dead] == 0).all(), "only dead features get the auxiliary gradient"


def test_auxk_with_fewer_dead_features_than_k_aux_decodes_only_those() -> None:
    encoder = TopK(7, k=2)
    penalty = AuxK(k_aux=5)
    penalty.bind(5, 7, encoder)
    dead = torch.tensor([False, True, False, False, False, False, False])
    out = make_output(encoder=encoder, dead=dead)
    residual = (out.target - out.reconstruction).detach()
    aux = torch.relu(out.pre_acts.detach()[:, 1:2]) @ out.W_dec.detach()[1:2]
    torch.testing.assert_close(penalty(out, encoder), (residual - aux).pow(2).sum(-1).mean())


def test_auxk_searching_the_known_dead_columns_equals_searching_every_feature() -> None:
    encoder = TopK(7, k=2)
    penalty = AuxK(k_aux=2)
    penalty.bind(5, 7, encoder)
    dead = torch.tensor([True, False, False, True, False, True, False])
    results = []
    for known in (-1, 3):  # unknown: every column; 3: only the dead ones (3 ≤ m // 2)
        out = dataclasses.replace(make_output(encoder=encoder, dead=dead), dead_count=known)
        value = penalty(out, encoder)
        results.append((value, *torch.autograd.grad(value, (out.pre_acts, out.W_dec))))
    for searched, full in zip(*results):
        torch.testing.assert_close(searched, full)
    assert float(penalty(dataclasses.replace(make_output(encoder=encoder, dead=dead), dead_count=0), encoder)) == 0


def test_negative_coefficient_is_refused() -> None:
    with pytest.raises(UserError, match="coefficient"):
        Tanh(coefficient=-1.0)


def test_current_coefficient_follows_the_factor_and_names_are_snake_case() -> None:
    penalty = PreAct(coefficient=2.0)
    penalty.factor = 0.25
    assert penalty.current_coefficient == 0.5
    assert penalty.name == "pre_act" and AuxK().name == "aux_k" and L1().name == "l1"
