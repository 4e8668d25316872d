"""Speed and MFU of one CoMM training step per speed setting, and packed vs sequential fusion.

Models: the Trifeatures CoMM model (configs/trifeatures/comm.yaml) at 64 px, the paper's 224 px
one (configs/trifeatures/comm-224.yaml), and the MOSI one (configs/mosi/comm.yaml; 50-step vision
(20-d) and text (300-d) sequences). Each step runs forward, backward and the optimiser on two
pre-made views (augmentation is not timed).

Settings, timed interleaved (one step of each per round, so the machine's load hits all alike):
  baseline     commlab before this bench's speed work: fp32, eager, one fusion forward per mask
               (sequential), its last block on every token (as the paper's code; commlab now
               computes only the CLS outputs there, `FusionTransformer.cls_only_last`),
               contiguous (NCHW) convs, AdamW's per-parameter loop, torch's own
               TransformerEncoderLayer (its Bernoulli dropout) in sequence encoders
  packed       the baseline with the packed one-forward fusion
  auto         what `train.precision=auto, train.fusion=auto` (and the defaults channels_last,
               fused AdamW) pick on this machine, as PretrainRun resolves them
  bf16-mixed   auto's settings with bf16 autocast forced
  compiled     auto's settings with `train.compile: heads`: the fusion passes and projection head
               compiled, the encoders eager (--compile CASES; compile time reported)
  compiled-all auto's settings with `train.compile: all`: the whole forward compiled
The fusion alone (forward + backward of the n_mod+1 masked passes) is timed both ways too.

MFU (commlab.perf): the setting's own step FLOPs (forward + backward, FlopCounterMode; fewer than
the baseline's with the CLS-only last fusion block) / step time / dense compute peak of its
dtype (the faster of a matmul and a 3 x 3 convolution); the fp32 and bf16 peaks are re-measured
in every round, between the steps. Medians with min-max over rounds; machine, threads and load
average recorded.

    python bench/step_throughput.py [--rounds 5] [--threads 2] [--cases tri64,tri224,mosi] [--compile tri64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from commlab.augment import build_augmenter
from commlab.config import ExperimentConfig, load_config
from commlab.data.base import Batch
from commlab.models import build_method
from commlab.models.dropout import EncoderLayer
from commlab.perf import (
    COMPUTE_DTYPE,
    autocast,
    dense_peak_flops,
    device_key,
    machine_info,
    step_flops,
    timed_choice,
)
from commlab.train.loop import has_conv, make_optimizer, param_groups, resolve_precision

CASES: dict[str, tuple[str, list[str], list[tuple[int, ...]]]] = {
    "trifeatures_64px": (
        "configs/trifeatures/comm.yaml",
        ["data.params.size=64", "data.batch_size=64"],
        [(3, 64, 64), (3, 64, 64)],
    ),
    "trifeatures_224px": (
        "configs/trifeatures/comm-224.yaml",
        ["data.batch_size=16"],
        [(3, 224, 224), (3, 224, 224)],
    ),
    "mosi": ("configs/mosi/comm.yaml", ["data.batch_size=32"], [(50, 20), (50, 300)]),
}
ALIASES = {"tri64": "trifeatures_64px", "tri224": "trifeatures_224px", "mosi": "mosi"}


def make_views(cfg: ExperimentConfig, shapes: list[tuple[int, ...]]) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(0)
    b = cfg.data.batch_size
    xs = [
        torch.randint(0, 256, (b, *s), generator=g, dtype=torch.uint8)
        if len(s) == 3
        else torch.randn(b, *s, generator=g)
        for s in shapes
    ]
    kinds = [m.kind for m in cfg.augment.modalities]
    aug = build_augmenter(cfg.augment, kinds)
    batch = Batch(xs=xs, pad=[None] * len(xs))
    return aug(batch, g), aug(batch, g)


class Setting:
    """One way of running the same step: model copy, optimiser, precision, fusion path."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        shapes: list[tuple[int, ...]],
        views: tuple[Batch, Batch],
        *,
        precision: str,
        fusion: str,
        channels_last: bool,
        fused_adamw: bool,
        compile: str = "off",
        torch_layers: bool = False,
        cls_only_last: bool = True,
    ) -> None:
        torch.manual_seed(0)
        self.method = build_method(cfg, shapes)
        fusion_module = getattr(self.method, "fusion", None)
        if fusion_module is not None:  # False: the last fusion block on every token
            fusion_module.cls_only_last = cls_only_last
        if torch_layers:  # the same parameters, torch's own forward (and dropout)
            for m in self.method.modules():
                if isinstance(m, EncoderLayer):
                    m.__class__ = torch.nn.TransformerEncoderLayer
        if channels_last and has_conv(self.method):
            self.method.to(memory_format=torch.channels_last)
        self.method.fusion_path = fusion
        groups = param_groups(self.method, cfg.optim.weight_decay)
        self.opt = (
            make_optimizer(groups, cfg)
            if fused_adamw
            else torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)
        )
        self.precision = precision
        self.views = views
        self.describe = {
            "precision": precision,
            "fusion": fusion,
            "channels_last": channels_last,
            "fused_adamw": fused_adamw,
            "compile": compile,
            "cheap_dropout": not torch_layers,
            "cls_only_last": cls_only_last,
        }
        self.compile_s = None
        if compile != "off":
            self.method.compile_step(compile)
            t0 = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - t0

    def step(self) -> None:
        va, vb = self.views
        with autocast(torch.device("cpu"), self.precision):
            out = self.method(va, vb)  # __call__: the compiled forward when compiled
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()


