"""Tests for ``lightning_sae cache`` on a tiny random Llama (and GPT-2) saved to a temporary folder."""

from __future__ import annotations

import inspect
import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import jsonargparse
import numpy as np
import pytest
import torch
import transformers
from faults import run_cli_on_a_full_disk
from tiny_lm import BOS, EOS, SPECIALS, tiny_llama, word_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from lightning_sae.data import format as fmt
from lightning_sae.errors import UserError
from lightning_sae.lm.cache import cache

WORDS = [f"w{i}" for i in range(40)]
N_LAYERS = 3
CONTEXT = 16
N_DOCS = 6


def _save_model(folder: Path, lm: torch.nn.Module) -> Path:
    """Save ``lm`` and the tokenizer side by side, as a hub checkpoint folder would hold them."""
    lm.save_pretrained(folder)
    word_tokenizer(WORDS).save_pretrained(folder)
    return folder


def _llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 3-layer Llama with d_model 32."""
    return tiny_llama(len(WORDS), N_LAYERS, seed=seed)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random Llama and its tokenizer."""
    return _save_model(tmp_path_factory.mktemp("llama"), _llama())


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Six documents of random words, of uneven length."""
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) for _ in range(N_DOCS)]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    """The documents as doc0.txt ... doc5.txt and as one docs.jsonl with field 'body'."""
    folder = tmp_path_factory.mktemp("text")
    for index, document in enumerate(documents):
        (folder / f"doc{index}.txt").write_text(document + "\n")
    with (folder / "docs.jsonl").open("w") as stream:
        for document in documents:
            stream.write(json.dumps({"body": document + "\n", "id": 0}) + "\n")
    return folder


def _run(model_dir: Path, text: Path | str, output: Path, **kwargs: Any) -> None:
    """``cache`` with the test defaults."""
    options = {"layer": 1, "context_length": CONTEXT, "batch_size": 2, "device": "cpu"}
    cache(model=str(model_dir), text=str(text), output=output, **{**options, **kwargs})


def _read(path: Path) -> dict[str, Any]:
    """Every dataset and attribute of an activation file."""
    with h5py.File(path, "r") as file:
        data: dict[str, Any] = {name: file[name][:] for name in file}
        data["attrs"] = dict(file.attrs)
    return data


def _reference_windows(documents: list[str]) -> np.ndarray:
    """The windowing cache documents: BOS + 15 tokens of the EOS-separated stream, tail dropped."""
    tokenizer = word_tokenizer(WORDS)
    stream = [token for document in documents for token in tokenizer.encode(document, add_special_tokens=False) + [EOS]]
    body = CONTEXT - 1
    return np.array([[BOS] + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)])


def _reference(model_dir: Path, windows: np.ndarray, layer: int) -> dict[str, torch.Tensor]:
    """Full forward pass over all windows: hidden states and the MLP's input/output at ``layer``."""
    lm = LlamaForCausalLM.from_pretrained(model_dir).eval()
    seen: dict[str, torch.Tensor] = {}

    def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["mlp_in"], seen["mlp_out"] = args[0], output

    lm.model.layers[layer].mlp.register_forward_hook(hook)
    with torch.no_grad():
        out = lm(input_ids=torch.from_numpy(windows), output_hidden_states=True)
    return {"resid_post": out.hidden_states[layer + 1], **seen}


def test_resid_post_equals_hidden_states_without_special_positions(
    model_dir: Path, text_dir: Path, documents: list[str], tmp_path: Path
) -> None:
    windows = _reference_windows(documents)
    reference = _reference(model_dir, windows, layer=1)
    keep = (windows != BOS) & (windows != EOS)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5")
    data = _read(tmp_path / "a.h5")
    np.testing.assert_array_equal(data["token_ids"], windows[keep])
    np.testing.assert_allclose(data["activations"], reference["resid_post"][torch.from_numpy(keep)], atol=1e-5)
    attrs = data["attrs"]
    assert attrs["layer"] == 1 and attrs["site"] == "resid_post" and attrs["d_model"] == 32
    assert attrs["context_length"] == CONTEXT and attrs["n_tokens"] == windows.size
    assert attrs["committed_rows"] == keep.sum() and attrs["dtype"] == "float32"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", attrs["revision"])
    assert attrs["model"] == str(model_dir) and attrs["tokenizer"] == str(model_dir)


