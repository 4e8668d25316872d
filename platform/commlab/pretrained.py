"""Load a trained encoder and embed data with it.

`load_encoder(source)` accepts

- ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/m-<id>``: a promoted model in
  the MLflow registry (`commlab promote`);
- ``runs:/RUN_ID`` or a bare MLflow run id: that run's ``checkpoint/checkpoint.pt`` artifact;
- a local ``checkpoint.pt``, a directory holding one, or a downloaded promoted-model directory;

and returns an `Encoder` in eval mode whose `embed(batch)` is the vector the linear probes saw
during training (for CoMM the fused all-modality embedding): the same deterministic evaluation
preprocessing, the same precision. Checkpoints load with ``weights_only=True``; nothing in them
runs code. MLflow is reached only through `commlab.tracking.model_registry`, and only for URIs.

This module is also the MLflow pyfunc loader of promoted models (`_load_pyfunc`), so
``mlflow.pyfunc.load_model`` works on them wherever commlab is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from rich.progress import Progress
from torch import Tensor, nn

from commlab.augment import build_augmenter
from commlab.checkpoint_format import CHECKPOINT_NAME, load_checkpoint
from commlab.config import ExperimentConfig
from commlab.data.base import Batch, MultimodalDataset
from commlab.data.parquet import read_dataset, shareable
from commlab.models import Method, build_method

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_VARIABLE_LENGTH = ("sequence", "text")  # stored padded: the first per-item dim may vary
_META_KEYS = ("data_fingerprint", "code_version", "seed", "epoch", "metrics", "packages")


class Encoder(nn.Module):
    """A trained method frozen for inference: `embed(batch)` -> (B, D) float features."""

    def __init__(
        self,
        method: Method,
        config: ExperimentConfig,
        modalities: list[dict[str, Any]],
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.config = config
        self.modalities = modalities
        self.meta = dict(meta or {})
        self.augment = build_augmenter(config.augment, [m["kind"] for m in modalities])
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        # The precision the probes ran in during training (PretrainRun.extract).
        if self.config.train.precision == "bf16-mixed":  # ("auto" probes run in fp32 here)
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def embed(self, batch: Batch) -> Tensor:
        """Features of a raw batch (as `MultimodalDataset.batch` returns it), float32, on the
        encoder's device."""
        self.check_batch(batch)
        prepared = self.augment.prepare(batch.to(self.device))
        with self._autocast():
            return self.method.features(prepared).float()

    def forward(self, batch: Batch) -> Tensor:
        return self.embed(batch)

    def check_batch(self, batch: Batch) -> None:
        if len(batch.xs) != len(self.modalities):
            raise ValueError(
                f"batch has {len(batch.xs)} modalities, the encoder takes {len(self.modalities)} "
                f"({', '.join(m['name'] for m in self.modalities)})"
            )
        for x, m in zip(batch.xs, self.modalities, strict=True):
            want = list(m["shape"])
            got = list(x.shape[1:])
            if m["kind"] in _VARIABLE_LENGTH:
                want, got = want[1:], got[1:]
            if want != got:
                raise ValueError(
                    f"modality '{m['name']}' ({m['kind']}): per-sample shape {list(x.shape[1:])} "
                    f"does not match the encoder's {list(m['shape'])}"
                )

    def check_dataset(self, ds: MultimodalDataset) -> None:
        have = [(m.name, m.kind) for m in ds.modalities]
        want = [(m["name"], m["kind"]) for m in self.modalities]
        if have != want:
            raise ValueError(f"dataset modalities {have} do not match the encoder's {want}")

    def embed_ids(
        self, ds: MultimodalDataset, ids: Tensor, batch_size: int = 256
    ) -> Iterator[Tensor]:
        """Features of samples `ids` of `ds`, one CPU tensor per batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.check_dataset(ds)
        for i in range(0, len(ids), batch_size):
            yield self.embed(ds.batch(ids[i : i + batch_size])).cpu()


def encoder_from_checkpoint(ckpt: Mapping[str, Any], device: str | torch.device = "cpu") -> Encoder:
    """Rebuild the method from a loaded checkpoint dict (config + modality shapes + weights)."""
    if not ckpt.get("modalities"):
        raise ValueError(
            "checkpoint has no 'modalities' entry (name, kind, shape per modality); it predates "
            "self-describing checkpoints and cannot be rebuilt without its dataset"
        )
    cfg = ExperimentConfig.model_validate(ckpt["config"])
    modalities = [dict(m) for m in ckpt["modalities"]]
    method = build_method(cfg, [tuple(m["shape"]) for m in modalities])
    method.load_state_dict(ckpt["model"])
    meta = {k: ckpt[k] for k in _META_KEYS if k in ckpt}
    return Encoder(method, cfg, modalities, meta).to(device)


def is_remote(source: str | os.PathLike[str]) -> bool:
    """True for MLflow sources (models:/, runs:/, a bare run id that is not a local path)."""
    s = str(source)
    if s.startswith(("models:/", "runs:/")):
        return True
    return bool(_RUN_ID.match(s)) and not Path(s).exists()


def checkpoint_in(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of a local source: the file itself, `<dir>/checkpoint.pt`, a run's
    downloaded `<dir>/checkpoint/checkpoint.pt`, or the data of a promoted model (MLmodel)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint or model at {p}")
    if (p / "MLmodel").is_file():
        flavor = (yaml.safe_load((p / "MLmodel").read_text()) or {}).get("flavors", {})
        data = (flavor.get("python_function") or {}).get("data")
        if data and (p / data / CHECKPOINT_NAME).is_file():
            return p / data / CHECKPOINT_NAME
    for candidate in (p / CHECKPOINT_NAME, p / "checkpoint" / CHECKPOINT_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{p} holds no {CHECKPOINT_NAME} (looked for {CHECKPOINT_NAME}, checkpoint/"
        f"{CHECKPOINT_NAME} and a promoted model's MLmodel data)"
    )


def load_encoder(
    source: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """The trained encoder behind `source` (see the module docstring), in eval mode.

    `tracking_uri` is used for MLflow sources (default: $MLFLOW_TRACKING_URI, else
    sqlite:///<cwd>/mlflow.db).
    """
    if is_remote(source):
        # lazy: only registry and run sources need MLflow (`from commlab import load_encoder`
        # stays MLflow-free)
        from commlab.tracking.model_registry import fetch_model

        with tempfile.TemporaryDirectory(prefix="commlab-encoder-") as tmp:
            local = fetch_model(str(source), tmp, tracking_uri=tracking_uri)
            ckpt = load_checkpoint(checkpoint_in(local))
    else:
        ckpt = load_checkpoint(checkpoint_in(source))
    encoder = encoder_from_checkpoint(ckpt, device)
    encoder.meta["source"] = str(source)
    return encoder


# ---------------------------------------------------------------- datasets -> Parquet
@dataclass
class EmbedResult:
    path: Path
    rows: int
    dim: int


def sample_splits(ds: MultimodalDataset) -> list[str | None]:
    names: list[str | None] = [None] * len(ds)
    for name, ids in ds.splits.items():
        for i in ids.tolist():
            names[i] = name
    return names


def embed_dataset(
    encoder: Encoder,
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    splits: list[str] | None = None,
    progress: bool = True,
) -> EmbedResult:
    """Embed every sample (or those of `splits`) of the commlab Parquet dataset at `dataset`.

    Writes `out` (atomically) with columns sample_id (int64, the row in samples.parquet), split
    (string, null = in no split) and embedding (fixed-size list of float32); the file metadata
    key `commlab` holds the source, the dimension and the dataset fingerprint.
    """
    ds = read_dataset(Path(dataset))
    encoder.check_dataset(ds)
    split_of = sample_splits(ds)
    if splits:
        unknown = sorted(set(splits) - set(ds.splits))
        if unknown:
            raise ValueError(f"dataset has no split(s) {unknown}; splits: {sorted(ds.splits)}")
        ids = torch.cat([ds.split(s) for s in splits]).sort().values
    else:
        ids = torch.arange(len(ds))
    if len(ids) == 0:
        raise ValueError(f"{dataset}: no samples to embed")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".parquet.tmp")
    os.close(fd)
    writer = None
    rows, dim = 0, 0
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("embedding", total=len(ids))
            for start, feats in zip(
                range(0, len(ids), batch_size),
                encoder.embed_ids(ds, ids, batch_size),
                strict=True,
            ):
                chunk = ids[start : start + batch_size].numpy()
                dim = int(feats.shape[1])
                values = pa.array(feats.numpy().astype(np.float32).reshape(-1))
                table = pa.table(
                    {
                        "sample_id": pa.array(chunk, pa.int64()),
                        "split": pa.array([split_of[i] for i in chunk], pa.string()),
                        "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
                    }
                )
                if writer is None:
                    meta = {
                        "source": encoder.meta.get("source", ""),
                        "dim": dim,
                        "dataset": str(Path(dataset).resolve()),
                        "dataset_fingerprint": ds.fingerprint,
                        "model_data_fingerprint": encoder.meta.get("data_fingerprint", ""),
                    }
                    schema = table.schema.with_metadata({"commlab": json.dumps(meta)})
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
                rows += len(chunk)
                bar.advance(task, len(chunk))
        assert writer is not None
        writer.close()
        writer = None
        os.replace(tmp, out)
        shareable(out)  # mkstemp made it 0600
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return EmbedResult(out, rows, dim)


# ---------------------------------------------------------------- MLflow pyfunc flavour
class PyfuncEncoder:
    """`mlflow.pyfunc` face of a promoted encoder.

    predict input: a mapping {modality name: array (B, *shape)}; for variable-length modalities
    (sequence, text) optionally `<name>.lengths` (B,) (default: no padding). Output: a float32
    numpy array (B, D).
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def predict(self, model_input: Mapping[str, Any], params: Any = None) -> np.ndarray:
        return self.encoder.embed(batch_from_arrays(self.encoder, model_input)).cpu().numpy()


def batch_from_arrays(encoder: Encoder, inputs: Mapping[str, Any]) -> Batch:
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"expected a mapping of modality name -> array, got {type(inputs).__name__}"
        )
    xs: list[Tensor] = []
    pads: list[Tensor | None] = []
    for m in encoder.modalities:
        if m["name"] not in inputs:
            raise ValueError(f"missing modality '{m['name']}' (have {sorted(inputs)})")
        x = torch.as_tensor(np.asarray(inputs[m["name"]]))
        pad = None
        lengths = inputs.get(f"{m['name']}.lengths")
        if lengths is not None:
            lengths_t = torch.as_tensor(np.asarray(lengths)).long()
            pad = torch.arange(x.shape[1]).unsqueeze(0) >= lengths_t.unsqueeze(1)
        xs.append(x)
        pads.append(pad)
    return Batch(xs=xs, pad=pads)


def _load_pyfunc(data_path: str, model_config: Any = None) -> PyfuncEncoder:
    return PyfuncEncoder(encoder_from_checkpoint(load_checkpoint(checkpoint_in(data_path))))


__all__ = [
    "Encoder",
    "EmbedResult",
    "PyfuncEncoder",
    "checkpoint_in",
    "embed_dataset",
    "encoder_from_checkpoint",
    "is_remote",
    "load_encoder",
]
