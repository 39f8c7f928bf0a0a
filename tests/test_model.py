"""SparseAutoencoder: initialisation (seed 000), forward pass, loss assembly, plugin round trip."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from test_cli import expect_user_error, fit_args

from lightning_sae.cli import main
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import BatchTopK, JumpReLU, ReLU, TopK
from lightning_sae.errors import UserError
from lightning_sae.model import SparseAutoencoder, instantiate, plugin_spec
from lightning_sae.penalties import L0, L1, AuxK, PreAct, Tanh


def test_initialisation_matches_the_recipe_when_x_equals_y() -> None:
    n, m = 64, 1024
    model = SparseAutoencoder(d_in=n, d_sae=m, encoder=JumpReLU)
    bound = 1 / math.sqrt(n)
    assert model.W_dec.abs().max() <= bound
    # U(-a, a) has variance a²/3
    assert model.W_dec.var().item() == pytest.approx(bound**2 / 3, rel=0.05)
    torch.testing.assert_close(model.W_enc, model.W_dec.T * (n / m))
    assert (model.b_enc == 0).all() and (model.b_dec == 0).all()
    assert torch.allclose(model.encoder.log_threshold, torch.full((m,), 0.1))


def test_initialisation_matches_the_recipe_when_x_differs_from_y() -> None:
    n, m, o = 32, 512, 24
    model = SparseAutoencoder(d_in=n, d_sae=m, d_out=o)
    assert model.W_dec.shape == (m, o) and model.W_dec.abs().max() <= 1 / math.sqrt(n)
    assert model.W_enc.abs().max() <= 1 / math.sqrt(m)
    assert model.W_enc.var().item() == pytest.approx(1 / (3 * m), rel=0.05)


def test_loss_is_summed_squared_error_plus_weighted_penalties() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, penalties=[L1(coefficient=0.5), Tanh(coefficient=2.0)])
    model.penalties[1].factor = 0.5
    x = torch.randn(4, 8)
    out = model.forward_pass(x)
    total, terms = model.loss(out)
    mse = ((x - out.reconstruction) ** 2).sum(-1).mean()
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(total, mse + 0.5 * terms["l1"] + 1.0 * terms["tanh"])


def test_forward_works_in_raw_space_and_the_loss_in_scaled_space() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, input_scale=4.0)
    x = torch.randn(5, 8)
    out = model.forward_pass(x)
    torch.testing.assert_close(out.input, 4.0 * x)
    torch.testing.assert_close(model(x), out.reconstruction / 4.0)
    torch.testing.assert_close(model.encode(x), out.features)


def test_transcoder_scales_targets_separately() -> None:
    model = SparseAutoencoder(d_in=6, d_sae=12, d_out=4, input_scale=2.0, target_scale=3.0)
    x, y = torch.randn(3, 6), torch.randn(3, 4)
    out = model.forward_pass(x, y)
    torch.testing.assert_close(out.target, 3.0 * y)
    torch.testing.assert_close(model(x), out.reconstruction / 3.0)
    with pytest.raises(UserError, match="targets"):
        model.forward_pass(x)


def test_duplicate_penalties_log_under_distinct_names() -> None:
    model = SparseAutoencoder(d_in=4, d_sae=8, penalties=[L1(), L1(coefficient=1.0)])
    assert model.penalty_names == ["l1", "l1_2"]


@pytest.mark.parametrize(
    "plugin",
    [JumpReLU(8, bandwidth=0.3, ste="paper"), TopK(8, k=3), BatchTopK(8, k=2, threshold_momentum=0.9), ReLU(8)],
)
def test_encoder_spec_round_trips(plugin: torch.nn.Module) -> None:
    spec = plugin_spec(plugin, skip=("d_sae",))
    rebuilt = instantiate({"class_path": spec["class_path"], "init_args": {"d_sae": 8, **spec["init_args"]}})
    assert type(rebuilt) is type(plugin)
    assert plugin_spec(rebuilt, skip=("d_sae",)) == spec


@pytest.mark.parametrize("plugin", [L1(3.0), Tanh(7.0, c=2.0), L0(0.1), PreAct(1e-5), AuxK(0.5, k_aux=4)])
def test_penalty_spec_round_trips(plugin: torch.nn.Module) -> None:
    spec = plugin_spec(plugin)
    assert plugin_spec(instantiate(spec)) == spec


def test_bad_dimensions_and_scales_are_refused() -> None:
    with pytest.raises(UserError, match="positive"):
        SparseAutoencoder(d_in=0, d_sae=8)
    with pytest.raises(UserError, match="input_scale"):
        SparseAutoencoder(d_in=4, d_sae=8, input_scale=float("nan"))


def test_centred_input_encodes_x_minus_b_dec_and_folds_to_the_same_predictions() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, center_input=True, input_scale=2.0)
    with torch.no_grad():
        model.b_dec.normal_()
        model.b_enc.normal_(0, 0.3)
    x = torch.randn(32, 8)
    out = model.forward_pass(x)
    torch.testing.assert_close(out.pre_acts, (2.0 * x - model.b_dec) @ model.W_enc + model.b_enc)
    folded = model.folded()
    assert not folded.center_input
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="center_input"):
        SparseAutoencoder(d_in=8, d_sae=16, d_out=4, center_input=True)


def test_gao_initialisation_and_learning_rate_rule() -> None:
    model = SparseAutoencoder(d_in=32, d_sae=256, decoder_init_norm=1.0, encoder_init_scale=1.0, lr=None)
    torch.testing.assert_close(model.decoder_norms(), torch.ones(256))
    torch.testing.assert_close(model.W_enc, model.W_dec.T)
    assert model.learning_rate() == pytest.approx(2e-4 * math.sqrt(2**14 / 256))
    assert SparseAutoencoder(d_in=32, d_sae=256, lr=3e-3).learning_rate() == 3e-3


def test_target_l0_controls_the_one_sparsity_penalty() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, penalties=[Tanh(1.0), PreAct()], target_l0=4.0)
    assert model.controlled_penalty is model.penalties[0]
    with pytest.raises(UserError, match="exactly one sparsity penalty"):
        SparseAutoencoder(d_in=8, d_sae=16, penalties=[PreAct()], target_l0=4.0)
    with pytest.raises(UserError, match="exactly one sparsity penalty"):
        SparseAutoencoder(d_in=8, d_sae=16, penalties=[L1(1.0), Tanh(1.0)], target_l0=4.0)


def test_a_glide_starts_the_search_at_the_configured_coefficient_with_a_higher_l0_target() -> None:
    model = SparseAutoencoder(
        d_in=8, d_sae=16, penalties=[L1(1.0)], target_l0=4.0, target_l0_warmup=0.5, target_l0_glide=10.0
    )
    assert model.l0_controller.target_at(-1, 100) == pytest.approx(40.0)
    assert model.l0_controller.factor(0, 100).item() == 1.0
    ramped = SparseAutoencoder(d_in=8, d_sae=16, penalties=[L1(1.0)], target_l0=4.0, target_l0_warmup=0.5)
    assert ramped.l0_controller.factor(0, 100).item() == pytest.approx(1 / 50)


def test_checkpoints_of_earlier_versions_load() -> None:
    """Before the model's firing counter, AuxK had its own dead_after_tokens and rows-since-fired buffer."""
    model = SparseAutoencoder(d_in=8, d_sae=16, encoder=lambda m: TopK(m, k=2), penalties=[AuxK()])
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("firing.")}
    state["penalties.0.tokens_since_fired"] = torch.arange(16)
    hyper_parameters = {key: value for key, value in model.hparams.items() if key != "dead_after_tokens"}
    auxk = {"class_path": "lightning_sae.penalties.AuxK",
            "init_args": {"coefficient": 0.5, "k_aux": 4, "dead_after_tokens": 1234}}
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": hyper_parameters,
        "plugins": {"encoder": plugin_spec(model.encoder, skip=("d_sae",)), "penalties": [auxk]},
    }
    restored = SparseAutoencoder.from_checkpoint_dict(checkpoint)
    assert restored.firing.rows_since_fired.tolist() == list(range(16))
    assert restored.firing.dead_after_tokens == 1234
    assert restored.penalties[0].coefficient == 0.5


