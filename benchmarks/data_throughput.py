"""Rows/s of ``ActivationDataModule``'s training loader against a raw sequential h5py read.

Usage::

    .venv/bin/python benchmarks/data_throughput.py --rows 2000000 --d-in 256

    .venv/bin/python benchmarks/data_throughput.py --rows 1000000 --d-in 768 --dtype float16 --device cuda \
        --tables device --workers 1 2 4 8

Every case runs in its own interpreter, and importing torch and Lightning takes seconds: every
table at 3 repeats is 43 processes, 58 with ``--device``. ``--tables`` picks some (the warm raw read, every
ratio's reference, is always measured); each case's rate is printed to stderr as it ends.

It writes a random activation file (kept and reused when it already has the asked shape), then
measures, each in a fresh process so that its peak memory is its own, repeated ``--repeats``
times in turn so that load from other processes hits every case alike, and reports the median
with the spread (lowest–highest):

- ``raw``: ``dataset[a:a+batch]`` over the file in order, a new array per batch: the reference.
- ``chunks``: whole HDF5 chunks in a random order, the reads a shuffled loader makes (it permutes
  chunk-sized blocks): cold, what the disk gives for them.
- ``shuffle`` / ``ordered``: one epoch of the datamodule's training loader, shuffling on / off,
  with the file read into the page cache just before ("warm": the CPU cost of reading) and with the file's pages
  dropped first ("cold", ``posix_fadvise(DONTNEED)`` on this file only: the disk read of data
  larger than memory).
- ``gather``: the random-row gather any row-level shuffle does, on rows already in memory
  (``np.take`` of a batch of random rows of a 256 MiB array): the bound on a shuffled loader
  that copies each row once more than the raw read.
- ``workers``: the shuffled loader, warm, with each of ``--workers`` DataLoader worker counts.
- with ``--device cuda``: the shuffled loader, warm, in page-locked memory, each batch copied
  to the GPU with ``non_blocking`` (the path ``fit`` takes), for each worker count: the rate a
  GPU is fed.
- training steps of two SAEs (quickstart size and the defaults) on random batches, in rows/s.

Peak memory is the growth of the process's peak RSS (``ru_maxrss``) over the pass, which counts
h5py's own buffers too; a worker's peak RSS is its whole resident memory (the interpreter and
torch included, ``RUSAGE_CHILDREN``). It prints a Markdown report to
paste into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine

DATA_CASES = ("raw", "ordered", "chunks", "shuffle")
"""The readers of the cache table, measured in this order: each reader in file order follows one in file
order, since a cold read in file order just after a process that read the file in random order was often
slower on the VM of docs/benchmarks.md (which the raw read, never placed there, did not pay)."""
TABLES = ("cache", "workers", "device", "training")
"""The report's tables: warm/cold readers, worker counts, the rate delivered to ``--device``, training."""
GATHER_ROWS = 262_144


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_file(path: Path, rows: int, d_in: int, chunk_rows: int, dtype: str) -> None:
    """A file of standard normal rows, unless ``path`` already holds one of this shape and dtype."""
    from lightning_sae.data import format

    if path.exists():
        with format.open_for_reading(path) as file:
            dataset = file.get(format.ACTIVATIONS)
            if dataset is not None and dataset.shape == (rows, d_in) and dataset.dtype == dtype:
                return
    rng = np.random.default_rng(0)
    with format.create(path, d_in=d_in, dtype=dtype, chunk_rows=chunk_rows) as file:
        for start in range(0, rows, 16 * chunk_rows):
            n = min(16 * chunk_rows, rows - start)
            format.append(file, rng.standard_normal((n, d_in), dtype=np.float32).astype(dtype))


