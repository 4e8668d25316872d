"""Import throughput of every source importer on format-true synthetic sources.

Sources are written by the test fixtures (tests/data/importers/fixtures.py) at larger sizes:
MOSI and UR-FUNNY pickles with 2,000 samples, a MIMIC pickle with 10,000 admissions, Vision&Touch
with 20 episodes of 50 steps at 128 px, MM-IMDb with 1,000 movies and 300x444 posters (resized to
224). Each import is timed end to end (read + check + convert + atomic Parquet write), then
`validate_dataset` on the result separately. Prints a table and writes JSON.

    python bench/import_throughput.py [--scale 1.0] [--out bench/results/import_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the fixtures live with the tests

from tests.data.importers import fixtures  # noqa: E402

from commlab.data.importers import import_dataset  # noqa: E402
from commlab.data.parquet import read_schema, validate_dataset  # noqa: E402


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def cases(scale: float) -> list[tuple[str, str, Callable[[Path], Path], dict[str, Any]]]:
    def n(k: int) -> int:
        return max(10, int(k * scale))

    def affect(name: str) -> Callable[[Path], Path]:
        sizes = (n(1400), n(300), n(300))
        return lambda d: fixtures.write_affect_pickle(d / f"{name}.pkl", name, sizes)

    return [
        ("mosi", "mosi", affect("mosi"), {}),
        ("humor", "humor", affect("humor"), {}),
        ("mimic", "mimic", lambda d: fixtures.write_mimic_pickle(d / "im.pk", n(10_000)), {}),
        (
            "visionandtouch",
            "visionandtouch",
            lambda d: fixtures.write_vt_dir(d / "vt", files=max(3, int(20 * scale)), size=128),
            {},
        ),
        (
            "mmimdb",
            "mmimdb",
            lambda d: fixtures.write_mmimdb(d / "mm", (n(600), n(200), n(200)), poster=(300, 444)),
            {"image_size": 224},
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every source size")
    ap.add_argument("--out", default=str(ROOT / "bench/results/import_throughput.json"))
    args = ap.parse_args()
    rows = []
    header = f"{'source':16s} {'samples':>8s} {'src MB':>8s} {'out MB':>8s} {'import s':>9s} "
    header += f"{'samples/s':>10s} {'src MB/s':>9s} {'validate s':>10s}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, write, options in cases(args.scale):
            work = Path(tmp) / name
            work.mkdir()
            src = write(work)
            t0 = time.perf_counter()
            out = import_dataset(name, src, work / "out", progress=False, validate=False, **options)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            problems = validate_dataset(out)
            validate_s = time.perf_counter() - t0
            assert not problems, problems
            samples = read_schema(out)["num_samples"]
            row = {
                "source": label,
                "importer": name,
                "samples": samples,
                "source_mb": round(size_mb(src), 2),
                "output_mb": round(size_mb(out), 2),
                "import_s": round(seconds, 3),
                "samples_per_s": round(samples / seconds, 1),
                "source_mb_per_s": round(size_mb(src) / seconds, 2),
                "validate_s": round(validate_s, 3),
            }
            rows.append(row)
            print(
                f"{label:16s} {samples:8d} {row['source_mb']:8.1f} {row['output_mb']:8.1f} "
                f"{seconds:9.2f} {row['samples_per_s']:10.1f} {row['source_mb_per_s']:9.2f} "
                f"{validate_s:10.2f}"
            )
    result = {
        "bench": "import_throughput",
        "scale": args.scale,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