def test_checkpoints_of_a_controller_without_a_smoothed_l0_a_hold_or_a_ramp_from_above_load() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16, penalties=[L1(1.0)], target_l0=4.0)
    old_keys = ("mean_l0", "held_until", "was_above")
    state = {key: value for key, value in model.state_dict().items() if not key.endswith(old_keys)}
    state["l0_controller.log_factor"] = torch.tensor(0.5)
    hyper_parameters = dict(model.hparams)
    plugins = {"encoder": plugin_spec(model.encoder, skip=("d_sae",)), "penalties": [plugin_spec(model.penalties[0])]}
    checkpoint = {"state_dict": state, "hyper_parameters": hyper_parameters, "plugins": plugins}
    restored = SparseAutoencoder.from_checkpoint_dict(checkpoint)
    assert restored.l0_controller.log_factor.item() == 0.5 and restored.l0_controller.mean_l0.item() == -1
    assert restored.l0_controller.held_until.item() == -1
    assert restored.l0_controller.was_above.item(), "an earlier ramp ended at any L0 at or below the target"


def test_a_model_holding_nan_or_inf_is_not_checkpointed() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16)
    with torch.no_grad():
        model.b_dec[2] = float("inf")
    with pytest.raises(UserError, match="b_dec holds NaN or Inf at step 0: training diverged"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})


