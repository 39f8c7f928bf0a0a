"""``lightning_sae evaluate``: splice an SAE into its language model and measure what that costs.

For every batch of held-out context windows the language model runs four times on the same
tokens: clean, with the SAE's output written over the hooked site ("spliced"), with the site
zero-ablated and with it mean-ablated. A forward hook on the site's module replaces the module's
output (``resid_post``: decoder layer L's hidden states; ``mlp_out`` and ``mlp_in_out``: layer L's
MLP output, the latter with a transcoder's prediction from the MLP input). Since the replacement
happens at the site, everything upstream is the clean pass's, so the SAE input recorded in the
clean pass is the input of the spliced pass too.

Positions. The windows are built as ``lightning_sae cache`` builds them (same text loading,
tokenisation and windowing), and the positions it drops (special tokens: BOS, EOS separators,
when ``drop_special_tokens``) are dropped here too: there the site keeps its clean activation in
every condition. Every metric averages over the same *scored* positions: the kept positions that
have a next token in their window (the last position of a window predicts nothing). The SAE is
spliced at exactly these positions; by causality the last position could change no scored
prediction anyway.

Metrics (means over the N scored positions t, next token w_{t+1}):

- CE_c = −(1/N) Σ_t log p_c(w_{t+1} | w_≤t) for condition c ∈ {clean, sae, zero, mean};
- loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when splicing costs nothing,
  0 when it is as bad as deleting the site (the zero-ablation baseline of seed 001; Bricken et
  al. 2023, "Towards Monosemanticity"); ``loss_recovered_mean_ablation`` uses CE_mean instead;
- KL_c = (1/N) Σ_t KL(p_clean ‖ p_c) = (1/N) Σ_t Σ_v p_clean(v) (log p_clean(v) − log p_c(v)),
  the downstream KL of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", §4.1);
- KL score = (KL_zero − KL_sae) / KL_zero: the fraction of the zero-ablation KL the SAE avoids,
  SAELens' ``kl_div_score`` (sae_lens/evals.py) and SAEBench's KL fidelity (Karvonen et al.
  2025, "SAEBench");
- the reconstruction metrics of :func:`lightning_sae.metrics.reconstruction_metrics` (L0, MSE,
  FVU, cosine similarity, ...) on the site's raw activations at the scored positions.

Mean ablation writes μ, the mean of the site's output over all scored positions of the evaluated
text, computed in a first pass that runs the model only up to the hooked layer (so the result
does not depend on whether an activation file is given).

The SAE is evaluated in its exported form (:meth:`SparseAutoencoder.folded`: unit decoder
rows, raw activations in), so a checkpoint and its export give the same numbers.
"""

from __future__ import annotations

import itertools
import json as jsonlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_sae.checkpoint_io import read_checkpoint
from lightning_sae.data.datamodule import ActivationDataModule
from lightning_sae.data.format import read_info
from lightning_sae.errors import UserError
from lightning_sae.export import CONFIG_FILE, load_export, read_export_config
from lightning_sae.files import written_atomically
from lightning_sae.lm.access import (
    ModelDtype,
    Piece,
    Site,
    SiteCapture,
    batched,
    check_request,
    decoder_layers,
    load_model,
    model_source,
    module_input,
    resolve_device,
    site_module,
    text_source,
    token_windows,
)
from lightning_sae.metrics import reconstruction_metrics
from lightning_sae.model import SparseAutoencoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONDITIONS = ("clean", "sae", "zero", "mean")
"""The forward passes run on every batch; ``clean`` first, its logits are the KL reference."""
DEFAULT_CONTEXT_LENGTH = 128
DEFAULT_MAX_TOKENS = 1 << 16