def test_special_positions_kept_on_request(
    model_dir: Path, text_dir: Path, documents: list[str], tmp_path: Path
) -> None:
    windows = _reference_windows(documents)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5", drop_special_tokens=False)
    data = _read(tmp_path / "a.h5")
    np.testing.assert_array_equal(data["token_ids"], windows.reshape(-1))
    reference = _reference(model_dir, windows, layer=1)["resid_post"]
    np.testing.assert_allclose(data["activations"], reference.reshape(-1, 32), atol=1e-5)


def test_mlp_sites_equal_a_hook_on_the_mlp(
    model_dir: Path, text_dir: Path, documents: list[str], tmp_path: Path
) -> None:
    windows = _reference_windows(documents)
    keep = torch.from_numpy((windows != BOS) & (windows != EOS))
    reference = _reference(model_dir, windows, layer=2)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "out.h5", layer=2, site="mlp_out")
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "pair.h5", layer=2, site="mlp_in_out")
    out, pair = _read(tmp_path / "out.h5"), _read(tmp_path / "pair.h5")
    assert "targets" not in out
    np.testing.assert_allclose(out["activations"], reference["mlp_out"][keep], atol=1e-5)
    np.testing.assert_allclose(pair["activations"], reference["mlp_in"][keep], atol=1e-5)
    np.testing.assert_allclose(pair["targets"], reference["mlp_out"][keep], atol=1e-5)
    info = fmt.read_info(tmp_path / "pair.h5")
    assert info.has_targets and info.d_in == info.d_out == 32


def test_forward_pass_stops_after_the_deepest_hooked_layer(
    model_dir: Path, text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    load = transformers.AutoModelForCausalLM.from_pretrained

    def spying_load(*args: Any, **kwargs: Any) -> torch.nn.Module:
        lm = load(*args, **kwargs)
        for index, block in enumerate(lm.model.layers):
            block.register_forward_hook(lambda *_, index=index: calls.append(f"layer{index}"))
        lm.lm_head.register_forward_hook(lambda *_: calls.append("lm_head"))
        return lm

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spying_load)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5", layer=0)
    assert calls and set(calls) == {"layer0"}
    calls.clear()
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "b.h5", layer=1, site="mlp_out")
    assert set(calls) == {"layer0"}, "layer 1 itself ends inside its MLP, before its own output"


def test_several_layers_in_one_pass_equal_single_layer_runs(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "l{layer}.h5", layer=[2, 0])
    for layer in (0, 2):
        _run(model_dir, text_dir / "doc*.txt", tmp_path / f"single{layer}.h5", layer=layer)
        both, single = _read(tmp_path / f"l{layer}.h5"), _read(tmp_path / f"single{layer}.h5")
        np.testing.assert_array_equal(both["activations"], single["activations"])
        assert both["attrs"]["layer"] == layer


class _Killed(Exception):
    """Stands in for the process dying in the middle of a write."""


def _kill_on_append(monkeypatch: pytest.MonkeyPatch, after: int) -> list[int]:
    """Let ``after`` appends through, then write the next batch's activations only, uncommitted, and die.

    Returns the committed row count seen after each successful append.
    """
    append = fmt.append
    commits: list[int] = []

    def dying_append(file: h5py.File, activations: np.ndarray, *args: Any) -> int:
        if len(commits) == after:
            start = fmt.committed_rows(file)
            file[fmt.ACTIVATIONS].resize(start + len(activations), axis=0)
            file[fmt.ACTIVATIONS][start:] = 1e30
            file.flush()
            raise _Killed
        commits.append(append(file, activations, *args))
        assert file.attrs[fmt.COMMITTED_ROWS] == commits[-1] <= file[fmt.ACTIVATIONS].shape[0]
        return commits[-1]

    monkeypatch.setattr(fmt, "append", dying_append)
    return commits