def auto_settings(
    cfg: ExperimentConfig, shapes: list[tuple[int, ...]], views: tuple[Batch, Batch]
) -> tuple[str, str, dict[str, Any]]:
    """(precision, fusion, notes) as PretrainRun resolves `auto` for this model and batch."""
    device = torch.device("cpu")
    probe = build_method(cfg, shapes)
    if cfg.train.channels_last and has_conv(probe):
        probe.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    auto = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "auto"})})
    precision, why = resolve_precision(probe, auto, device, *views)
    options = probe.fusion_options(*views)

    def timed(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, precision):
                out = fn()
            out.backward()

        return run

    shape_key = ",".join(str(tuple(x.shape)) for x in views[0].xs)
    key = f"fusion|{device_key(device)}|{precision}|{probe.fusion_signature()}|{shape_key}"
    fusion, entry = timed_choice(key, {k: timed(f) for k, f in options.items()}, "packed")
    return precision, fusion, {"precision_reason": why, "fusion_measurement": entry}


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_case(name: str, rounds: int, with_compile: bool, with_bf16: bool = True) -> dict[str, Any]:
    path, overrides, shapes = CASES[name]
    cfg = load_config(path, [*overrides, "train.precision=fp32"])
    views = make_views(cfg, shapes)
    precision, fusion, notes = auto_settings(cfg, shapes, views)
    base = {
        "channels_last": False,
        "fused_adamw": False,
        "torch_layers": True,
        "cls_only_last": False,
    }
    best = {"channels_last": True, "fused_adamw": True}
    settings = {
        "baseline": Setting(cfg, shapes, views, precision="fp32", fusion="sequential", **base),
        "packed": Setting(cfg, shapes, views, precision="fp32", fusion="packed", **base),
        "auto": Setting(cfg, shapes, views, precision=precision, fusion=fusion, **best),
    }
    if with_bf16:
        settings["bf16-mixed"] = Setting(
            cfg, shapes, views, precision="bf16-mixed", fusion=fusion, **best
        )
    if with_compile:
        for row, scope in (("compiled", "heads"), ("compiled-all", "all")):
            settings[row] = Setting(
                cfg, shapes, views, precision=precision, fusion=fusion, compile=scope, **best
            )
    # each setting's own FLOPs (the CLS-only last fusion block does less work than the
    # baseline's); compiled settings do auto's
    flops_of = {
        k: step_flops(s.method, *views)
        for k, s in settings.items()
        if s.describe["compile"] == "off"
    }
    flops = flops_of["baseline"]
    fusion_only = settings["baseline"].method.fusion_options(*views)
    for s in settings.values():  # warm-up (oneDNN primitive caches, allocator)
        s.step()
    times: dict[str, list[float]] = {k: [] for k in settings}
    fusion_times: dict[str, list[float]] = {k: [] for k in fusion_only}
    peaks: dict[str, list[float]] = {p: [] for p in COMPUTE_DTYPE}
    loads = []
    for r in range(rounds):
        for p, dtype in COMPUTE_DTYPE.items():
            peaks[p].append(dense_peak_flops("cpu", dtype))
        for k, s in settings.items():
            t0 = time.perf_counter()
            s.step()
            times[k].append(time.perf_counter() - t0)
        for k, fn in fusion_only.items():
            t0 = time.perf_counter()
            fn().backward()
            fusion_times[k].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
        print(f"  {name} round {r + 1}/{rounds}: load {loads[-1]:.1f}", flush=True)
    base_med = statistics.median(times["baseline"])
    out: dict[str, Any] = {
        "case": name,
        "config": path,
        "overrides": overrides,
        "batch_per_view": cfg.data.batch_size,
        "flops_per_step": flops,
        "params": sum(p.numel() for p in settings["baseline"].method.parameters()),
        "auto_picked": {"precision": precision, "fusion": fusion, **notes},
        "peak_flops": {p: summary(v) for p, v in peaks.items()},
        "load_average_1min_per_round": loads,
        "settings": {},
        "fusion_only_s": {k: summary(v) for k, v in fusion_times.items()},
    }
    for k, s in settings.items():
        dtype_peak = peaks[s.precision]
        f = flops_of.get(k, flops_of["auto"])
        per_round_mfu = [f / t / p for t, p in zip(times[k], dtype_peak, strict=True)]
        med = statistics.median(times[k])
        out["settings"][k] = {
            **s.describe,
            "step_s": summary(times[k]),
            "samples_per_s": cfg.data.batch_size / med,
            "speedup_vs_baseline": base_med / med,
            "speedup_vs_baseline_per_round": [
                b / t for b, t in zip(times["baseline"], times[k], strict=True)
            ],
            "flops_per_step": f,
            "mfu": summary(per_round_mfu),
            "compile_s": s.compile_s,
        }
    f = out["fusion_only_s"]
    out["fusion_packed_speedup"] = f["sequential"]["median"] / f["packed"]["median"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--cases", default="tri64,tri224,mosi")
    ap.add_argument("--compile", default="", help="cases to also time under torch.compile")
    ap.add_argument("--bf16", default="all", help="cases to time bf16-mixed in (all or a list)")
    ap.add_argument("--out", default="bench/results/step_throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    t0 = time.perf_counter()
    compiled = {ALIASES.get(c, c) for c in args.compile.split(",") if c}
    cases = [ALIASES.get(c, c) for c in args.cases.split(",")]
    bf16 = set(cases) if args.bf16 == "all" else {ALIASES.get(c, c) for c in args.bf16.split(",")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for c in cases:  # the JSON is rewritten after every case: a long run keeps what it measured
        results.append(run_case(c, args.rounds, c in compiled, c in bf16))
        write(out, machine, args.rounds, time.perf_counter() - t0, results)
    print(
        f"\n{machine['cpu']}, {torch.get_num_threads()} threads, load {machine_info()['load_average_1_5_15']}"
    )
    print(f"{'case':<19}{'setting':<12}{'step ms (min-max)':>24}{'x baseline':>11}{'MFU':>7}")
    for r in results:
        for k, s in r["settings"].items():
            st = s["step_s"]
            rng = f"{st['median'] * 1e3:.0f} ({st['min'] * 1e3:.0f}-{st['max'] * 1e3:.0f})"
            print(
                f"{r['case']:<19}{k:<12}{rng:>24}{s['speedup_vs_baseline']:>11.2f}"
                f"{s['mfu']['median']:>7.2f}"
            )
        print(
            f"{r['case']:<19}auto picked {r['auto_picked']['precision']}, fusion "
            f"{r['auto_picked']['fusion']}; fusion alone packed x{r['fusion_packed_speedup']:.2f}"
        )
    print(f"wrote {out}")


def write(out: Path, machine: dict[str, Any], rounds: int, wall: float, results: list) -> None:
    doc = {
        "machine": machine,
        "machine_at_end": machine_info(),
        "rounds": rounds,
        "wall_s": wall,
        "mfu_definition": "the setting's step FLOPs (fwd+bwd, FlopCounterMode) / step time / dense compute "
        "peak of the compute dtype (faster of a 1024^3 matmul and a 3x3 conv), peaks re-measured "
        "every round",
        "results": results,
    }
    out.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
