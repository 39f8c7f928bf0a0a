"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    """CPU model, cores and memory of this machine, and its load when the run started."""
    return f"{hardware()}; load average {load_average()}"


def hardware() -> str:
    """CPU model, cores and memory of this machine, and its GPU when torch sees one."""
    with open("/proc/cpuinfo") as cpuinfo:
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    with open("/proc/meminfo") as meminfo:
        kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    described = f"{model}, {os.cpu_count()} CPU cores, {kib / 2**20:.1f} GiB RAM, {platform.system()}"
    return f"{described}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else described


def load_average() -> str:
    """The 1, 5 and 15-minute load averages now."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())
