"""Single-process pretraining: the same per-epoch loop as on Ray Train, with world size 1.

Writes into the run directory: checkpoint.pt (self-describing, every epoch, atomically),
config.yaml (resolved), metrics.jsonl (one line per epoch) and, for datasets with R/U/S tasks,
rus.{json,md,png}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from commlab.config import ExperimentConfig, to_yaml
from commlab.report import rus_from_metrics, write_rus_report
from commlab.train.checkpoint import load_checkpoint, save_checkpoint
from commlab.train.loop import PretrainRun


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    rus: dict[str, float] | None = None


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


def _fresh_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 1
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


def pretrain_local(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    console: Console | None = None,
) -> PretrainResult:
    """Pretrain in this process. `resume=True` continues from `run_dir/checkpoint.pt`."""
    console = console or Console()
    base = Path(run_dir) if run_dir else Path(cfg.train.out_dir) / cfg.name
    if resume:
        if not (base / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {base / 'checkpoint.pt'}")
        out = base
    else:
        out = _fresh_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    console.print(f"[bold]commlab pretrain[/] {cfg.name}: method={cfg.model.method} -> {out}")
    run = PretrainRun(cfg)
    if resume:
        run.load_state_dict(load_checkpoint(out / "checkpoint.pt"))
        console.print(f"resumed at epoch {run.epoch}/{cfg.train.epochs}")
    console.print(
        f"data: {run.data.description or cfg.data.name}; {len(run.train_ids)} train samples, "
        f"{run.steps_per_epoch} steps/epoch of {cfg.data.batch_size}"
    )
    ckpt_path = out / "checkpoint.pt"
    metrics_file = out / "metrics.jsonl"

    def on_epoch_end(epoch: int, metrics: dict[str, float], r: PretrainRun) -> None:
        console.print(format_progress(epoch, cfg.train.epochs, metrics))
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        save_checkpoint(ckpt_path, checkpoint_payload(r, metrics))

    final = run.fit(on_epoch_end)
    rus = rus_from_metrics(final)
    if rus:
        write_rus_report(rus, out, title=f"{cfg.name} ({cfg.model.method})")
        console.print("R/U/S: " + "  ".join(f"{k} {v:.3f}" for k, v in rus.items()))
    console.print(f"checkpoint: {ckpt_path}")
    return PretrainResult(out, ckpt_path, final, run.history, rus)