def evaluate(
    *,
    sae: Path,
    text: str,
    data: Path | None = None,
    model: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    layer: int | None = None,
    site: Site | None = None,
    text_field: str = "text",
    split: str = "train",
    context_length: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    drop_special_tokens: bool | None = None,
    model_dtype: ModelDtype = "float32",
    device: str = "auto",
    json: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Splice a trained SAE into its language model: loss recovered, KL and reconstruction metrics.

    Args:
        sae: The SAE: a checkpoint written by 'lightning_sae fit' or an export directory (cfg.json,
            sae_weights.safetensors).
        text: Held-out text, in any form 'lightning_sae cache' reads: a plain-text file, a glob,
            a JSON-lines file or a datasets save_to_disk directory. Use text the SAE was not
            trained on.
        data: Activation file the SAE was trained on. Its attributes supply the layer, site,
            model, context length and special-token handling; without it they come from the
            SAE (checkpoint or export metadata).
        model: Hugging Face hub id or local directory of the language model (default: the one
            named by the activation file or the SAE).
        gguf_file: GGUF weights to load through transformers, as for 'lightning_sae cache'.
        revision: Hub branch, tag or commit of the model.
        layer: Decoder layer of the site, counted from 0 (default: from the metadata).
        site: 'resid_post', 'mlp_out' or 'mlp_in_out' (default: from the metadata).
        text_field: Field holding the text in JSON-lines records and datasets rows.
        split: Split to read when the datasets directory holds a DatasetDict.
        context_length: Tokens per context window, BOS included (default: the activation file's,
            else 128).
        batch_size: Context windows per forward pass.
        max_tokens: Evaluate this many tokens of the text (whole windows, rounded down); null
            for all of it.
        drop_special_tokens: Leave positions at special tokens (BOS, EOS separators) out of the
            splice and of every metric, as 'lightning_sae cache' leaves them out of the data
            (default: as the activation file was written, else true).
        model_dtype: Dtype the language model computes in; the SAE runs in float32.
        device: 'auto' (CUDA when available, else CPU), or a torch device such as 'cuda:1'.
        json: Also write the results as JSON to this path; 'true' prints JSON instead of the
            table.
        overwrite: Replace an existing --json file (refused otherwise, before anything is computed).
    """
    json_path = None if json is None or json.lower() == "true" else Path(json)
    if json_path is not None:
        _check_json_target(json_path, overwrite)
    sae_model, recorded = _load_sae(sae)
    attrs = read_info(data).attrs if data is not None else recorded
    layer, site = resolve_site(layer, site, attrs)
    context_length = context_length or int(attrs.get("context_length", DEFAULT_CONTEXT_LENGTH))
    if drop_special_tokens is None:
        drop_special_tokens = bool(attrs.get("drop_special_tokens", True))
    check_request(layer, context_length, batch_size, max_tokens)
    check_kind(sae_model, site)
    if model is None and gguf_file is None:
        model, gguf_file = attrs.get("model"), attrs.get("gguf_file") or None
    pieces = text_source(text, text_field, split)
    model_id, load_kwargs = model_source(model, gguf_file, revision)
    tokenizer, lm = load_model(model_id, load_kwargs, model_dtype, resolve_device(device))
    blocks = decoder_layers(lm)
    check_model(sae_model, lm, blocks, layer, model_id)
    batches = text_batches(tokenizer, pieces, context_length, batch_size, max_tokens, drop_special_tokens)
    n_tokens = sum(batch.input_ids.size for batch in batches())
    if n_tokens == 0:
        raise UserError(f"{text} holds fewer than context_length={context_length} tokens")
    with tqdm(total=2 * n_tokens, unit="tok", unit_scale=True, desc="evaluate") as bar:
        metrics = splice_metrics(lm, sae_model.folded(), blocks, layer, site, batches, progress=bar.update)
    results = {"sae": str(sae), "model": model_id, "layer": layer, "site": site, **metrics}
    _report(results, json, json_path)
    return results


@dataclass
class _Batch:
    """Token windows [B, T] and the scored positions [B, T] (kept, not last in the window)."""

    input_ids: np.ndarray
    scored: np.ndarray

    @classmethod
    def of(cls, input_ids: np.ndarray, special_ids: np.ndarray) -> _Batch:
        scored = ~np.isin(input_ids, special_ids)
        scored[:, -1] = False
        return cls(input_ids, scored)


def text_batches(
    tokenizer: PreTrainedTokenizerBase,
    pieces: Callable[[], Iterator[Piece]],
    context_length: int,
    batch_size: int,
    max_tokens: int | None,
    drop_special_tokens: bool,
) -> Callable[[], Iterator[_Batch]]:
    """A function yielding the same batches on every call: the first ``max_tokens`` tokens of
    the text in the context windows of ``lightning_sae cache``, with their scored positions."""
    max_windows = None if max_tokens is None else max_tokens // context_length
    special_ids = np.array(sorted(tokenizer.all_special_ids) if drop_special_tokens else [], dtype=np.int64)

    def batches() -> Iterator[_Batch]:
        windows = itertools.islice(token_windows(tokenizer, pieces(), context_length), max_windows)
        return (_Batch.of(batch, special_ids) for batch in batched(windows, batch_size))

    return batches


@dataclass
class _Totals:
    """Running sums over scored positions, in float64."""

    ce: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CONDITIONS, 0.0))
    kl: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CONDITIONS[1:], 0.0))
    positions: int = 0


@torch.inference_mode()
def splice_metrics(
    lm: PreTrainedModel,
    sae: SparseAutoencoder,
    blocks: nn.ModuleList,
    layer: int,
    site: Site,
    batches: Callable[[], Iterator[_Batch]],
    progress: Callable[[int], Any] = lambda tokens: None,
) -> dict[str, float]:
    """CE, KL, loss recovered, KL score and reconstruction metrics of ``sae`` spliced at ``site``
    of decoder layer ``blocks[layer]``.

    ``batches()`` must yield the same batches each time it is called: once for the mean of the
    site (a pass up to ``layer`` only), once for the four conditions. ``progress`` receives the
    number of tokens of each batch and pass. See the module docstring for the definitions.
    """
    sae = sae.to(lm.device).eval()
    mean = _site_mean(lm, blocks, layer, site, batches, progress)
    reconstruction = reconstruction_metrics(sae.d_sae, prefix="", d_target=sae.d_out).to(lm.device)
    totals = _Totals()
    hook = _SpliceHook(site_module(blocks[layer], layer, site), site)
    try:
        for batch in batches():
            input_ids = torch.from_numpy(batch.input_ids).to(lm.device)
            scored = torch.from_numpy(batch.scored).to(lm.device)
            targets = input_ids[:, 1:][scored[:, :-1]]
            hook.positions = scored
            hook.rows = None
            clean = _log_probs(lm(input_ids=input_ids, use_cache=False).logits, scored)
            sae_input, site_output = hook.take_recorded()
            out = sae.forward_pass(sae_input, None if sae.reconstructs_input else site_output)
            reconstruction.update(out.target, out.reconstruction, out.features, decoder_norms=out.decoder_norms)
            replacements = {
                "sae": out.reconstruction,
                "zero": torch.zeros_like(site_output),
                "mean": mean.expand_as(site_output),
            }
            totals.ce["clean"] += _cross_entropy(clean, targets)
            for condition, rows in replacements.items():
                hook.rows = rows
                spliced = _log_probs(lm(input_ids=input_ids, use_cache=False).logits, scored)
                totals.ce[condition] += _cross_entropy(spliced, targets)
                totals.kl[condition] += kl_divergence(clean, spliced).sum(dtype=torch.float64).item()
            totals.positions += int(targets.numel())
            progress(batch.input_ids.size)
    finally:
        hook.remove()
    return _summary(totals, {name: float(value) for name, value in reconstruction.compute().items()})


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v)) over the last dimension, from log-probabilities.

    Terms with p(v) = 0 contribute 0 (the convention 0·log 0 = 0), as in
    ``torch.nn.functional.kl_div(log_q, log_p, log_target=True)``.
    """
    return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _summary(totals: _Totals, reconstruction: dict[str, float]) -> dict[str, float]:
    """Means over positions, the two ratios, and the reconstruction metrics."""
    n = totals.positions
    ce = {name: value / n for name, value in totals.ce.items()}
    kl = {name: value / n for name, value in totals.kl.items()}
    return {
        "n_tokens": n,
        "loss_recovered": _ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        "loss_recovered_mean_ablation": _ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"]),
        "kl_score": _ratio(kl["zero"] - kl["sae"], kl["zero"]),
        **{f"ce_{name}": value for name, value in ce.items()},
        **{f"kl_{name}": value for name, value in kl.items()},
        **reconstruction,
    }


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (the baseline equals the clean model)."""
    return numerator / denominator if denominator != 0 else math.nan


def _log_probs(logits: Tensor, scored: Tensor) -> Tensor:
    """log-softmax, in float32, of the logits at the scored positions [N, vocab]."""
    return logits[scored].float().log_softmax(-1)


def _cross_entropy(log_probs: Tensor, targets: Tensor) -> float:
    """Σ_t −log p(w_{t+1}) over the rows of ``log_probs`` [N, vocab], as a float64 sum."""
    return -log_probs.gather(-1, targets[:, None]).sum(dtype=torch.float64).item()


def _site_mean(
    lm: PreTrainedModel,
    blocks: nn.ModuleList,
    layer: int,
    site: Site,
    batches: Callable[[], Iterator[_Batch]],
    progress: Callable[[int], Any],
) -> Tensor:
    """μ: the mean of the site's output over every scored position [d_model] (summed in float64)."""
    hooks = SiteCapture(blocks, [layer], site)
    total: Tensor | None = None
    count = 0
    try:
        for batch in batches():
            activations, targets = hooks.run(lm, batch.input_ids)[layer]
            rows = (activations if targets is None else targets)[torch.from_numpy(batch.scored).to(lm.device)]
            total = rows.double().sum(0) if total is None else total + rows.double().sum(0)
            count += rows.shape[0]
            progress(batch.input_ids.size)
    finally:
        hooks.remove()
    if total is None or count == 0:
        raise UserError(f"no position of the text can be scored at layer {layer}: every token is special")
    return (total / count).float()


class _SpliceHook:
    """Forward hook on the site module.

    With ``rows`` None it records the (SAE input, site output) rows at ``positions``: the module's
    output for resid_post and mlp_out, (MLP input, MLP output) for mlp_in_out. Otherwise it
    returns the module's output with ``rows`` [N, d_model] written at ``positions``.
    """

    def __init__(self, module: nn.Module, site: Site) -> None:
        self.site = site
        self.positions: Tensor | None = None
        self.rows: Tensor | None = None
        self.recorded: tuple[Tensor, Tensor] | None = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.rows is None:
            inputs = hidden
            if self.site == "mlp_in_out":
                inputs = module_input(args, kwargs)
            self.recorded = (inputs[self.positions], hidden[self.positions])
            return None
        spliced = hidden.clone()
        spliced[self.positions] = self.rows.to(hidden.dtype)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    def take_recorded(self) -> tuple[Tensor, Tensor]:
        """The rows recorded by the last pass without ``rows``; clears them."""
        if self.recorded is None:
            raise RuntimeError("the forward pass did not reach the hooked site")
        recorded, self.recorded = self.recorded, None
        return recorded

    def remove(self) -> None:
        """Detach the hook from the model."""
        self.handle.remove()


def _load_sae(path: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE at ``path`` (checkpoint file or export directory) and the activation-file attributes
    it recorded (layer, site, model, ...; empty when it recorded none)."""
    path = Path(path)
    if path.is_dir():
        config = read_export_config(path)
        source = config.get("metadata", {}).get("lightning_sae_source") or {}
        return load_export(path), source
    if not path.is_file():
        raise UserError(f"SAE not found: {path} (give a checkpoint file or an export directory with {CONFIG_FILE})")
    checkpoint = read_checkpoint(path)
    source = checkpoint.get(ActivationDataModule.__qualname__, {}).get("source") or {}
    return SparseAutoencoder.from_checkpoint_dict(checkpoint, str(path)), source


def resolve_site(layer: int | None, site: str | None, attrs: dict[str, Any]) -> tuple[int, Site]:
    """Layer and site: the arguments, else the metadata's ``layer`` and ``site`` attributes."""
    layer = layer if layer is not None else attrs.get("layer")
    site = site or attrs.get("site")
    if site is None:
        raise UserError("the site is unknown: pass --site (resid_post, mlp_out or mlp_in_out) or --data")
    if site not in get_args(Site):
        raise UserError(f"site {site!r} is not one of {', '.join(get_args(Site))}")
    if layer is None:
        raise UserError("the layer is unknown: pass --layer or --data")
    return int(layer), site


def check_kind(sae: SparseAutoencoder, site: Site) -> None:
    """A transcoder (separate targets) goes with mlp_in_out, an SAE with the other sites."""
    if site == "mlp_in_out" and sae.reconstructs_input:
        raise UserError("site mlp_in_out needs a transcoder (trained on MLP inputs → outputs), not an SAE")
    if site != "mlp_in_out" and not sae.reconstructs_input:
        raise UserError(f"the SAE is a transcoder: evaluate it at site mlp_in_out, not {site}")


def check_model(sae: SparseAutoencoder, lm: PreTrainedModel, blocks: nn.ModuleList, layer: int, model_id: str) -> None:
    """The layer exists and the SAE's widths equal the model's hidden size."""
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} is out of range: {model_id} has layers 0..{len(blocks) - 1}")
    hidden_size = int(lm.config.hidden_size)
    if sae.d_in != hidden_size or sae.d_out != hidden_size:
        raise UserError(
            f"the SAE has d_in={sae.d_in}, d_out={sae.d_out} but {model_id} has hidden size {hidden_size}: "
            "is it an SAE of this model?"
        )


def _check_json_target(path: Path, overwrite: bool) -> None:
    """Refuse a ``--json`` path that exists (unless ``overwrite``) or whose folder does not."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite true to replace it, or give another --json")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist")


def _report(results: dict[str, Any], json: str | None, json_path: Path | None) -> None:
    """Print the table, or the JSON when ``json`` is 'true'; then write the JSON, whole, to ``json_path``."""
    text = jsonlib.dumps(results, indent=2)
    if json is not None and json.lower() == "true":
        print(text)
        return
    print(format_table(results))
    if json_path is None:
        return
    try:
        with written_atomically(json_path) as temporary:
            temporary.write_text(text + "\n")
    except OSError as error:
        raise UserError(
            f"cannot write {json_path}: {error.strerror or error}; the results are printed above"
        ) from error


def format_table(results: dict[str, Any]) -> str:
    """The human-readable report of :func:`evaluate`'s results."""
    lines = [
        f"SAE {results['sae']} spliced into {results['model']}, layer {results['layer']}, {results['site']}",
        f"{results['n_tokens']} scored tokens",
        "",
        f"  {'condition':<14} {'CE loss':>10} {'KL(clean‖·)':>12}",
    ]
    for name, label in (("clean", "clean"), ("sae", "SAE spliced"), ("zero", "zero-ablated"), ("mean", "mean-ablated")):
        kl = results.get(f"kl_{name}", 0.0)
        lines.append(f"  {label:<14} {results[f'ce_{name}']:>10.4f} {kl:>12.4f}")
    lines += [
        "",
        f"  {'loss recovered':<30} {results['loss_recovered']:.2%} (zero-ablation baseline)",
        f"  {'loss recovered, mean baseline':<30} {results['loss_recovered_mean_ablation']:.2%}",
        f"  {'KL score':<30} {results['kl_score']:.2%}",
        "",
    ]
    skip = {"sae", "model", "layer", "site", "n_tokens", "loss_recovered", "loss_recovered_mean_ablation", "kl_score"}
    lines += [
        f"  {name:<30} {value:.6g}"
        for name, value in results.items()
        if name not in skip and not name.startswith(("ce_", "kl_"))
    ]
    return "\n".join(lines)