@pytest.mark.parametrize("site", ["resid_post", "mlp_in_out"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(
    model_dir: Path, text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site: str
) -> None:
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "whole.h5", site=site)
    whole = _read(tmp_path / "whole.h5")
    with monkeypatch.context() as patch:
        commits = _kill_on_append(patch, after=2)
        with pytest.raises(_Killed):
            _run(model_dir, text_dir / "doc*.txt", tmp_path / "part.h5", site=site)
    info = fmt.read_info(tmp_path / "part.h5")
    assert info.n_rows == commits[-1] < len(whole["activations"])
    with h5py.File(tmp_path / "part.h5", "r") as file:
        assert file[fmt.ACTIVATIONS].shape[0] > info.n_rows, "the uncommitted half batch is on disk"
        np.testing.assert_array_equal(file[fmt.ACTIVATIONS][: info.n_rows], whole["activations"][: info.n_rows])
    with pytest.raises(UserError, match="--resume"):
        _run(model_dir, text_dir / "doc*.txt", tmp_path / "part.h5", site=site)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "part.h5", site=site, resume=True)
    resumed = _read(tmp_path / "part.h5")
    assert resumed.keys() == whole.keys()
    for name in whole:
        if name != "attrs":
            np.testing.assert_array_equal(resumed[name], whole[name])
    assert resumed["attrs"] == whole["attrs"]


def test_resume_catches_up_files_left_at_different_rows(
    model_dir: Path, text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "whole{layer}.h5", layer=[0, 2])
    with monkeypatch.context() as patch:
        _kill_on_append(patch, after=3)
        with pytest.raises(_Killed):
            _run(model_dir, text_dir / "doc*.txt", tmp_path / "part{layer}.h5", layer=[0, 2])
    assert fmt.read_info(tmp_path / "part0.h5").n_rows > fmt.read_info(tmp_path / "part2.h5").n_rows
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "part{layer}.h5", layer=[0, 2], resume=True)
    for layer in (0, 2):
        resumed, whole = _read(tmp_path / f"part{layer}.h5"), _read(tmp_path / f"whole{layer}.h5")
        np.testing.assert_array_equal(resumed["activations"], whole["activations"])
        np.testing.assert_array_equal(resumed["token_ids"], whole["token_ids"])


def test_resume_extends_a_max_tokens_run_and_refuses_a_different_request(
    model_dir: Path, documents: list[str], tmp_path: Path
) -> None:
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": document}) + "\n" for document in documents))
    _run(model_dir, text, tmp_path / "whole.h5")
    _run(model_dir, text, tmp_path / "part.h5", max_tokens=3 * CONTEXT + 5)
    part = _read(tmp_path / "part.h5")
    assert part["attrs"]["n_tokens"] == 3 * CONTEXT
    assert len(part["token_ids"]) == 3 * (CONTEXT - 1) - 1, "one EOS separator in the first three windows"
    with pytest.raises(UserError, match="layer=1, this run asks layer=2"):
        _run(model_dir, text, tmp_path / "part.h5", layer=2, resume=True)
    _run(model_dir, text, tmp_path / "part.h5", resume=True)
    np.testing.assert_array_equal(
        _read(tmp_path / "part.h5")["activations"], _read(tmp_path / "whole.h5")["activations"]
    )
    text.write_text(json.dumps({"text": "w1 w2"}) + "\n" + text.read_text())
    with pytest.raises(UserError, match="token ids differ"):
        _run(model_dir, text, tmp_path / "part.h5", resume=True)


def test_jsonl_and_glob_inputs_give_the_same_rows(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "glob.h5")
    _run(model_dir, text_dir / "docs.jsonl", tmp_path / "jsonl.h5", text_field="body")
    glob_rows, jsonl_rows = _read(tmp_path / "glob.h5"), _read(tmp_path / "jsonl.h5")
    np.testing.assert_array_equal(glob_rows["token_ids"], jsonl_rows["token_ids"])
    np.testing.assert_array_equal(glob_rows["activations"], jsonl_rows["activations"])
    with pytest.raises(UserError, match="no string field 'text'"):
        _run(model_dir, text_dir / "docs.jsonl", tmp_path / "bad.h5")


