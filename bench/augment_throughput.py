"""Image augmentation speed: commlab's SimCLR recipe against the same recipe on kornia's kernels.

The reference swaps five of `commlab.augment.image`'s functions back to the straightforward
versions they replaced: the hue shift through kornia's `adjust_hue` (its HSV round trip), crops
through kornia's `crop_and_resize` (a perspective transform solved per image), the colour blends
as torchvision writes them (factor * a + (1 - factor) * b over full-size operands), and every
random op applied to the whole batch with the unchosen images put back by `torch.where`.
Everything else (the random draws, kornia's grayscale and blur kernels, normalisation) is
shared, so both produce the same views up to float rounding (the largest difference is
reported).

Two measurements, each interleaved in this process (reference and commlab alternate, one call
or one epoch each per round; medians with min-max of the per-round ratios):
  augment   one augmenter call on a config's batch of uint8 images (one modality, one view),
            for the smoke config (32 px), the CPU Trifeatures config (48 px) and the paper's
            224 px one
  epoch     training throughput (the loop's samples/s: views + step) of a real PretrainRun on
            generated Trifeatures, reference and commlab augmentation in alternate epochs

    python bench/augment_throughput.py [--rounds 10] [--epoch-rounds 4] [--out ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from kornia.enhance import adjust_hue
from kornia.geometry.transform import crop_and_resize as kornia_crop_and_resize

import commlab.augment.image as image_aug
from commlab.config import ImageAugmentConfig, load_config
from commlab.perf import machine_info
from commlab.train.loop import PretrainRun

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "smoke_32px": "configs/trifeatures/smoke.yaml",
    "trifeatures_48px": "configs/trifeatures/comm.yaml",
    "trifeatures_224px": "configs/trifeatures/comm-224.yaml",
}
EPOCH_CASES = ("smoke_32px", "trifeatures_48px")


# ---------------------------------------------------------------- the reference kernels
def _hue_kornia(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    return adjust_hue(x, turns * (2 * math.pi))


def _crop_kornia(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return kornia_crop_and_resize(x, boxes, size, align_corners=True)


def _blend_torchvision(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b.expand_as(a)).clamp(0.0, 1.0)


def _keep_unchosen_where(apply: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(apply.view(-1, 1, 1, 1), out, x)


def _on_all_then_where(
    apply: torch.Tensor, x: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    everyone = torch.arange(x.shape[0], device=x.device)
    return torch.where(apply.view(-1, 1, 1, 1), fn(x, everyone), x)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    swaps = {
        "shift_hue": _hue_kornia,
        "crop_and_resize": _crop_kornia,
        "_blend": _blend_torchvision,
        "_keep_unchosen": _keep_unchosen_where,
        "_on_chosen": _on_all_then_where,
    }
    saved = {name: getattr(image_aug, name) for name in swaps}
    for name, fn in swaps.items():
        setattr(image_aug, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(image_aug, name, fn)


# ---------------------------------------------------------------- measurements
def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def interleaved(fn: Callable[[int], float], rounds: int) -> dict[str, Any]:
    """fn(round) -> seconds (or a rate), run under the reference kernels and commlab's in turn."""
    ref: list[float] = []
    new: list[float] = []
    for r in range(rounds):
        with reference_kernels():
            ref.append(fn(r))
        new.append(fn(r))
    return {"reference": ref, "commlab": new}


