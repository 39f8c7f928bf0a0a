"""``lightning_sae evaluate`` on a tiny random Llama: splicing identities, definitions, CLI and bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning import Trainer
from safetensors.torch import load_file, save_file
from test_cli import expect_user_error
from tiny_lm import BOS, EOS, tiny_llama, word_tokenizer
from transformers import LlamaForCausalLM

from lightning_sae.callbacks.downstream_eval import LOGGED, DownstreamEval
from lightning_sae.cli import main
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.encoders import JumpReLU
from lightning_sae.errors import UserError
from lightning_sae.export import export
from lightning_sae.lm.cache import cache
from lightning_sae.lm.evaluate import evaluate, kl_divergence
from lightning_sae.model import SparseAutoencoder

D_MODEL, N_LAYERS, LAYER, CONTEXT = 32, 3, 1, 16
WORDS = [f"w{i}" for i in range(97)]
OPTIONS: dict[str, Any] = {"context_length": CONTEXT, "batch_size": 4, "max_tokens": 8 * CONTEXT, "device": "cpu"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-layer Llama (d_model 32, vocab 100) and its tokenizer, saved as a hub folder would be."""
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(len(WORDS), N_LAYERS, initializer_range=0.2).save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out text: 12 documents of random words, one per JSON line."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "heldout.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30))))}) for _ in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data_file(model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An activation file of layer 1's resid_post, written by 'lightning_sae cache'."""
    out = tmp_path_factory.mktemp("data") / "acts.h5"
    cache(output=out, text=str(text_file), model=str(model_dir), layer=LAYER, **OPTIONS)
    return out


def identity_sae() -> SparseAutoencoder:
    """An SAE whose output is its input exactly: f = ReLU([x, −x]), ŷ = f·[I; −I] = ReLU(x) − ReLU(−x) = x."""
    model = SparseAutoencoder(d_in=D_MODEL, d_sae=2 * D_MODEL)
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        model.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        model.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return model


def zero_sae(d_out: int | None = None) -> SparseAutoencoder:
    """An SAE (or transcoder) whose output is 0: W_dec = 0, b_dec = 0."""
    model = SparseAutoencoder(d_in=D_MODEL, d_sae=2 * D_MODEL, d_out=d_out)
    with torch.no_grad():
        model.W_dec.zero_()
    return model


def random_sae() -> SparseAutoencoder:
    """A JumpReLU SAE with non-trivial scale, biases and decoder norms."""
    encoder = functools.partial(JumpReLU, initial_log_threshold=-2.0)
    model = SparseAutoencoder(d_in=D_MODEL, d_sae=4 * D_MODEL, encoder=encoder, input_scale=0.7)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.2)
        model.W_dec.mul_(torch.empty(4 * D_MODEL, 1).uniform_(0.5, 2.0))
    return model


def write_checkpoint(model: SparseAutoencoder, path: Path, source: dict[str, Any]) -> Path:
    """What a 'fit' checkpoint holds for ``from_checkpoint``: hyperparameters, weights, plugins, data source."""
    checkpoint: dict[str, Any] = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    checkpoint[ActivationDataModule.__qualname__] = {"source": source}
    torch.save(checkpoint, path)
    return path