def test_datasets_folder_input(model_dir: Path, text_dir: Path, documents: list[str], tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"body": [document + "\n" for document in documents]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(tmp_path / "dict")
    _run(model_dir, tmp_path / "dict", tmp_path / "ds.h5", text_field="body")
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "glob.h5")
    np.testing.assert_array_equal(_read(tmp_path / "ds.h5")["activations"], _read(tmp_path / "glob.h5")["activations"])
    with pytest.raises(UserError, match="set --split"):
        _run(model_dir, tmp_path / "dict", tmp_path / "ds2.h5", text_field="body", split="test")


def test_float16_storage_and_overflow(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "f32.h5")
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "f16.h5", dtype="float16")
    f32, f16 = _read(tmp_path / "f32.h5"), _read(tmp_path / "f16.h5")
    assert f16["activations"].dtype == np.float16
    np.testing.assert_allclose(f16["activations"].astype(np.float32), f32["activations"], rtol=1e-3, atol=1e-3)

    lm = _llama()
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(1e6)
    loud = _save_model(tmp_path / "loud", lm)
    _run(loud, text_dir / "doc*.txt", tmp_path / "loud32.h5", layer=0)
    assert np.abs(_read(tmp_path / "loud32.h5")["activations"]).max() > 65504
    with pytest.raises(UserError, match="beyond float16's range"):
        _run(loud, text_dir / "doc*.txt", tmp_path / "loud16.h5", layer=0, dtype="float16")
    with h5py.File(tmp_path / "loud16.h5", "r") as file:
        written = file[fmt.ACTIVATIONS][: fmt.committed_rows(file)]
        assert len(written) < 145 and np.isfinite(written).all()


def test_nan_from_the_model_is_an_error(text_dir: Path, tmp_path: Path) -> None:
    lm = _llama()
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    broken = _save_model(tmp_path / "nan", lm)
    with pytest.raises(UserError, match="NaN or Inf at layer 0"):
        _run(broken, text_dir / "doc*.txt", tmp_path / "a.h5", layer=0)


def test_gpt2_layout(text_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(SPECIALS) + len(WORDS))
    folder = _save_model(tmp_path / "gpt2", GPT2LMHeadModel(config))
    _run(folder, text_dir / "doc*.txt", tmp_path / "a.h5", site="mlp_in_out")
    windows = _reference_windows([path.read_text() for path in sorted(text_dir.glob("doc*.txt"))])
    keep = torch.from_numpy((windows != BOS) & (windows != EOS))
    lm = GPT2LMHeadModel.from_pretrained(folder).eval()
    seen: list[torch.Tensor] = []
    lm.transformer.h[1].mlp.register_forward_hook(lambda _, args, output: seen.extend([args[0], output]))
    with torch.no_grad():
        lm(input_ids=torch.from_numpy(windows))
    data = _read(tmp_path / "a.h5")
    np.testing.assert_allclose(data["activations"], seen[0][keep], atol=1e-5)
    np.testing.assert_allclose(data["targets"], seen[1][keep], atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"text": "missing.txt"}, "text file not found"),
        ({"text": "nowhere/*.txt"}, "no file matches"),
        ({"layer": N_LAYERS}, "layer 3 is out of range"),
        ({"layer": -1}, "layer -1 is out of range"),
        ({"layer": [0, 1]}, "needs '{layer}'"),
        ({"context_length": 1}, "context_length must be at least 2"),
        ({"max_tokens": CONTEXT - 1}, "less than one window"),
        ({"resume": True, "overwrite": True}, "exclude each other"),
        ({"model": "/no/such-model-folder"}, "model folder not found"),
        ({"model": None, "gguf_file": "missing.gguf"}, "GGUF file not found"),
    ],
)
def test_bad_requests_are_user_errors(
    model_dir: Path, text_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    request = {"model": str(model_dir), "text": str(text_dir / "doc0.txt"), "output": tmp_path / "a.h5"}
    request.update(changes)
    with pytest.raises(UserError, match=re.escape(message)):
        cache(**{"layer": 1, "context_length": CONTEXT, "device": "cpu", **request})


def test_existing_output_needs_resume_or_overwrite(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="exists; pass --resume"):
        _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5")
    with pytest.raises(UserError, match="cannot reopen"):
        _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5", resume=True)
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "a.h5", overwrite=True)
    assert fmt.read_info(tmp_path / "a.h5").n_rows > 0


