"""Throughput helpers: FLOPs per step, the measured dense compute peak, MFU, machine description,
and timed choices between equivalent ways of computing the same thing (cached per device).

MFU has one definition, used by `bench/step_throughput.py` and the loop's `perf/mfu`:

    MFU = model FLOPs of one training step / step time / dense compute peak

where the FLOPs are those of forward + backward of the method's loss on the step's batch, as
counted by torch's FlopCounterMode (`step_flops`), and the peak is the throughput of the faster
of two dense kernels, a (1024 x 1024) @ (1024 x 1024) matmul and a 3 x 3 convolution,
*in the compute dtype of the precision in use* (bfloat16 under bf16-mixed), measured by the same
process with the same threads close in time to the steps (`dense_peak_flops`), because the
machine's load moves both.

`timed_choice` runs interchangeable candidates interleaved over several rounds, caches the
per-candidate medians under a key that names the device (and whatever else matters), and
decides from the cached numbers alone: given its cache entry, a choice is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = ("fp32", "bf16-mixed")
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.1  # bf16-mixed must beat fp32 by this factor to be picked by `auto`


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def dense_kernels(
    device: torch.device | str, dtype: torch.dtype, n: int = 1024
) -> dict[str, tuple[Callable[[], torch.Tensor], float]]:
    """Dense compute kernels in `dtype` and their FLOPs: an (n x n) @ (n x n) matmul (the BLAS on
    CPU) and a 3 x 3 convolution, 256 -> 256 channels on 4 maps of 28 x 28 (oneDNN on CPU; the
    layer shape of the 224 px Trifeatures encoder). Convolutions are matmuls over im2col patches,
    and on some CPUs the convolution library is the faster one: on a 2-core AMD EPYC this
    convolution ran at 213-230 GFLOP/s in fp32 against 152-179 for the matmul (bf16: 414-463
    against 378-416), and a matmul-only peak read MFU 1.2 for the conv-heavy 224 px step."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    x = torch.randn(4, 256, 28, 28, device=device).to(dtype)
    w = torch.randn(256, 256, 3, 3, device=device).to(dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    return {
        "matmul": (lambda: a @ b, 2.0 * n**3),
        "conv3x3": (lambda: F.conv2d(x, w, None, 1, 1), 2.0 * 4 * 256 * 256 * 9 * 28 * 28),
    }


def dense_peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 1024,
    reps: int = 3,
) -> float:
    """Dense compute throughput (FLOP/s) of this process's threads on `device` in `dtype`, now:
    the fastest of `reps` timed runs of each of the `dense_kernels`, interleaved, after one
    warm-up of each. Not cached: call it between the steps it is compared with."""
    kernels = dense_kernels(device, dtype, n)
    for fn, _ in kernels.values():
        fn()
    best = 0.0
    for _ in range(reps):
        for fn, flops in kernels.values():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = max(best, flops / (time.perf_counter() - t0))
    return best


