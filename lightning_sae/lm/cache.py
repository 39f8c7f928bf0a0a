"""``lightning_sae cache``: run a causal language model over text and store activations.

The text is tokenised into a deterministic sequence of fixed-length context windows (see
``lightning_sae.lm.access.token_windows``), the model runs over batches of windows, forward hooks
capture one site per requested layer, and a private exception raised by the hook on the deepest
requested layer ends the forward pass there. Rows go to activation files in the format of
``lightning_sae.data.format``; since a window always yields the same rows, the committed row
count of a file tells which windows it holds, which is what ``--resume`` relies on.

A file another process has open (a ``fit`` reading it, another ``cache`` writing it) is neither
resumed nor replaced; a full disk ends the run with the committed rows intact.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_sae.data import format as fmt
from lightning_sae.errors import UserError
from lightning_sae.files import held_exclusively, out_of_space, refuse_if_in_use
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
    resolve_device,
    text_source,
    token_windows,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

StorageDtype = Literal["float32", "float16"]

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
LAYER_PLACEHOLDER = "{layer}"
VERIFY_BLOCK_ROWS = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RUN_ONLY_ATTRS = ("n_tokens", fmt.COMMITTED_ROWS)


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
    layers = check_request(layer, context_length, batch_size, max_tokens)
    paths = _output_paths(output, layers, resume, overwrite)
    pieces = text_source(text, text_field, split)
    model_id, load_kwargs = model_source(model, gguf_file, revision)
    tokenizer, lm = load_model(model_id, load_kwargs, model_dtype, resolve_device(device))
    blocks = decoder_layers(lm)
    for index in layers:
        if not 0 <= index < len(blocks):
            raise UserError(f"layer {index} is out of range: {model_id} has layers 0..{len(blocks) - 1}")
    special_ids = np.array(sorted(tokenizer.all_special_ids) if drop_special_tokens else [], dtype=np.int64)
    windows = _Windows(tokenizer, pieces, context_length, special_ids)
    total_windows = _count_windows(windows, text, max_tokens)
    attrs = {
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
    try:
        with ExitStack() as stack:
            files, done = _open_outputs(stack, paths, attrs, windows, resume)
            hooks = SiteCapture(blocks, layers, site)
            stack.callback(hooks.remove)
            _append_windows(lm, hooks, files, done, windows, total_windows, batch_size, site, dtype)
            for file in files.values():
                _truncate_to_committed(file)
    except OSError as error:
        if out_of_space(error):
            raise UserError(
                f"no space left on the disk while writing {', '.join(map(str, paths.values()))}: the rows committed "
                "so far are complete; free space and rerun with --resume true"
            ) from None
        raise
    _report(paths)


def _output_paths(output: Path, layers: list[int], resume: bool, overwrite: bool) -> dict[int, Path]:
    """One output path per layer, from the '{layer}' placeholder; an existing file needs ``resume``
    or ``overwrite``."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    template = str(output)
    if len(layers) > 1 and LAYER_PLACEHOLDER not in template:
        raise UserError(f"--output {template} needs '{LAYER_PLACEHOLDER}' to name one file per layer")
    paths = {index: Path(template.replace(LAYER_PLACEHOLDER, str(index))) for index in layers}
    for path in paths.values():
        if not path.parent.is_dir():
            raise UserError(f"the folder of --output {path} does not exist")
    existing = [path for path in paths.values() if path.exists()]
    for path in existing:
        refuse_if_in_use(path, "resume" if resume else "overwrite" if overwrite else "write")
    if existing and not (resume or overwrite):
        raise UserError(
            f"{', '.join(map(str, existing))} exists; "
            "pass --resume true to continue it or --overwrite true to replace it"
        )
    return paths