def run(sae: Path, text: Path, model_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """``evaluate`` with the test options."""
    model = None if model_dir is None else str(model_dir)
    return evaluate(sae=sae, text=str(text), model=model, **{**OPTIONS, **kwargs})


@pytest.mark.parametrize("site", ["resid_post", "mlp_out"])
def test_identity_sae_recovers_all_the_loss(
    site: str, model_dir: Path, text_file: Path, data_file: Path, tmp_path: Path
) -> None:
    results = run(export(identity_sae(), tmp_path / "sae"), text_file, data=data_file, site=site)
    assert results["layer"] == LAYER and results["site"] == site and results["model"] == str(model_dir)
    assert results["ce_zero"] - results["ce_clean"] > 1e-3, "the zero baseline must differ from the clean model"
    assert results["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert results["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert results["kl_score"] == pytest.approx(1.0, abs=1e-4)
    assert results["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert results["cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert results["kl_zero"] > 0 and results["kl_mean"] > 0


def test_zero_sae_recovers_nothing(text_file: Path, data_file: Path, tmp_path: Path) -> None:
    results = run(export(zero_sae(), tmp_path / "sae"), text_file, data=data_file)
    assert results["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert results["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert results["ce_sae"] == pytest.approx(results["ce_zero"], abs=1e-6)
    assert results["mse"] > 0


def test_zero_transcoder_at_mlp_in_out(model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    results = run(export(zero_sae(d_out=D_MODEL), tmp_path / "sae"), text_file, model_dir, layer=2, site="mlp_in_out")
    assert results["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert results["kl_sae"] == pytest.approx(results["kl_zero"], rel=1e-6)


def test_clean_loss_and_scored_positions_match_a_plain_forward_pass(
    model_dir: Path, text_file: Path, data_file: Path, tmp_path: Path
) -> None:
    """CE_clean and N equal the model's own next-token loss over positions that are neither special nor last."""
    results = run(export(identity_sae(), tmp_path / "sae"), text_file, data=data_file)
    tokenizer = word_tokenizer(WORDS)
    stream: list[int] = []
    for line in text_file.read_text().splitlines():
        stream += tokenizer.encode(json.loads(line)["text"], add_special_tokens=False) + [EOS]
    body = CONTEXT - 1
    windows = torch.tensor([[BOS, *stream[start : start + body]] for start in range(0, 8 * body, body)])
    lm = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        log_probs = lm(input_ids=windows).logits[:, :-1].log_softmax(-1)
    losses = -log_probs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    scored = (windows[:, :-1] != BOS) & (windows[:, :-1] != EOS)
    assert results["n_tokens"] == int(scored.sum())
    assert results["ce_clean"] == pytest.approx(losses[scored].mean().item(), abs=1e-5)


def test_checkpoint_and_export_give_the_same_results(
    model_dir: Path, text_file: Path, data_file: Path, tmp_path: Path
) -> None:
    """The SAE is evaluated in exported form; a checkpoint's recorded source replaces --data."""
    model = random_sae()
    source = {"model": str(model_dir), "layer": LAYER, "site": "resid_post", "context_length": CONTEXT}
    from_checkpoint = run(write_checkpoint(model, tmp_path / "sae.ckpt", source), text_file)
    from_export = run(export(model, tmp_path / "sae", source=source), text_file, data=data_file)
    assert 1 < from_checkpoint["l0"] < 3 * D_MODEL
    assert from_checkpoint.keys() == from_export.keys()
    for name, value in from_export.items():
        if isinstance(value, float):
            assert from_checkpoint[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        elif name != "sae":
            assert from_checkpoint[name] == value, name


def test_kl_divergence_definition() -> None:
    log_p = torch.randn(5, 7).log_softmax(-1)
    log_q = torch.randn(5, 7).log_softmax(-1)
    torch.testing.assert_close(kl_divergence(log_p, log_p), torch.zeros(5))
    expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(kl_divergence(log_p, log_q), expected)
    assert (kl_divergence(log_p, log_q) > 0).all()


def test_command_line_and_json_output(
    model_dir: Path, text_file: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = export(identity_sae(), tmp_path / "sae")
    args = ["--sae", str(sae), "--text", str(text_file), "--data", str(data_file), "--device", "cpu"]
    args += ["--context_length", str(CONTEXT), "--max_tokens", str(4 * CONTEXT)]
    main(["evaluate", *args, "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert "loss recovered" in table and "100.00%" in table
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and written["site"] == "resid_post"
    main(["evaluate", *args, "--json", "true"])
    assert json.loads(capsys.readouterr().out) == written


def test_bad_inputs_are_user_errors(model_dir: Path, text_file: Path, data_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="SAE not found"):
        run(tmp_path / "missing.ckpt", text_file, data=data_file)
    narrow = SparseAutoencoder(d_in=D_MODEL // 2, d_sae=8)
    with pytest.raises(UserError, match="d_in=16, d_out=16 but .* has hidden size 32"):
        run(export(narrow, tmp_path / "narrow"), text_file, data=data_file)
    no_source = export(identity_sae(), tmp_path / "no_source")
    with pytest.raises(UserError, match="the site is unknown"):
        run(no_source, text_file, model_dir, layer=LAYER)
    with pytest.raises(UserError, match="the layer is unknown"):
        run(no_source, text_file, model_dir, site="resid_post")
    with pytest.raises(UserError, match="needs a transcoder"):
        run(no_source, text_file, model_dir, layer=LAYER, site="mlp_in_out")
    with pytest.raises(UserError, match="layer 5 is out of range"):
        run(no_source, text_file, model_dir, layer=5, site="resid_post")


def test_an_sae_holding_nan_is_refused_not_evaluated_to_nan(
    text_file: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = export(identity_sae(), tmp_path / "sae")
    weights = load_file(sae / "sae_weights.safetensors")
    weights["W_dec"][5, 7] = float("nan")
    save_file(weights, sae / "sae_weights.safetensors")
    checkpoint = write_checkpoint(identity_sae(), tmp_path / "sae.ckpt", {})
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"]["W_dec"][5, 7] = float("nan")
    torch.save(state, checkpoint)
    args = ["--text", str(text_file), "--data", str(data_file), "--device", "cpu", "--context_length", str(CONTEXT)]
    message = f"{sae / 'sae_weights.safetensors'} holds NaN or Inf in W_dec: it is corrupt"
    expect_user_error(["evaluate", "--sae", str(sae), *args], capsys, message)
    expect_user_error(["evaluate", "--sae", str(checkpoint), *args], capsys, f"{checkpoint} holds NaN or Inf in W_dec")


def test_downstream_eval_callback_logs_during_training(text_file: Path, data_file: Path, tmp_path: Path) -> None:
    data = ActivationDataModule(str(data_file), batch_size=16, val_rows=32, buffer_rows=64, scale_sample_rows=64)
    model = SparseAutoencoder(d_in=D_MODEL, d_sae=64, input_scale=data.input_scale)
    callback = DownstreamEval(text=str(text_file), every_n_steps=2, max_tokens=4 * CONTEXT, batch_size=4)
    trainer = Trainer(
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    logged = {name: trainer.callback_metrics[f"downstream/{name}"].item() for name in LOGGED}
    assert np.isfinite(list(logged.values())).all() and logged["kl_sae"] > 0
    exported = export(model, tmp_path / "sae")
    reference = run(exported, text_file, data=data_file, max_tokens=4 * CONTEXT)
    assert logged["kl_sae"] == pytest.approx(reference["kl_sae"], rel=1e-4)


def test_an_existing_json_file_is_refused_before_anything_is_computed_unless_overwrite(
    text_file: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = export(identity_sae(), tmp_path / "sae")
    results = tmp_path / "r.json"
    results.write_text("earlier results\n")
    args = ["evaluate", "--sae", str(sae), "--text", str(text_file), "--data", str(data_file), "--device", "cpu"]
    args += ["--context_length", str(CONTEXT), "--max_tokens", str(4 * CONTEXT), "--json", str(results)]
    expect_user_error(args, capsys, f"{results} exists; pass --overwrite true to replace it")
    assert results.read_text() == "earlier results\n"
    main([*args, "--overwrite", "true"])
    assert json.loads(results.read_text())["site"] == "resid_post"


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_bad_checkpoint_is_one_line(
    kind: str, text_file: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_checkpoint(identity_sae(), tmp_path / "sae.ckpt", {})
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2] if kind == "truncated" else np.random.default_rng(0).bytes(4096))
    args = ["evaluate", "--sae", str(checkpoint), "--text", str(text_file), "--data", str(data_file), "--device", "cpu"]
    expect_user_error(args, capsys, f"cannot read the checkpoint {checkpoint}")
