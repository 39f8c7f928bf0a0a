"""Access to a Hugging Face causal language model: text in, hooked activations out.

Shared by ``lightning_sae cache`` (which stores activations) and ``lightning_sae evaluate``
(which splices an SAE back in): the checks of the arguments they share, where text comes from
and how it becomes fixed-length token windows, how a model is loaded (hub id, local folder or
GGUF file), where its decoder layers are, and which module each cache site hooks.
"""

from __future__ import annotations

import glob
import importlib.util
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_sae.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Site = Literal["resid_post", "mlp_out", "mlp_in_out"]
ModelDtype = Literal["float32", "bfloat16", "float16"]

TEXT_BLOCK_CHARS = 1 << 16
PIECES_PER_TOKENIZER_CALL = 256

Piece = tuple[str, bool]
"""A stretch of text and whether it ends a document."""
Captured = dict[int, tuple[torch.Tensor, torch.Tensor | None]]
"""Layer → (activations, targets or None) captured by :class:`SiteCapture`."""


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer: the rest of the forward pass is skipped."""


def check_request(layer: int | list[int], context_length: int, batch_size: int, max_tokens: int | None) -> list[int]:
    """Validate the layers, window length, batch size and token budget of a run over token windows;
    returns the sorted layer list."""
    layers = sorted(set([layer] if isinstance(layer, int) else layer))
    if not layers:
        raise UserError("--layer needs at least one layer")
    if context_length < 2:
        raise UserError(f"--context_length must be at least 2, got {context_length}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < context_length:
        raise UserError(f"--max_tokens={max_tokens} is less than one window (--context_length={context_length})")
    return layers


def text_source(text: str, text_field: str, split: str) -> Callable[[], Iterator[Piece]]:
    """Check ``text`` and return a function that streams it as (piece, ends_document) pairs."""
    path = Path(text)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            raise UserError(
                f"{text} is a folder but not one written by datasets' save_to_disk; "
                "pass a glob such as 'folder/**/*.txt' for text files"
            )
        if importlib.util.find_spec("datasets") is None:
            raise UserError("reading a datasets folder needs the 'datasets' package: pip install datasets")
        return lambda: _dataset_pieces(path, text_field, split)
    if any(char in text for char in "*?["):
        files = sorted(Path(name) for name in glob.glob(text, recursive=True) if Path(name).is_file())
        if not files:
            raise UserError(f"no file matches --text {text}")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"text file not found: {text}")
    return lambda: itertools.chain.from_iterable(_file_pieces(file, text_field) for file in files)


def _file_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    """A JSON-lines file: one document per line. Any other file: one document, read in blocks."""
    with path.open(encoding="utf-8", errors="replace") as stream:
        if path.suffix == ".jsonl":
            for number, line in enumerate(stream, 1):
                if line.strip():
                    yield _record_text(line, text_field, f"{path}:{number}"), True
            return
        block: list[str] = []
        size = 0
        for line in stream:
            block.append(line)
            size += len(line)
            if size >= TEXT_BLOCK_CHARS:
                yield "".join(block), False
                block, size = [], 0
        yield "".join(block), True


def _record_text(line: str, text_field: str, where: str) -> str:
    """The text field of one JSON-lines record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(f"{where} has no string field '{text_field}'; set --text_field")
    return record[text_field]


def _dataset_pieces(path: Path, text_field: str, split: str) -> Iterator[Piece]:
    """Rows of a Hugging Face datasets folder, one document each."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"{path} has splits {sorted(dataset)}, not '{split}'; set --split")
        dataset = dataset[split]
    if text_field not in dataset.column_names:
        raise UserError(f"{path} has columns {dataset.column_names}, not '{text_field}'; set --text_field")
    for document in dataset.select_columns([text_field]).iter(batch_size=PIECES_PER_TOKENIZER_CALL):
        for value in document[text_field]:
            yield str(value), True


def token_windows(
    tokenizer: PreTrainedTokenizerBase, pieces: Iterable[Piece], context_length: int
) -> Iterator[np.ndarray]:
    """Token windows: BOS, then the next ``context_length - 1`` tokens of the document stream.

    The stream concatenates the documents, each followed by EOS (BOS when the tokenizer has
    no EOS). An incomplete last window is dropped. Without BOS, windows are plain slices.
    """
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    body = context_length - len(prefix)
    stream: list[int] = []
    for group in batched(pieces, PIECES_PER_TOKENIZER_CALL):
        encoded = tokenizer([piece for piece, _ in group], add_special_tokens=False, verbose=False)["input_ids"]
        for ids, (_, ends_document) in zip(encoded, group, strict=True):
            stream.extend(ids)
            if ends_document and separator is not None:
                stream.append(separator)
        start = 0
        while len(stream) - start >= body:
            yield np.array(prefix + stream[start : start + body], dtype=np.int64)
            start += body
        del stream[:start]


def batched(items: Iterable[Any], size: int) -> Iterator[Any]:
    """Consecutive groups of ``size`` items; arrays are stacked into one array."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield np.stack(group) if isinstance(group[0], np.ndarray) else group