@dataclass(frozen=True)
class _Windows:
    """The text's context windows, the same on every call, and the token ids whose positions give no row."""

    tokenizer: PreTrainedTokenizerBase
    pieces: Callable[[], Iterator[Piece]]
    context_length: int
    special_ids: np.ndarray

    def __call__(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Windows ``start`` to ``stop`` (the end of the text when None)."""
        return itertools.islice(token_windows(self.tokenizer, self.pieces(), self.context_length), start, stop)


def _count_windows(windows: _Windows, text: str, max_tokens: int | None) -> int:
    """Number of windows the run reads: all the text's, or the first ``max_tokens`` tokens' (at least one)."""
    max_windows = None if max_tokens is None else max_tokens // windows.context_length
    total = sum(1 for _ in windows(0, max_windows))
    if total == 0:
        raise UserError(f"{text} holds fewer than context_length={windows.context_length} tokens")
    return total


def _open_outputs(
    stack: ExitStack, paths: dict[int, Path], attrs: dict[str, Any], windows: _Windows, resume: bool
) -> tuple[dict[int, h5py.File], dict[int, int]]:
    """Each layer's file, opened to continue or created (closed by ``stack``), and the number of
    windows it already holds."""
    files: dict[int, h5py.File] = {}
    done: dict[int, int] = {}
    for index, path in paths.items():
        file = _open_output(path, {**attrs, "layer": index}, resume)
        stack.callback(file.close)
        files[index] = file
        done[index] = _windows_done(file, windows(), windows.special_ids) if fmt.committed_rows(file) else 0
    return files, done


def _append_windows(
    lm: PreTrainedModel,
    hooks: SiteCapture,
    files: dict[int, h5py.File],
    done: dict[int, int],
    windows: _Windows,
    total_windows: int,
    batch_size: int,
    site: Site,
    dtype: StorageDtype,
) -> None:
    """Run the model over the windows some file lacks, in batches, and commit each file's new rows.

    ``done`` (windows each file holds) is advanced as rows are committed; a file's ``n_tokens``
    attribute follows it.
    """
    first = min(done.values())
    context_length = windows.context_length
    with tqdm(
        total=total_windows * context_length,
        initial=min(first, total_windows) * context_length,
        unit="tok",
        unit_scale=True,
        desc=f"cache {site} layer {','.join(map(str, files))}",
    ) as bar:
        start = first
        for batch in batched(windows(first, total_windows), batch_size):
            captured = hooks.run(lm, batch)
            keep = ~np.isin(batch, windows.special_ids)
            rows = {index: _rows(captured[index], keep, index, site, dtype) for index in files}
            for index, file in files.items():
                if done[index] < start + len(batch):
                    _append(file, batch, keep, rows[index], skip=max(0, done[index] - start))
                    done[index] = start + len(batch)
                    file.attrs["n_tokens"] = done[index] * context_length
                    file.flush()
            start += len(batch)
            bar.update(len(batch) * context_length)


def _report(paths: dict[int, Path]) -> None:
    """Print each written file's rows, width and tokens."""
    for path in paths.values():
        info = fmt.read_info(path)
        print(f"{path}: {info.n_rows} rows of {info.d_in} ({info.attrs['n_tokens']} tokens)")


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


def _open_output(path: Path, attrs: dict[str, Any], resume: bool) -> h5py.File:
    """Open ``path`` to continue (``resume`` and it exists, metadata checked) or create it afresh."""
    if not (resume and path.exists()):
        with held_exclusively(path, "overwrite"):
            path.unlink(missing_ok=True)  # a new inode: a reader that opened the old file keeps it whole
        d_model = attrs["d_model"]
        return fmt.create(
            path,
            d_in=d_model,
            d_out=d_model if attrs["site"] == "mlp_in_out" else None,
            dtype=attrs["dtype"],
            token_ids=True,
            attrs={**attrs, "n_tokens": 0},
        )
    try:
        file = fmt.open_for_writing(path)
    except OSError as exc:
        raise UserError(f"cannot reopen {path} to resume ({exc}); start over with --overwrite true") from exc
    stored = {key: value for key, value in fmt.attributes(file).items() if key not in RUN_ONLY_ATTRS}
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
