"""Throughput and MFU of one CoMM training step, and batched vs sequential mask fusion.

Cases: (a) two image modalities at 64 px (conv encoders + patch tokens), (b) two sequence
modalities (50 x 20 and 50 x 300 features, Transformer encoders, embed 40, as MOSI).
MFU = model FLOP/s (forward + backward, counted by torch's FlopCounterMode) / this machine's
measured fp32 matmul peak with the same threads. Prints a table and writes JSON.

    python bench/step_throughput.py [--steps 10] [--threads 2] [--out bench/results/step_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from commlab.augment import build_augmenter
from commlab.data.base import Batch
from commlab.models import build_method
from commlab.perf import count_flops, machine_info, matmul_peak_flops

IMAGE_CASE = [
    "model.method=comm",
    "model.embed_dim=128",
    "model.n_heads=8",
    "model.head.hidden_dim=512",
    "model.head.out_dim=128",
]
SEQ_CASE = [
    "model.method=comm",
    "model.embed_dim=40",
    "model.n_heads=5",
    "model.head.hidden_dim=512",
    "model.head.out_dim=256",
]


def image_case(batch: int) -> tuple[object, Batch, list[str]]:
    raw = {
        "model": {
            "modalities": [
                {
                    "encoder": {
                        "name": "conv",
                        "params": {"width": 64, "out_channels": 256, "grid": 4},
                    },
                    "adapter": {"name": "patch"},
                },
            ]
            * 2
        },
        "augment": {"modalities": [{"kind": "image"}, {"kind": "image"}]},
    }
    g = torch.Generator().manual_seed(0)
    x = [
        torch.randint(0, 256, (batch, 3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(2)
    ]
    return raw, Batch(xs=x, pad=[None, None]), ["image", "image"]


def sequence_case(batch: int) -> tuple[object, Batch, list[str]]:
    enc = {"name": "transformer", "params": {"d_model": 40, "n_layers": 5, "n_heads": 5}}
    raw = {
        "model": {"modalities": [{"encoder": enc}, {"encoder": enc}]},
        "augment": {"modalities": [{"kind": "sequence"}, {"kind": "sequence"}]},
    }
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(batch, 50, 20, generator=g), torch.randn(batch, 50, 300, generator=g)]
    return raw, Batch(xs=x, pad=[None, None]), ["sequence", "sequence"]


def build(raw: dict, overrides: list[str], batch: Batch, kinds: list[str]):
    from commlab.config import apply_overrides, validate_config

    cfg = validate_config(apply_overrides(raw, overrides))
    shapes = [tuple(x.shape[1:]) for x in batch.xs]
    method = build_method(cfg, shapes)
    aug = build_augmenter(cfg.augment, kinds)
    return cfg, method, aug


def time_it(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def run_case(
    name: str,
    raw: dict,
    overrides: list[str],
    batch: Batch,
    kinds: list[str],
    steps: int,
    peak: float,
) -> dict:
    cfg, method, aug = build(raw, overrides, batch, kinds)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    va, vb = aug(batch, gen), aug(batch, gen)

    def step() -> None:
        out = method.loss(va, vb)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def step_with_aug() -> None:
        a, b = aug(batch, gen), aug(batch, gen)
        out = method.loss(a, b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    flops = count_flops(lambda: method.loss(va, vb).loss.backward())
    opt.zero_grad(set_to_none=True)
    t_step = time_it(step, steps)
    t_aug = time_it(step_with_aug, max(2, steps // 2))
    bsz = batch.size

    # fusion alone: batched (one forward, key masks) vs sequential (one forward per mask)
    tokens, pads = method.stack(
        Batch(xs=[torch.cat([a, b]) for a, b in zip(va.xs, vb.xs, strict=True)], pad=[None, None])
    )
    tokens = [t.detach().requires_grad_(True) for t in tokens]

    def fuse(mode: str):
        def fn() -> None:
            outs = getattr(method.fusion, f"fuse_{mode}")(tokens, pads, method.masks)
            sum(o.sum() for o in outs).backward()

        return fn

    t_batched = time_it(fuse("batched"), steps * 2)
    t_seq = time_it(fuse("sequential"), steps * 2)
    return {
        "case": name,
        "batch_per_view": bsz,
        "flops_per_step": flops,
        "step_s": t_step,
        "samples_per_s": bsz / t_step,
        "achieved_flops": flops / t_step,
        "mfu": flops / t_step / peak,
        "step_with_augment_s": t_aug,
        "samples_per_s_with_augment": bsz / t_aug,
        "mfu_with_augment": flops / t_aug / peak,
        "fusion_batched_s": t_batched,
        "fusion_sequential_s": t_seq,
        "fusion_batched_speedup": t_seq / t_batched,
        "params": sum(p.numel() for p in method.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--batch", type=int, default=64, help="samples per view")
    ap.add_argument("--out", default="bench/results/step_throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = matmul_peak_flops("cpu", torch.float32, 1024)
    results = []
    for name, make, ov in (
        ("image_64px", image_case, IMAGE_CASE),
        ("sequence_mosi", sequence_case, SEQ_CASE),
    ):
        raw, batch, kinds = make(args.batch)
        results.append(run_case(name, raw, ov, batch, kinds, args.steps, peak))
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print(
        f"{'case':<16}{'samples/s':>11}{'GFLOP/s':>10}{'MFU':>7}{'+aug samples/s':>16}{'fusion batched x':>18}"
    )
    for r in results:
        print(
            f"{r['case']:<16}{r['samples_per_s']:>11.1f}{r['achieved_flops'] / 1e9:>10.1f}{r['mfu']:>7.2f}"
            f"{r['samples_per_s_with_augment']:>16.1f}{r['fusion_batched_speedup']:>18.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": machine_info(), "peak_flops": peak, "results": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