def model_source(model: str | None, gguf_file: str | None, revision: str | None) -> tuple[str, dict[str, str]]:
    """The id or folder to load from, and the extra ``from_pretrained`` arguments."""
    kwargs = {} if revision is None else {"revision": revision}
    if gguf_file is not None:
        if Path(gguf_file).is_file():
            gguf_file = str(Path(gguf_file).resolve())
            model = model or str(Path(gguf_file).parent)
        elif model is None:
            raise UserError(f"GGUF file not found: {gguf_file} (give --model to read it from a hub repository)")
        kwargs["gguf_file"] = gguf_file
    elif model is None:
        raise UserError("give --model (hub id or local folder) or --gguf_file")
    if model.startswith(("/", ".")) and not Path(model).is_dir():
        raise UserError(f"model folder not found: {model}")
    return model, kwargs


def resolve_device(device: str) -> torch.device:
    """Resolve 'auto' to CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device}: {exc}") from exc


def load_model(
    model_id: str, kwargs: dict[str, str], model_dtype: ModelDtype, device: torch.device
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model in eval mode on ``device``, both from the same source."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UserError("running a language model needs transformers: pip install 'lightning_sae[cache]'") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, model_dtype), **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load model {model_id}: {exc}") from exc
    return tokenizer, lm.to(device).eval()


def decoder_layers(lm: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks: the first ModuleList with one entry per hidden layer.

    Matches ``model.layers`` (Llama, SmolLM2, Mistral), ``transformer.h`` (GPT-2) and
    ``gpt_neox.layers`` (Pythia) alike.
    """
    n_layers = getattr(lm.config, "num_hidden_layers", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserError(f"cannot find the decoder layers of {type(lm).__name__} (config.num_hidden_layers={n_layers})")


class SiteCapture:
    """Forward hooks capturing one site per layer; the deepest one stops the forward pass."""

    def __init__(self, blocks: nn.ModuleList, layers: list[int], site: Site) -> None:
        self.captured: Captured = {}
        self.handles: list[RemovableHandle] = []
        for index in layers:
            module = site_module(blocks[index], index, site)
            hook = self._hook(index, site, stop=index == layers[-1])
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, index: int, site: Site, stop: bool) -> Callable[..., None]:
        """The hook for one layer: stores (activations, targets) under ``index``."""

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if site == "mlp_in_out":
                self.captured[index] = (module_input(args, kwargs), out)
            else:
                self.captured[index] = (out, None)
            if stop:
                raise _StopForward

        return hook

    @torch.inference_mode()
    def run(self, lm: PreTrainedModel, batch: np.ndarray) -> Captured:
        """Forward ``batch`` [windows, tokens] up to the deepest hooked layer."""
        self.captured = {}
        try:
            lm(input_ids=torch.from_numpy(batch).to(lm.device), use_cache=False)
        except _StopForward:
            return self.captured
        raise RuntimeError("the forward pass ended without reaching the deepest hooked layer")

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self.handles:
            handle.remove()


def site_module(block: nn.Module, layer: int, site: Site) -> nn.Module:
    """The module whose output the site is: the decoder layer (resid_post) or its MLP."""
    module = block if site == "resid_post" else getattr(block, "mlp", None)
    if not isinstance(module, nn.Module):
        raise UserError(f"layer {layer} ({type(block).__name__}) has no .mlp module; use resid_post")
    return module


def module_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden-state input of a hooked module, whether passed by position or by keyword."""
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