def augment_case(name: str, rounds: int) -> dict[str, Any]:
    cfg = load_config(REPO / CONFIGS[name])
    aug_cfg = cfg.augment.modalities[0]
    assert isinstance(aug_cfg, ImageAugmentConfig)
    aug = image_aug.ImageAugmenter(aug_cfg)
    size = int(cfg.data.params.get("size", 224))
    batch = cfg.data.batch_size
    x = torch.randint(
        0,
        256,
        (batch, 3, size, size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )

    def call(r: int) -> float:
        t0 = time.perf_counter()
        aug(x, None, torch.Generator().manual_seed(r))
        return time.perf_counter() - t0

    for r in range(2):  # warm-up
        call(r)
        with reference_kernels():
            call(r)
    with reference_kernels():
        ref_out = aug(x, None, torch.Generator().manual_seed(7))
    diff = float((aug(x, None, torch.Generator().manual_seed(7)) - ref_out).abs().max())
    t = interleaved(call, rounds)
    ratios = [a / b for a, b in zip(t["reference"], t["commlab"], strict=True)]
    return {
        "case": name,
        "config": CONFIGS[name],
        "batch": batch,
        "size": size,
        "augment": aug_cfg.model_dump(),
        "reference_ms": summary([s * 1e3 for s in t["reference"]]),
        "commlab_ms": summary([s * 1e3 for s in t["commlab"]]),
        "speedup": summary(ratios),
        "max_abs_difference_normalised": diff,
    }


def epoch_case(name: str, rounds: int, data_root: Path) -> dict[str, Any]:
    cfg = load_config(
        REPO / CONFIGS[name],
        [
            f"data.path={data_root / name}",
            "data.params.pairs=2048",
            "data.params.test_pairs=256",
            "train.device=cpu",
            "train.precision=auto",
            "train.probe_every=0",
            f"train.epochs={2 * rounds + 1}",
        ],
    )
    run = PretrainRun(cfg)
    run.run_epoch(0)  # first batch: auto choices, oneDNN caches
    epoch = iter(range(1, 2 * rounds + 1))

    def one(_: int) -> float:
        return float(run.run_epoch(next(epoch))["perf/samples_per_s"])

    rates = interleaved(one, rounds)
    ratios = [b / a for a, b in zip(rates["reference"], rates["commlab"], strict=True)]
    return {
        "case": name,
        "config": CONFIGS[name],
        "steps_per_epoch": run.steps_per_epoch,
        "settings": run.settings_note,
        "reference_samples_per_s": summary(rates["reference"]),
        "commlab_samples_per_s": summary(rates["commlab"]),
        "speedup": summary(ratios),
    }


def print_table(
    title: str,
    headers: tuple[str, str],
    rows: list[dict[str, Any]],
    keys: tuple[str, str],
    digits: int,
    with_diff: bool = False,
) -> None:
    """One line per case: the reference's and commlab's medians (`keys`), the speed-up with its
    range and, `with_diff`, the largest output difference."""
    diff_head = f"{'max diff':>10}" if with_diff else ""
    print(f"{title:<20}{headers[0]:>14}{headers[1]:>12}{'x (min-max)':>20}{diff_head}")
    for r in rows:
        s = r["speedup"]
        line = (
            f"{r['case']:<20}{r[keys[0]]['median']:>14.{digits}f}{r[keys[1]]['median']:>12.{digits}f}"
            f"{s['median']:>8.2f} ({s['min']:.2f}-{s['max']:.2f})"
        )
        if with_diff:
            line += f"{r['max_abs_difference_normalised']:>10.1e}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds per augment case")
    ap.add_argument("--epoch-rounds", type=int, default=4, help="epochs of each, interleaved")
    ap.add_argument("--cases", default=",".join(CONFIGS))
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "augment_throughput.json"
    )
    args = ap.parse_args()
    cases = args.cases.split(",")
    doc: dict[str, Any] = {"machine": machine_info(), "augment": [], "epoch": []}
    for c in cases:
        print(f"augment {c} ...", flush=True)
        doc["augment"].append(augment_case(c, args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        for c in (c for c in EPOCH_CASES if c in cases):
            print(f"epoch {c} ...", flush=True)
            doc["epoch"].append(epoch_case(c, args.epoch_rounds, Path(tmp)))
    doc["machine_at_end"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    m = doc["machine"]
    print(
        f"\n{m['cpu']}, {m['torch_threads']} threads, load {doc['machine_at_end']['load_average_1_5_15']}"
    )
    print_table(
        "augment (one call)",
        ("reference ms", "commlab ms"),
        doc["augment"],
        ("reference_ms", "commlab_ms"),
        digits=1,
        with_diff=True,
    )
    print_table(
        "epoch (samples/s)",
        ("reference", "commlab"),
        doc["epoch"],
        ("reference_samples_per_s", "commlab_samples_per_s"),
        digits=0,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
