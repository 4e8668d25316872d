"""How well can the Trifeatures encoder see each attribute at a given resolution? A supervised bound.

The conv encoder of the R/U/S configs (width 16) plus a linear layer is trained with labels to
classify one attribute (texture by default) of single Trifeatures images, on the 2,400 train
images, and tested on the 200 images of held-out (shape, texture, colour) combinations, as the
probes are. No self-supervised method with this encoder should be expected to beat this number
by much, so it tells which resolution the uniqueness (texture) axis of the R/U/S bench needs.
Prints the test accuracy after the last epoch and the best one per size; writes JSON.

    python bench/texture_ceiling.py [--sizes 32 48 64] [--attr texture] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from commlab.data.trifeatures import image_attributes, render_trifeatures
from commlab.models.encoders import ENCODERS
from commlab.perf import machine_info


def ceiling(size: int, attr: str, epochs: int, lr: float, width: int, seed: int) -> dict:
    attrs = image_attributes(seed, 3)
    rng = np.random.default_rng([seed, 1])
    images = render_trifeatures(attrs["shape"], attrs["texture"], attrs["colour"], size, rng)
    x = torch.from_numpy(images).float() / 255.0
    y = torch.from_numpy(attrs[attr])
    train, test = attrs["split"] == 0, attrs["split"] == 1
    torch.manual_seed(seed)
    enc = ENCODERS.build("conv", width=width, out_channels=64, grid=4)
    net = nn.Sequential(enc.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4)
    xtr, ytr = x[train], y[train]
    curve = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        for k in range(0, len(xtr), 128):
            idx = perm[k : k + 128]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            curve.append((net(x[test]).argmax(1) == y[test]).float().mean().item())
    return {
        "size": size,
        "final_test_acc": curve[-1],
        "best_test_acc": max(curve),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--attr", default="texture", choices=["shape", "texture", "colour"])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/texture_ceiling.json")
    args = ap.parse_args()

    rows = []
    for size in args.sizes:
        r = ceiling(size, args.attr, args.epochs, args.lr, args.width, args.seed)
        rows.append(r)
        print(
            f"{args.attr} at {size:>3} px: test accuracy {r['final_test_acc']:.3f} after "
            f"{args.epochs} epochs (best {r['best_test_acc']:.3f}), {r['seconds']:.0f}s",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine_info() | {"torch_threads": torch.get_num_threads()},
                "attr": args.attr,
                "epochs": args.epochs,
                "lr": args.lr,
                "width": args.width,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