def drop_from_page_cache(path: Path) -> None:
    """Evict ``path``'s pages from the page cache, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bring_into_page_cache(path: Path) -> None:
    """Read ``path`` once, so that the pass after it finds every page in the page cache (this
    machine's cache loses pages between runs without it)."""
    buffer = memoryview(bytearray(64 * 2**20))
    with open(path, "rb", buffering=0) as file:
        while file.readinto(buffer):
            pass


def measure_data(case: str, cold: bool, workers: int, device: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Time two passes of ``case`` over the file in this process, the page cache set up before
    each; rows, seconds of each pass and peak memory growth.

    The second pass is the steady state of a long run: the loader's window buffers exist, and
    first-touching fresh memory is slow on virtual machines (the host backs the page then).
    """
    import torch

    from lightning_sae.data.datamodule import ActivationDataModule, StreamLoader
    from lightning_sae.data.format import ACTIVATIONS, open_for_reading

    def prepare_page_cache() -> None:
        if cold:
            drop_from_page_cache(args.path)
        elif case != "gather":
            bring_into_page_cache(args.path)

    if case in ("raw", "chunks"):
        file = open_for_reading(args.path)
        dataset = file[ACTIVATIONS]
        if case == "raw":
            size = args.batch_size
            starts = list(range(0, dataset.shape[0] // size * size, size))
        else:
            size = dataset.chunks[0]
            starts = [size * int(i) for i in np.random.default_rng(0).permutation(dataset.shape[0] // size)]

        def one_pass() -> int:
            for start in starts:
                dataset[start : start + size]
            return len(starts) * size

    elif case == "gather":
        in_memory = np.random.default_rng(0).standard_normal((GATHER_ROWS, args.d_in), dtype=np.float32)
        in_memory = in_memory.astype(args.dtype)
        order = np.random.default_rng(1).permutation(GATHER_ROWS)

        def one_pass() -> int:
            for start in range(0, GATHER_ROWS, args.batch_size):
                np.take(in_memory, order[start : start + args.batch_size], axis=0)
            return GATHER_ROWS

    else:
        datamodule = ActivationDataModule(
            str(args.path),
            batch_size=args.batch_size,
            val_rows=0,
            shuffle=case == "shuffle",
            buffer_rows=args.buffer_rows,
            num_workers=workers,
        )
        datamodule.setup("fit")
        loader = StreamLoader(datamodule.train_stream, workers, pin_memory=device is not None)

        def one_pass() -> int:
            rows = 0
            for x, _ in loader:
                if device is not None:
                    x = x.to(device, non_blocking=True)
                rows += len(x)
            if device is not None:
                torch.cuda.synchronize()
            return rows

    before = peak_rss_bytes()
    seconds = []
    for _ in range(2):
        prepare_page_cache()
        start_time = time.perf_counter()
        count = one_pass()
        seconds.append(time.perf_counter() - start_time)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "rows": count,
        "seconds": seconds[1],
        "first_seconds": seconds[0],
        "peak_growth": peak_rss_bytes() - before,
        "worker_peak": children,
    }


def measure_training(
    d_in: int, d_sae: int, batch_size: int, quickstart: bool, steps: int, threads: int | None
) -> dict[str, Any]:
    """Rows/s of forward, loss, backward and Adam step of an SAE on random batches (no data loading).

    ``threads``: torch's intra-op threads (None: torch's default, one per core).
    """
    import torch

    from lightning_sae.encoders import JumpReLU, ReLU
    from lightning_sae.model import SparseAutoencoder
    from lightning_sae.penalties import PreAct, Tanh

    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
    if quickstart:  # configs/quickstart.yaml
        model = SparseAutoencoder(d_in, d_sae, encoder=JumpReLU, penalties=[Tanh(20.0, 4.0), PreAct(3e-6)])
    else:  # every default of SparseAutoencoder
        model = SparseAutoencoder(d_in, d_sae, encoder=ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.randn(batch_size, d_in)
    for step in range(steps + 1):
        if step == 1:  # the first step allocates Adam's state: leave it out
            start_time = time.perf_counter()
        total, _ = model.loss(model.forward_pass(x))
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start_time
    return {"rows": steps * batch_size, "seconds": seconds, "steps_per_s": steps / seconds}


def run_child(case: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    command = [sys.executable, __file__, *sys.argv[1:], "--case", case]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


DATA_NAMES = {
    "raw": "raw h5py, sequential slices",
    "chunks": "raw h5py, chunks in random order",
    "shuffle": "train loader, shuffle on",
    "ordered": "train loader, shuffle off",
}
TRAIN_CASES = {
    "quickstart": ("quickstart: d_in 64, d_sae 512, JumpReLU + Tanh + PreAct", 64, 512, 1024, True),
    "default": ("defaults: d_in {d_in}, d_sae 4096, ReLU", None, 4096, 4096, False),
}


def rate(run: dict[str, Any]) -> float:
    return run["rows"] / run["seconds"]


def median_rate(runs: list[dict[str, Any]], seconds: str = "seconds") -> float:
    """Median rows/s of ``runs``: of their second (steady) passes, or of ``first_seconds``."""
    return float(np.median([run["rows"] / run[seconds] for run in runs]))


def spread(runs: list[dict[str, Any]], reference: float) -> str:
    """Median ratio to ``reference`` and the lowest–highest ratio over the runs."""
    ratios = sorted(rate(run) / reference for run in runs)
    return f"{median_rate(runs) / reference:.0%} ({ratios[0]:.0%}–{ratios[-1]:.0%})"


def worker_counts(args: argparse.Namespace) -> list[int]:
    """The DataLoader worker counts of the workers and device tables: ``--workers`` and ``--num-workers``."""
    return sorted({args.num_workers, *args.workers})


def data_cases(args: argparse.Namespace) -> list[str]:
    """The loader measurements of one round, ``data:<case>:<warm|cold>:<workers>:<device or ->``, of the
    chosen ``--tables``; the warm raw read, every table's reference, always."""
    cases = [f"data:raw:warm:{args.num_workers}:-"]
    if "cache" in args.tables:
        cases += [f"data:{case}:{cache}:{args.num_workers}:-" for cache in ("warm", "cold") for case in DATA_CASES]
        cases.append("data:gather:warm:0:-")
    if "workers" in args.tables:
        cases += [f"data:shuffle:warm:{workers}:-" for workers in worker_counts(args)]
    if "device" in args.tables and args.device:
        cases += [f"data:shuffle:warm:{workers}:{args.device}" for workers in worker_counts(args)]
    if "training" in args.tables:  # its last column: the loader's rate over training's
        cases.append(f"data:shuffle:warm:{args.num_workers}:-")
    return list(dict.fromkeys(cases))


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], host: str) -> str:
    """The Markdown section: median rows/s over the repeats, ratio to the raw read with its spread,
    peak memory."""
    row_bytes = args.d_in * np.dtype(args.dtype).itemsize

    def line(label: str, key: str, reference: str, gigabytes: bool = False, with_workers: bool = False) -> str:
        runs = results[key]
        value = median_rate(runs)
        bandwidth = f"{value * row_bytes / 1e9:.2f}" if gigabytes else f"{value * row_bytes / 1e6:,.0f}"
        peak = max(run["peak_growth"] for run in runs) / 2**20
        first = median_rate(runs, "first_seconds") / median_rate(results[reference], "first_seconds")
        cells = [
            label,
            f"{value:,.0f}",
            bandwidth,
            spread(runs, median_rate(results[reference])),
            f"{first:.0%}",
            f"{peak:,.0f} MiB",
        ]
        if with_workers:
            worker_peak = max(run["worker_peak"] for run in runs) / 2**20
            cells.append(f"{worker_peak:,.0f} MiB" if key.split(":")[3] != "0" else "—")
        return "| " + " | ".join(cells) + " |"

    lines = [
        "## Data throughput",
        "",
        f"Machine: {host}.",
        "",
        (
            f"Data: {args.rows:,} rows × {args.d_in} {args.dtype} ({args.rows * row_bytes / 2**30:.2f} GiB), "
            f"chunks of {args.chunk_rows} rows; batch {args.batch_size}, shuffle buffer {args.buffer_rows:,} rows "
            f"({args.buffer_rows * row_bytes / 2**20:.0f} MiB), num_workers {args.num_workers}. "
            f"Median of {args.repeats} runs, the cases interleaved, each in a fresh process that makes two passes "
            "(the page cache set up before each) and times the second, the steady state of a long run; ratios "
            "are against the median raw read of the same page-cache state, with the lowest–highest ratio in "
            'brackets. "First pass": the first pass of a fresh process, window buffers allocated in it.'
        ),
        "",
        "```",
        f".venv/bin/python benchmarks/data_throughput.py {' '.join(sys.argv[1:])}",
        "```",
    ]
    warm_raw = f"data:raw:warm:{args.num_workers}:-"
    if "cache" in args.tables:
        lines += [
            "",
            "| page cache, reader | rows/s | MB/s | vs raw read | first pass vs raw | peak RSS growth |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for cache in ("warm", "cold"):
            for case in DATA_CASES:
                key = f"data:{case}:{cache}:{args.num_workers}:-"
                lines.append(line(f"{cache}, {DATA_NAMES[case]}", key, f"data:raw:{cache}:{args.num_workers}:-"))
        lines.append(line("in memory, random-row gather (`np.take`)", "data:gather:warm:0:-", warm_raw))
    else:
        reference = median_rate(results[warm_raw])
        gigabytes = reference * row_bytes / 1e9
        lines += ["", f"Reference, warm {DATA_NAMES['raw']}: {reference:,.0f} rows/s, {gigabytes:.2f} GB/s."]
    if "workers" in args.tables:
        lines += [
            "",
            "Workers (warm, shuffle on):",
            "",
            "| DataLoader workers | rows/s | MB/s | vs raw read | first pass vs raw "
            "| peak RSS growth | worker peak RSS |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for workers in worker_counts(args):
            key = f"data:shuffle:warm:{workers}:-"
            lines.append(line(str(workers), key, warm_raw, with_workers=True))
    if "device" in args.tables and args.device:
        lines += [
            "",
            f"Delivered to `{args.device}` (warm, shuffle on, page-locked batches, `non_blocking` copies):",
            "",
            "| DataLoader workers | rows/s | GB/s | vs raw read | first pass vs raw "
            "| peak RSS growth | worker peak RSS |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for workers in worker_counts(args):
            key = f"data:shuffle:warm:{workers}:{args.device}"
            lines.append(line(str(workers), key, warm_raw, gigabytes=True, with_workers=True))
    if "training" not in args.tables:
        return "\n".join(lines)
    lines += [
        "",
        "What training consumes (forward, loss, backward, Adam step on random batches, no loading):",
        "",
        "| model | batch | torch threads | steps/s | rows/s | loader (warm, shuffle on) / training |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    shuffled = median_rate(results[f"data:shuffle:warm:{args.num_workers}:-"])
    for name, (label, _, _, batch, _) in TRAIN_CASES.items():
        for threads in ("default", "1"):
            run = results[f"train:{name}:{threads}"][0]
            lines.append(
                f"| {label.format(d_in=args.d_in)} | {batch} | {threads} | {run['steps_per_s']:.2f} | "
                f"{rate(run):,.0f} | {shuffled / rate(run):,.0f}× |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, default=Path("/tmp/lightning_sae_throughput.h5"))
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--buffer-rows", type=int, default=262_144)
    parser.add_argument("--num-workers", type=int, default=0, help="workers of the warm/cold table")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2, 4, 8], help="worker counts of the scaling table"
    )
    parser.add_argument("--device", help="also measure the rate delivered to this device (e.g. cuda)")
    parser.add_argument(
        "--tables",
        nargs="*",
        choices=TABLES,
        default=list(TABLES),
        help="tables to measure (each case is a fresh process; on a GPU host, 'device' alone fits a short call)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps of the default-size SAE")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "device" in args.tables and args.tables != list(TABLES) and not args.device:
        parser.error("--tables device needs --device")
    if args.case is not None:
        kind, *fields = args.case.split(":")
        if kind == "data":
            case, cache, workers, device = fields
            result = measure_data(case, cache == "cold", int(workers), None if device == "-" else device, args)
        else:
            name, variant = fields
            _, d_in, d_sae, batch, quickstart = TRAIN_CASES[name]
            steps = 100 if quickstart else args.train_steps
            threads = None if variant == "default" else int(variant)
            result = measure_training(d_in or args.d_in, d_sae, batch, quickstart, steps, threads)
        print(json.dumps(result))
        return
    host = machine()
    write_file(args.path, args.rows, args.d_in, args.chunk_rows, args.dtype)
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()

    def measure(case: str) -> dict[str, Any]:
        """One fresh-process measurement, its rate reported on stderr as it ends (a run cut short
        still shows what it measured)."""
        result = run_child(case)
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:.0f} s] {case}: {rate(result):,.0f} rows/s", file=sys.stderr, flush=True)
        return result

    for _ in range(args.repeats):
        for case in data_cases(args):
            results.setdefault(case, []).append(measure(case))
    if "training" in args.tables:
        for name in TRAIN_CASES:
            for threads in ("default", "1"):
                results[f"train:{name}:{threads}"] = [measure(f"train:{name}:{threads}")]
    print(report(args, results, host))
    print(f"\nload average at the end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