class PeakBudget:
    """The dense compute peak of a training loop's MFU, re-measured between epochs for at most
    `share` of the run's time: a measurement (`measure(dtype)`) is taken again once `1 / share`
    times its own duration has passed since the last, or when the dtype changes, and reused
    until then. It takes 0.07-0.13 s on two CPU threads, 0.13-0.25 s on one (bf16-fp32)."""

    def __init__(
        self,
        measure: Callable[[torch.dtype], float],
        share: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.measure, self.share, self.clock = measure, share, clock
        self.dtype: torch.dtype | None = None
        self.value = 0.0
        self.taken_at = 0.0
        self.cost = 0.0

    def peak(self, dtype: torch.dtype) -> float:
        start = self.clock()
        if dtype == self.dtype and start - self.taken_at < self.cost / self.share:
            return self.value
        self.value = self.measure(dtype)
        self.dtype, self.taken_at = dtype, self.clock()
        self.cost = self.taken_at - start
        return self.value


def mfu(flops_per_step: float, step_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation (see the module docstring): `flops_per_step` from `step_flops`,
    `peak_flops` from `dense_peak_flops` in the compute dtype, per worker."""
    return flops_per_step / step_s / peak_flops


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs (matmul/conv/attention, as counted by torch) of everything `fn` runs, backward included."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def step_flops(method: nn.Module, view_a: Any, view_b: Any) -> float:
    """FLOPs of one training step's forward + backward of `method.loss(view_a, view_b)`,
    counted on a copy so that the method's BatchNorm statistics and gradients are untouched
    (local loss, no gathered negatives; the same count under autocast)."""
    probe = copy.deepcopy(method)
    return count_flops(lambda: probe.loss(view_a, view_b).loss.backward())  # type: ignore[operator]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved precision (`fp32` or `bf16-mixed`)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be one of {PRECISIONS} once resolved, got '{precision}'")
    return contextlib.nullcontext()


# ---------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (AVX-512 with or without BF16, AMX, Arm BF16). Without
    it torch runs bf16 convolutions through reference kernels: on a 2-core AVX2 EPYC, a bf16
    Trifeatures step took 9x as long as an fp32 one at 64 px (2.4 vs 0.27 s) and 16x at 224 px
    (134 vs 8 s), so `auto`'s timing alone would cost minutes there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an unknown build: let the measurement decide
        return True


NO_NATIVE_BF16 = "this CPU has no native bf16 (torch's fallback kernels are many times slower)"


def bf16_is_emulated(device: torch.device) -> bool:
    """Whether bf16 on `device` runs through fallback kernels: a CPU without native bf16."""
    return device.type == "cpu" and not cpu_has_native_bf16()


def machine_info() -> dict[str, object]:
    """What a benchmark ran on, for its JSON: CPU and its bf16-relevant flags, GPU, threads,
    versions, and the load average when it was called (other processes share the machine)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": load,
    }


def device_key(device: torch.device | str) -> str:
    """What a speed measurement depends on: the device model, threads and torch version."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{device.type}:{name}|threads={torch.get_num_threads()}|torch={torch.__version__}"


# ---------------------------------------------------------------- timed choices, cached
def cache_path() -> Path:
    """Where measured choices are kept: $COMMLAB_PERF_CACHE, else ~/.cache/commlab/perf.json."""
    env = os.environ.get("COMMLAB_PERF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "commlab" / "perf.json"


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry, re-reading the file first (other processes may have added theirs) and
    replacing it atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".perf-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call of each per round (so load swings hit all
    of them alike)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def decide(seconds: Mapping[str, float], default: str, margin: float = 1.0) -> str:
    """The fastest candidate; `default` unless another is at least `margin` times faster."""
    best = min(seconds, key=lambda k: (seconds[k], k != default))
    return best if seconds[default] >= margin * seconds[best] else default


def timed_choice(
    key: str,
    candidates: Mapping[str, Callable[[], object]],
    default: str,
    margin: float = 1.0,
    rounds: int = 5,
    path: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """Pick among interchangeable `candidates` by their time, measured once per `key` and
    cached (`cache_path()`); returns (choice, cache entry). The decision uses each candidate's
    fastest round (`seconds`; the round least disturbed by other processes on a shared
    machine, where medians swing with the load); medians and maxima are kept for the record.
    With an entry cached for `key` nothing runs and the choice follows from it alone."""
    path = path or cache_path()
    entry = _load_cache(path).get(key)
    if not (isinstance(entry, dict) and set(candidates) <= set(entry.get("seconds", {}))):
        times = time_interleaved(candidates, rounds=rounds)
        entry = {
            "seconds": {k: min(v) for k, v in times.items()},
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "max_s": {k: max(v) for k, v in times.items()},
            "rounds": rounds,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average_1_5_15": machine_info()["load_average_1_5_15"],
        }
        _store(path, key, entry)
    seconds = {k: float(entry["seconds"][k]) for k in candidates}
    return decide(seconds, default, margin), entry


def choose_step_precision(
    method: nn.Module,
    view_a: Any,
    view_b: Any,
    device: torch.device,
    signature: str,
    rounds: int = 3,
    path: Path | None = None,
    local_copy: Callable[[nn.Module], nn.Module] = copy.deepcopy,
) -> tuple[str, dict[str, Any]]:
    """`train.precision: auto`: bf16-mixed where this model's own training step (forward +
    backward of `method.loss(view_a, view_b)`) runs at least `BF16_MIN_SPEEDUP` times faster
    than in fp32 on this device, else fp32 (without measuring on a CPU with no native bf16).
    Measured once per device and model `signature`
    (architecture and input shapes), cached: no device-wide answer exists (on a CPU with AMX,
    bf16 runs the 224 px Trifeatures step 4x faster and the 64 px one no faster).

    The step runs in training mode (dropout and batch statistics cost what they cost in
    training) on `local_copy(method)`, so the method's BatchNorm statistics and gradients stay
    untouched; the caller's copy must not communicate (the other workers do not measure). The
    caller keeps its random streams apart (dropout draws here)."""
    if bf16_is_emulated(device):  # timing bf16 alone would take minutes
        return "fp32", {"seconds": {}, "reason": NO_NATIVE_BF16}
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", {"seconds": {}, "reason": "no bf16 support on this GPU"}
    if device.type not in ("cpu", "cuda"):
        return "fp32", {"seconds": {}, "reason": f"no bf16 measurement for {device.type}"}
    copies: list[nn.Module] = []  # made on the first timed call: nothing to copy when cached

    def step(precision: str) -> Callable[[], None]:
        def run() -> None:
            if not copies:
                copies.append(local_copy(method).train())
            probe = copies[0]
            with autocast(device, precision):
                out = probe.loss(view_a, view_b)  # type: ignore[operator]
            out.loss.float().backward()
            probe.zero_grad(set_to_none=True)
            _sync(device)

        return run

    return timed_choice(
        f"precision-train|{device_key(device)}|{signature}",
        {p: step(p) for p in PRECISIONS},
        default="fp32",
        margin=BF16_MIN_SPEEDUP,
        rounds=rounds,
        path=path,
    )
