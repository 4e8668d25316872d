"""What every runner writes when an epoch ends (`pretrain_local`, a Ray Train worker, a sweep
trial's own process): the checkpoint payload and the progress line."""

from __future__ import annotations

from typing import Any

from commlab.train.loop import PretrainRun


def checkpoint_payload(run: PretrainRun, metrics: dict[str, float]) -> dict[str, Any]:
    ds = run.data.pretrain
    return {
        **run.state_dict(),
        "config": run.cfg.model_dump(mode="json"),
        "metrics": metrics,
        "seed": run.cfg.seed,
        "data_fingerprint": ds.fingerprint,
        "modalities": [
            {"name": m.name, "kind": m.kind, "shape": list(m.values.shape[1:])}
            for m in ds.modalities
        ],
    }


def format_progress(epoch: int, total: int, m: dict[str, float]) -> str:
    parts = [f"epoch {epoch + 1:>3}/{total}", f"loss {m.get('train/loss', float('nan')):.4f}"]
    if "train/ssl_acc" in m:
        parts.append(f"ssl_acc {m['train/ssl_acc']:5.1f}%")
    for k, v in m.items():
        if k.startswith("probe/") and k.endswith("/balanced_acc") and "/mean/" not in k:
            parts.append(f"{k.split('/')[1]} {v:.3f}")
        elif k.startswith("probe/") and k.endswith(("/mse", "/f1_macro")):
            parts.append(f"{k.split('/')[1]} {k.rsplit('/', 1)[1]} {v:.4f}")
    parts.append(f"{m.get('perf/samples_per_s', 0.0):,.0f} samples/s")
    if "perf/mfu" in m:
        parts.append(f"mfu {m['perf/mfu']:.2f}")
    parts.append(f"{m.get('perf/epoch_time_s', 0.0):.1f}s")
    return "  ".join(parts)