@pytest.fixture(scope="module")
def short_fit(toy_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """The arguments of a 20-step command-line fit on the toy file, and its checkpoint."""
    root = tmp_path_factory.mktemp("short_fit")
    args = [*fit_args(toy_file, root), "--trainer.max_steps", "20", "--trainer.val_check_interval", "20"]
    main(args)
    (checkpoint,) = root.glob("relu-l1/*/checkpoints/*.ckpt")
    return args, checkpoint


def test_a_checkpoint_with_bytes_overwritten_in_W_enc_is_neither_exported_nor_resumed(
    short_fit: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, checkpoint = short_fit
    data = checkpoint.read_bytes()
    offset = data.find(torch.load(checkpoint, weights_only=True)["state_dict"]["W_enc"].numpy().tobytes())
    assert offset > 0
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(data[:offset] + b"\xff" * 8 + data[offset + 8 :])  # W_enc[0, :2] = NaN
    message = f"{damaged} holds NaN or Inf in W_enc: it is corrupt"
    expect_user_error(["export", "--ckpt", str(damaged), "--out", str(tmp_path / "sae")], capsys, message)
    assert not (tmp_path / "sae").exists()
    expect_user_error([*args, "--ckpt_path", str(damaged), "--trainer.max_steps", "40"], capsys, message)


def test_a_checkpoint_with_nan_in_the_adam_state_is_not_resumed_but_its_weights_export(
    short_fit: tuple[list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, checkpoint = short_fit
    state = torch.load(checkpoint, weights_only=True)
    names = [name for name, _ in SparseAutoencoder.from_checkpoint(checkpoint).named_parameters()]
    state["optimizer_states"][0]["state"][names.index("W_enc")]["exp_avg"][0, 0] = float("nan")
    damaged = tmp_path / "damaged.ckpt"
    torch.save(state, damaged)
    message = f"{damaged} holds NaN or Inf in the optimizer state of W_enc (exp_avg): it is corrupt"
    expect_user_error([*args, "--ckpt_path", str(damaged), "--trainer.max_steps", "40"], capsys, message)
    main(["export", "--ckpt", str(damaged), "--out", str(tmp_path / "sae")])
    assert (tmp_path / "sae" / "sae_weights.safetensors").is_file()


def test_warmups_are_steps_or_fractions_of_the_run() -> None:
    model = SparseAutoencoder(d_in=8, d_sae=16)
    model.total_steps = 3000
    assert model._steps(250) == 250 and model._steps(0.1) == 300 and model._steps(0) == 0
    with pytest.raises(UserError, match=">= 0"):
        model._steps(-1)


@pytest.mark.parametrize("d_out", [None, 6])
def test_sparse_decoding_equals_dense_in_values_and_gradients(d_out: int | None) -> None:
    models = {}
    for decoding in ("dense", "sparse"):
        torch.manual_seed(3)
        model = SparseAutoencoder(d_in=8, d_sae=64, d_out=d_out, encoder=lambda m: TopK(m, k=4), decoding=decoding)
        x, y = torch.randn(32, 8), torch.randn(32, d_out or 8)
        out = model.forward_pass(x, None if d_out is None else y)
        total, _ = model.loss(out)
        total.backward()
        models[decoding] = (out, model)
    (dense_out, dense), (sparse_out, sparse) = models["dense"], models["sparse"]
    torch.testing.assert_close(sparse_out.reconstruction, dense_out.reconstruction)
    torch.testing.assert_close(sparse_out.features, dense_out.features)
    for name, parameter in dense.named_parameters():
        torch.testing.assert_close(dict(sparse.named_parameters())[name].grad, parameter.grad, msg=name)
    torch.testing.assert_close(sparse(x), dense(x))


def test_sparse_decoding_needs_an_encoder_that_selects_k_features() -> None:
    with pytest.raises(UserError, match="decoding='sparse' needs"):
        SparseAutoencoder(d_in=8, d_sae=64, decoding="sparse")


def test_a_compiled_fit_gives_the_uncompiled_results(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    trained = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = SparseAutoencoder(d_in=16, d_sae=32, encoder=lambda m: TopK(m, k=2), penalties=[AuxK()],
                                  input_scale=data.input_scale, compile=compiled)
        callback_trainer(3, []).fit(model, data)
        trained.append(model)
    for name, value in trained[0].state_dict().items():
        torch.testing.assert_close(trained[1].state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name)
    x = torch.randn(8, 16)
    torch.testing.assert_close(trained[1].folded()(x), trained[1](x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_of_a_fused_adam_are_clipped(algorithm: str) -> None:
    model = SparseAutoencoder(d_in=8, d_sae=32)
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, 10.0)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    model.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    grads = [parameter.grad for parameter in model.parameters()]
    if algorithm == "norm":
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item() == pytest.approx(0.5, rel=1e-4)
    else:
        assert max(g.abs().max().item() for g in grads) == 0.5


@pytest.mark.cuda
def test_sparse_and_dense_decoding_agree_on_cuda_in_bf16() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 64, device="cuda")
    outputs = []
    for decoding in ("dense", "sparse"):
        torch.manual_seed(1)
        model = SparseAutoencoder(d_in=64, d_sae=1024, encoder=lambda m: TopK(m, k=16), decoding=decoding).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_pass(x)
            total, _ = model.loss(out)
        total.backward()
        outputs.append((out.reconstruction.float(), model.W_dec.grad.clone()))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
def test_a_bf16_mixed_fit_on_cuda_learns(
    toy_data: Callable[..., ActivationDataModule], callback_trainer: Callable[..., Trainer]
) -> None:
    data = toy_data()
    model = SparseAutoencoder(d_in=16, d_sae=64, encoder=lambda m: TopK(m, k=2), penalties=[AuxK()],
                              input_scale=data.input_scale, lr=3e-3)
    x = torch.cat([x for x, _ in data.sample_batches(512, seed=1)])
    with torch.no_grad():
        before = (model(x) - x).pow(2).sum()
    trainer = callback_trainer(200, [], accelerator="gpu", precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(model, data)
    assert trainer.optimizers[0].defaults["fused"]
    model = model.cpu().float()
    with torch.no_grad():
        after = (model(x) - x).pow(2).sum()
    assert torch.isfinite(after) and after < 0.5 * before


def _fit_steps(model: SparseAutoencoder, toy_file: Path, steps: int) -> Trainer:
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=ActivationDataModule(str(toy_file), batch_size=64, val_rows=512))
    return trainer


def test_jumprelu_thresholds_train_at_their_own_learning_rate(toy_file: Path) -> None:
    """Adam's first step moves every parameter entry by about its learning rate: ×5 for the thresholds."""
    model = SparseAutoencoder(d_in=16, d_sae=32, encoder=lambda m: JumpReLU(m, threshold_lr_scale=5.0), lr=1e-3,
                              penalties=[L0(1.0)], lr_decay_fraction=0.0)
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    trainer = _fit_steps(model, toy_file, 1)
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == pytest.approx([1e-3, 5e-3])
    moved = {name: (value.detach() - before[name]).abs() for name, value in model.named_parameters()}
    threshold_steps = moved["encoder.log_threshold"][moved["encoder.log_threshold"] > 0]
    assert len(threshold_steps) > 0 and threshold_steps.max().item() == pytest.approx(5e-3, rel=1e-3)
    assert moved["b_enc"].max().item() == pytest.approx(1e-3, rel=1e-3)
    assert len(model.parameter_groups()) == 2
    assert len(SparseAutoencoder(d_in=16, d_sae=32, encoder=JumpReLU).parameter_groups()) == 1
    with pytest.raises(UserError, match="threshold_lr_scale"):
        JumpReLU(4, threshold_lr_scale=0.0)


def test_optimizer_state_is_named_by_its_group_and_other_groupings_are_refused(
    toy_file: Path, tmp_path: Path
) -> None:
    scaled = SparseAutoencoder(d_in=16, d_sae=32, encoder=lambda m: JumpReLU(m, threshold_lr_scale=5.0))
    trainer = _fit_steps(scaled, toy_file, 2)
    trainer.save_checkpoint(tmp_path / "scaled.ckpt")
    checkpoint = torch.load(tmp_path / "scaled.ckpt", weights_only=False)
    (threshold_index,) = checkpoint["optimizer_states"][0]["param_groups"][1]["params"]
    checkpoint["optimizer_states"][0]["state"][threshold_index]["exp_avg"][0] = float("nan")
    with pytest.raises(UserError, match=r"optimizer state of encoder\.log_threshold \(exp_avg\)"):
        scaled.on_load_checkpoint(checkpoint)

    plain = SparseAutoencoder(d_in=16, d_sae=32, encoder=JumpReLU)
    _fit_steps(plain, toy_file, 2).save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(UserError, match="1 optimizer parameter group.*threshold_lr_scale 1"):
        scaled.on_load_checkpoint(torch.load(tmp_path / "plain.ckpt", weights_only=False))
