"""Gathered against dense decoding of k features per row: where is each faster?

Usage::

    .venv/bin/python benchmarks/decoding.py                                  # CPU, float32
    python benchmarks/decoding.py --device cuda --d-out 768 --rows 4096 --precision bf16-mixed

Times one forward and backward pass (gradients for the values and W_dec, as in training) of
``lightning_sae.decoding.gather_decode`` and ``dense_decode`` for every (k, m) of the grid and
prints a Markdown table with the ratio dense ÷ gathered: ``decoding="auto"`` should gather where
it is above 1 (``GATHER_BELOW_K_OVER_M``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from machine import machine
from torch import Tensor

from lightning_sae.decoding import GATHER_BELOW_K_OVER_M, dense_decode, gather_decode


def seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``run`` over ``repeats`` timed calls after two untimed ones."""
    times = []
    for index in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step(decode: Callable[[Tensor, Tensor, Tensor], Tensor], values: Tensor, indices: Tensor, weight: Tensor,
         autocast: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.autocast(values.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = decode(values, indices, weight)
        torch.autograd.grad(out.float().square().sum(), (values, weight))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="*", default=[8, 32, 128, 512])
    parser.add_argument("--ms", type=int, nargs="*", default=[4096, 16384, 65536])
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    autocast = args.precision == "bf16-mixed"
    host = machine() + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    lines = [
        f"Machine: {host}. {args.rows} rows, d_out {args.d_out}, {args.precision}; milliseconds per forward "
        f"and backward. `decoding='auto'` gathers where k/m ≤ {GATHER_BELOW_K_OVER_M.get(device.type)}.",
        "",
        "| k | m | k/m | dense ms | gathered ms | dense ÷ gathered |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for m in args.ms:
        weight = torch.randn(m, args.d_out, device=device, requires_grad=True)
        for k in args.ks:
            if k > m:
                continue
            values = torch.rand(args.rows, k, device=device)
            values = (values.bfloat16() if autocast else values).requires_grad_()
            indices = torch.rand(args.rows, m, device=device).topk(k, dim=-1).indices
            dense = seconds(step(dense_decode, values, indices, weight, autocast), device, args.repeats)
            gathered = seconds(step(gather_decode, values, indices, weight, autocast), device, args.repeats)
            lines.append(
                f"| {k} | {m} | {k / m:.4f} | {1e3 * dense:.2f} | {1e3 * gathered:.2f} | {dense / gathered:.2f} |"
            )
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