def test_cli_parses_every_argument_from_the_docstring(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    documented = set(re.findall(r"^    (\w+):", inspect.getdoc(cache) or "", flags=re.MULTILINE))
    assert documented == set(inspect.signature(cache).parameters)
    argv = ["--model", str(model_dir), "--text", str(text_dir / "doc*.txt"), "--output", str(tmp_path / "l{layer}.h5")]
    jsonargparse.CLI(cache, args=[*argv, "--layer", "[0,2]", "--context_length", "16", "--dtype", "float16"])
    assert fmt.read_info(tmp_path / "l2.h5").dtype == np.float16


def test_resume_after_sigkill_equals_an_uninterrupted_run(model_dir: Path, text_dir: Path, tmp_path: Path) -> None:
    request = {"model": str(model_dir), "text": str(text_dir / "doc*.txt"), "layer": 1, "context_length": CONTEXT}
    script = f"""
import os, signal
from lightning_sae.data import format as fmt
from lightning_sae.lm.cache import cache
append, calls = fmt.append, []
def append_then_die(*args):
    calls.append(append(*args))
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
fmt.append = append_then_die
cache(output={str(tmp_path / "part.h5")!r}, batch_size=2, device="cpu", **{request!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    cache(output=tmp_path / "whole.h5", batch_size=2, device="cpu", **request)
    whole = _read(tmp_path / "whole.h5")
    killed = _read(tmp_path / "part.h5")
    assert 0 < killed["attrs"]["committed_rows"] == len(killed["activations"]) < len(whole["activations"])
    np.testing.assert_array_equal(killed["activations"], whole["activations"][: len(killed["activations"])])
    cache(output=tmp_path / "part.h5", batch_size=2, device="cpu", resume=True, **request)
    part = _read(tmp_path / "part.h5")
    np.testing.assert_array_equal(part["activations"], whole["activations"])
    np.testing.assert_array_equal(part["token_ids"], whole["token_ids"])


def test_a_file_another_run_writes_is_neither_replaced_nor_resumed(
    model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "a.h5"
    _run(model_dir, text_dir / "doc0.txt", path)
    before = _read(path)
    writer = fmt.open_for_writing(path)  # another cache run, still going
    try:
        for request in ({"overwrite": True}, {"resume": True}, {}):
            with pytest.raises(UserError, match="in use by another process") as error:
                _run(model_dir, text_dir / "doc*.txt", path, **request)
            assert "--overwrite" not in str(error.value)
    finally:
        writer.close()
    after = _read(path)
    for name in before:
        if name != "attrs":
            np.testing.assert_array_equal(after[name], before[name])


def test_a_full_disk_ends_cache_with_one_line_and_resume_completes_the_file(
    model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    request = ["--model", str(model_dir), "--text", str(text_dir / "doc*.txt"), "--layer", "1",
               "--context_length", str(CONTEXT), "--batch_size", "2", "--device", "cpu", "--output", "part.h5"]
    done = run_cli_on_a_full_disk(["cache", *request], 12_000, tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("lightning_sae: error: no space left on the disk while writing part.h5")
    assert "Traceback" not in done.stderr
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "whole.h5")
    whole = _read(tmp_path / "whole.h5")
    assert _read(tmp_path / "part.h5")["attrs"][fmt.COMMITTED_ROWS] < len(whole["activations"])
    _run(model_dir, text_dir / "doc*.txt", tmp_path / "part.h5", resume=True)
    resumed = _read(tmp_path / "part.h5")
    for name in whole:
        if name != "attrs":
            np.testing.assert_array_equal(resumed[name], whole[name])
