"""``lightning_sae cache``: run a causal language model over text and store activations.

The text is tokenised into a deterministic sequence of fixed-length context windows (see
``_windows``), the model runs over batches of windows, forward hooks capture one site per
requested layer, and a private exception raised by the hook on the deepest requested layer
ends the forward pass there. Rows go to activation files in the format of
``lightning_sae.data.format``; since a window always yields the same rows, the committed row
count of a file tells which windows it holds, which is what ``--resume`` relies on.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from lightning_sae.data import format as fmt
from lightning_sae.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Site = Literal["resid_post", "mlp_out", "mlp_in_out"]
StorageDtype = Literal["float32", "float16"]
ModelDtype = Literal["float32", "bfloat16", "float16"]

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
LAYER_PLACEHOLDER = "{layer}"
TEXT_BLOCK_CHARS = 1 << 16
PIECES_PER_TOKENIZER_CALL = 256
VERIFY_BLOCK_ROWS = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RUN_ONLY_ATTRS = ("n_tokens", fmt.COMMITTED_ROWS)

Piece = tuple[str, bool]
Captured = dict[int, tuple[torch.Tensor, torch.Tensor | None]]


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer: the rest of the forward pass is skipped."""


def cache(
    *,
    output: Path,
    text: str,
    layer: int | list[int],
    model: str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    site: Site = "resid_post",
    text_field: str = "text",
    split: str = "train",
    context_length: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    drop_special_tokens: bool = True,
    dtype: StorageDtype = "float32",
    model_dtype: ModelDtype = "float32",
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Run a Hugging Face causal LM over text and store one site's activations per layer.

    Args:
        output: HDF5 file to write. With several layers it must contain '{layer}', which is
            replaced by each layer number (one file per layer).
        text: Input text: a plain-text file, a glob of files ('docs/**/*.txt'), a JSON-lines
            file ('.jsonl', one document per line) or a directory written by Hugging Face
            datasets' save_to_disk. A plain-text file is one document.
        layer: Decoder layer(s) to read, counted from 0. Several layers ('[3,6]') share one
            forward pass.
        model: Hugging Face hub id or local directory of the model and its tokenizer. May be
            left out when gguf_file is a local file (its directory is used).
        gguf_file: GGUF weights to load through transformers (needs the 'gguf' package): a
            local file, or a file name inside the hub repository given by model.
        revision: Hub branch, tag or commit to load.
        site: 'resid_post' (output of decoder layer L), 'mlp_out' (output of layer L's MLP)
            or 'mlp_in_out' (input of layer L's MLP as activations, its output as targets;
            for transcoders).
        text_field: Field holding the text in JSON-lines records and datasets rows.
        split: Split to read when the datasets directory holds a DatasetDict.
        context_length: Tokens per context window, the BOS token included.
        batch_size: Context windows per forward pass.
        max_tokens: Stop after this many tokens through the model (whole windows, rounded
            down); all the text when left out.
        drop_special_tokens: Skip rows read at special tokens (BOS, EOS separators), whose
            activations are outliers.
        dtype: Storage dtype. float16 halves the file; a value beyond float16's range
            (65504) stops the run with an error instead of being stored as Inf.
        model_dtype: Dtype the model computes in.
        device: 'auto' (CUDA when available, else CPU), or a torch device such as 'cuda:1'.
        resume: Continue existing output files where an interrupted run stopped (the request
            must match their metadata); missing files are started.
        overwrite: Replace existing output files instead of refusing.
    """
    layers = _check_request(layer, context_length, batch_size, max_tokens, resume, overwrite)
    paths = _output_paths(output, layers)
    if not (resume or overwrite):
        existing = [str(path) for path in paths.values() if path.exists()]
        if existing:
            raise UserError(
                f"{', '.join(existing)} exists; pass --resume true to continue it or --overwrite true to replace it"
            )
    pieces = _text_source(text, text_field, split)
    model_id, load_kwargs = _model_source(model, gguf_file, revision)
    tokenizer, lm = _load(model_id, load_kwargs, model_dtype, _device(device))
    blocks = _decoder_layers(lm)
    for index in layers:
        if not 0 <= index < len(blocks):
            raise UserError(f"layer {index} is out of range: {model_id} has layers 0..{len(blocks) - 1}")

    def windows() -> Iterator[np.ndarray]:
        return _windows(tokenizer, pieces(), context_length)

    special_ids = np.array(sorted(tokenizer.all_special_ids) if drop_special_tokens else [], dtype=np.int64)
    max_windows = None if max_tokens is None else max_tokens // context_length
    total_windows = sum(1 for _ in itertools.islice(windows(), max_windows))
    if total_windows == 0:
        raise UserError(f"{text} holds fewer than context_length={context_length} tokens")
    common_attrs = {
        "model": model_id,
        "gguf_file": load_kwargs.get("gguf_file", ""),
        "revision": _revision(model_id, load_kwargs),
        "site": site,
        "d_model": int(lm.config.hidden_size),
        "context_length": context_length,
        "tokenizer": str(tokenizer.name_or_path),
        "text": text,
        "text_field": text_field,
        "split": split,
        "drop_special_tokens": drop_special_tokens,
        "dtype": dtype,
        "model_dtype": model_dtype,
    }
    with ExitStack() as stack:
        files: dict[int, h5py.File] = {}
        done: dict[int, int] = {}
        for index, path in paths.items():
            attrs = {**common_attrs, "layer": index}
            file = _open_output(path, attrs, site, dtype, resume)
            stack.callback(file.close)
            files[index] = file
            done[index] = _windows_done(file, windows(), special_ids) if fmt.committed_rows(file) else 0
        first = min(done.values())
        hooks = _Hooks(blocks, layers, site)
        stack.callback(hooks.remove)
        bar = tqdm(
            total=total_windows * context_length,
            initial=min(first, total_windows) * context_length,
            unit="tok",
            unit_scale=True,
            desc=f"cache {site} layer {','.join(map(str, layers))}",
        )
        stack.callback(bar.close)
        start = first
        for batch in _batched(itertools.islice(windows(), first, total_windows), batch_size):
            captured = hooks.run(lm, batch)
            keep = ~np.isin(batch, special_ids)
            rows = {index: _rows(captured[index], keep, index, site, dtype) for index in layers}
            for index, file in files.items():
                if done[index] < start + len(batch):
                    _append(file, batch, keep, rows[index], skip=max(0, done[index] - start))
                    done[index] = start + len(batch)
                    file.attrs["n_tokens"] = done[index] * context_length
                    file.flush()
            start += len(batch)
            bar.update(len(batch) * context_length)
        for file in files.values():
            _truncate_to_committed(file)
    for path in paths.values():
        info = fmt.read_info(path)
        print(f"{path}: {info.n_rows} rows of {info.d_in} ({info.attrs['n_tokens']} tokens)")


def _check_request(
    layer: int | list[int],
    context_length: int,
    batch_size: int,
    max_tokens: int | None,
    resume: bool,
    overwrite: bool,
) -> list[int]:
    """Validate the arguments that need no file or model; returns the sorted layer list."""
    layers = sorted(set([layer] if isinstance(layer, int) else layer))
    if not layers:
        raise UserError("--layer needs at least one layer")
    if context_length < 2:
        raise UserError(f"--context_length must be at least 2, got {context_length}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < context_length:
        raise UserError(f"--max_tokens={max_tokens} is less than one window (--context_length={context_length})")
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    return layers


def _output_paths(output: Path, layers: list[int]) -> dict[int, Path]:
    """One output path per layer, from the '{layer}' placeholder."""
    template = str(output)
    if len(layers) > 1 and LAYER_PLACEHOLDER not in template:
        raise UserError(f"--output {template} needs '{LAYER_PLACEHOLDER}' to name one file per layer")
    paths = {index: Path(template.replace(LAYER_PLACEHOLDER, str(index))) for index in layers}
    for path in paths.values():
        if not path.parent.is_dir():
            raise UserError(f"the folder of --output {path} does not exist")
    return paths


def _text_source(text: str, text_field: str, split: str) -> Callable[[], Iterator[Piece]]:
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


def _windows(tokenizer: PreTrainedTokenizerBase, pieces: Iterable[Piece], context_length: int) -> Iterator[np.ndarray]:
    """Token windows: BOS, then the next ``context_length - 1`` tokens of the document stream.

    The stream concatenates the documents, each followed by EOS (BOS when the tokenizer has
    no EOS). An incomplete last window is dropped. Without BOS, windows are plain slices.
    """
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    body = context_length - len(prefix)
    stream: list[int] = []
    for group in _batched(pieces, PIECES_PER_TOKENIZER_CALL):
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


def _batched(items: Iterable[Any], size: int) -> Iterator[Any]:
    """Consecutive groups of ``size`` items; arrays are stacked into one array."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield np.stack(group) if isinstance(group[0], np.ndarray) else group


def _model_source(model: str | None, gguf_file: str | None, revision: str | None) -> tuple[str, dict[str, str]]:
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


def _device(device: str) -> torch.device:
    """Resolve 'auto' to CUDA when available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device}: {exc}") from exc


def _load(
    model_id: str, kwargs: dict[str, str], model_dtype: ModelDtype, device: torch.device
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model in eval mode on ``device``, both from the same source."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise UserError("'lightning_sae cache' needs transformers: pip install 'lightning_sae[cache]'") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(model_id, dtype=getattr(torch, model_dtype), **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load model {model_id}: {exc}") from exc
    return tokenizer, lm.to(device).eval()


def _revision(model_id: str, kwargs: dict[str, str]) -> str:
    """'sha256:<hex>' of local weights (the GGUF file, else the folder's weight files), else the hub commit."""
    gguf_file = kwargs.get("gguf_file")
    if gguf_file is not None and Path(gguf_file).is_file():
        return _sha256([Path(gguf_file)])
    if gguf_file is None and Path(model_id).is_dir():
        return _sha256(sorted(p for p in Path(model_id).iterdir() if p.suffix in WEIGHT_SUFFIXES))
    from transformers.utils.hub import cached_file, extract_commit_hash

    resolved = cached_file(model_id, gguf_file or "config.json", revision=kwargs.get("revision"))
    return extract_commit_hash(resolved, None) or kwargs.get("revision") or "unknown"


def _sha256(paths: list[Path]) -> str:
    """One SHA-256 over the contents of ``paths``, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _decoder_layers(lm: PreTrainedModel) -> nn.ModuleList:
    """The model's list of decoder blocks: the first ModuleList with one entry per hidden layer.

    Matches ``model.layers`` (Llama, SmolLM2, Mistral), ``transformer.h`` (GPT-2) and
    ``gpt_neox.layers`` (Pythia) alike.
    """
    n_layers = getattr(lm.config, "num_hidden_layers", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise UserError(f"cannot find the decoder layers of {type(lm).__name__} (config.num_hidden_layers={n_layers})")


class _Hooks:
    """Forward hooks capturing one site per layer; the deepest one stops the forward pass."""

    def __init__(self, blocks: nn.ModuleList, layers: list[int], site: Site) -> None:
        self.captured: Captured = {}
        self.handles: list[RemovableHandle] = []
        for index in layers:
            module = blocks[index] if site == "resid_post" else getattr(blocks[index], "mlp", None)
            if not isinstance(module, nn.Module):
                raise UserError(f"layer {index} ({type(blocks[index]).__name__}) has no .mlp module; use resid_post")
            hook = self._hook(index, site, stop=index == layers[-1])
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, index: int, site: Site, stop: bool) -> Callable[..., None]:
        """The hook for one layer: stores (activations, targets) under ``index``."""

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if site == "mlp_in_out":
                inp = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                self.captured[index] = (inp, out)
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


def _rows(
    captured: tuple[torch.Tensor, torch.Tensor | None], keep: np.ndarray, index: int, site: Site, dtype: StorageDtype
) -> tuple[np.ndarray, np.ndarray | None]:
    """Kept positions of the captured (activations, targets) as storage-dtype arrays."""
    activations, targets = captured
    mask = torch.from_numpy(keep).to(activations.device)
    where = f"layer {index} ({site})"
    return (
        _checked(activations[mask], where, dtype),
        None if targets is None else _checked(targets[mask], where, dtype),
    )


def _checked(rows: torch.Tensor, where: str, dtype: StorageDtype) -> np.ndarray:
    """``rows`` in the storage dtype; NaN/Inf, or values float16 cannot hold, are errors."""
    rows = rows.float()
    if not torch.isfinite(rows).all():
        raise UserError(f"the model produced NaN or Inf at {where}; try --model_dtype float32")
    peak = rows.abs().max().item() if dtype == "float16" and rows.numel() else 0.0
    if peak > FLOAT16_MAX:
        raise UserError(
            f"{where} has an activation of magnitude {peak:.4g}, beyond float16's range ({FLOAT16_MAX:.0f}); "
            "the rows written so far are valid, but rerun with --dtype float32 --overwrite true"
        )
    return rows.to(getattr(torch, dtype)).cpu().numpy()


def _append(
    file: h5py.File,
    batch: np.ndarray,
    keep: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray | None],
    skip: int,
) -> None:
    """Commit the kept rows of ``batch``'s windows from window ``skip`` on (earlier ones are in the file)."""
    activations, targets = rows
    first_row = int(keep[:skip].sum())
    fmt.append(
        file,
        activations[first_row:],
        None if targets is None else targets[first_row:],
        batch[skip:][keep[skip:]],
    )


def _open_output(path: Path, attrs: dict[str, Any], site: Site, dtype: StorageDtype, resume: bool) -> h5py.File:
    """Open ``path`` to continue (``resume`` and it exists, metadata checked) or create it afresh."""
    if not (resume and path.exists()):
        d_model = attrs["d_model"]
        return fmt.create(
            path,
            d_in=d_model,
            d_out=d_model if site == "mlp_in_out" else None,
            dtype=dtype,
            token_ids=True,
            attrs={**attrs, "n_tokens": 0},
        )
    try:
        file = h5py.File(path, "r+")
    except OSError as exc:
        raise UserError(f"cannot reopen {path} to resume ({exc}); start over with --overwrite true") from exc
    stored = {
        key: value.item() if isinstance(value, np.generic) else value
        for key, value in file.attrs.items()
        if key not in RUN_ONLY_ATTRS
    }
    if fmt.TOKEN_IDS not in file or stored.keys() != attrs.keys():
        file.close()
        raise UserError(f"{path} was not written by 'lightning_sae cache'; pass --overwrite true to replace it")
    for key, value in attrs.items():
        if stored[key] != value:
            file.close()
            raise UserError(
                f"cannot resume {path}: it was written with {key}={stored[key]!r}, this run asks {key}={value!r}; "
                "use another --output or --overwrite true"
            )
    return file


def _windows_done(file: h5py.File, windows: Iterator[np.ndarray], special_ids: np.ndarray) -> int:
    """Number of whole windows behind the file's committed rows, checking their stored token ids."""
    committed = fmt.committed_rows(file)
    stored = file[fmt.TOKEN_IDS]
    block_start, block = 0, stored[: min(committed, VERIFY_BLOCK_ROWS)]
    rows = count = 0
    for window in windows:
        if rows == committed:
            return count
        kept = window[~np.isin(window, special_ids)]
        stop = rows + len(kept)
        if stop > committed:
            break
        if stop > block_start + len(block):
            block_start, block = rows, stored[rows : min(committed, rows + VERIFY_BLOCK_ROWS)]
        if not np.array_equal(block[rows - block_start : stop - block_start], kept):
            raise UserError(
                f"cannot resume {file.filename}: its token ids differ from the text's; did the text change?"
            )
        rows, count = stop, count + 1
    if rows == committed:
        return count
    raise UserError(f"cannot resume {file.filename}: its {committed} rows do not end on a window of the text")


def _truncate_to_committed(file: h5py.File) -> None:
    """Drop rows past ``committed_rows`` (left by an interrupted run and not overwritten)."""
    committed = fmt.committed_rows(file)
    for name in (fmt.ACTIVATIONS, fmt.TARGETS, fmt.TOKEN_IDS):
        if name in file and file[name].shape[0] > committed:
            file[name].resize(committed, axis=0)
    file.flush()
