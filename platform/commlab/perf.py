"""Throughput helpers: model FLOPs per step and the machine's measured matmul peak (for MFU)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


@lru_cache(maxsize=4)
def matmul_peak_flops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024
) -> float:
    """Measured dense matmul throughput (FLOP/s) of this process's threads on `device`.

    The best of several timed (n x n) @ (n x n) products; MFU = achieved model FLOP/s / this.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * n**3 / best


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs (matmul/conv/attention, as counted by torch) of everything `fn` runs, backward included."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def machine_info() -> dict[str, object]:
    """What a benchmark ran on, for its JSON."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
