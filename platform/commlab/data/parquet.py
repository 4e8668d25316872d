"""The one on-disk dataset format: a directory of Parquet files (format version 1).

Layout of a dataset directory::

    samples.parquet            one row per sample
    modality-<pool>.parquet    one file per modality pool

``samples.parquet`` columns:

- ``split`` (string, null = in no split): the split the sample belongs to; splits are disjoint.
- ``<modality>`` (int64) per modality: row of that modality's pool holding the sample's input.
- ``<label>`` per label: a scalar column (int or float) for one value per sample, or a
  FixedSizeList of the flattened per-sample value (multilabel / multi-output); the per-sample
  shape is in the schema.

Its file metadata key ``commlab`` holds the JSON schema::

    {"format": "commlab-dataset", "version": 1, "num_samples": N, "fingerprint": "...",
     "params": {...}, "splits": ["train", "test"],
     "modalities": [{"name", "kind", "shape", "dtype", "variable_length", "lengths_dtype",
                     "pool", "rows"}],
     "labels": [{"name", "shape", "dtype"}],
     "tasks": [{"name", "kind", "num_classes"}]}

``shape`` is the per-item shape (images: ``[C, H, W]``; padded sequences: ``[T, p]``) and
``dtype`` the torch dtype name without ``torch.``. A modality pool file has the column ``value``,
a FixedSizeList of the flattened item, and, for variable-length modalities, ``length`` (int64).
Modalities whose values are the *same tensor* (Trifeatures: both images index one image pool) share
one pool file, named after the first of them (``pool`` in the schema). bool tensors are stored as
uint8 and restored from the schema dtype.

Round trips are exact (values, dtypes, shapes); split ids come back in ascending order. Writes go
to a temporary sibling directory that is renamed into place, so a dataset directory is either
complete or absent. Files are zstd-compressed and byte-identical for identical inputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from commlab.data.base import Modality, MultimodalDataset, Task

FORMAT = "commlab-dataset"
FORMAT_VERSION = 1
SAMPLES_FILE = "samples.parquet"
META_KEY = b"commlab"
_COMPRESSION = "zstd"
_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class DatasetFormatError(ValueError):
    """A dataset directory that cannot be read; the message lists every problem found."""


def pool_file(pool: str) -> str:
    return f"modality-{pool}.parquet"


# ---------------------------------------------------------------- writing
def shareable(path: str | Path) -> Path:
    """Give `path` the permissions a plain `open()` / `mkdir()` would (umask applied).

    `tempfile.mkdtemp` / `mkstemp` create 0700 / 0600 so nobody sees a half-written result;
    once the result is complete and renamed into place it should be as readable as any other
    file the user writes (a dataset shared with other users or a Ray node's user)."""
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for p in path.rglob("*"):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
    else:
        path.chmod(0o666 & ~umask)
    return path


def write_dataset(
    ds: MultimodalDataset,
    out_dir: str | Path,
    params: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `ds` to the directory `out_dir` (which must not exist unless `overwrite`).

    `params` (JSON-serialisable) are stored in the schema, e.g. the generator's arguments. An
    empty `ds.fingerprint` is replaced by a hash of the content. Returns the directory.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"dataset directory {out} already exists (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_into(ds, tmp, params or {})
        shareable(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_into(ds: MultimodalDataset, tmp: Path, params: dict[str, Any]) -> None:
    n = len(ds)
    columns: dict[str, pa.Array] = {"split": _split_column(ds, n)}
    modalities: list[dict[str, Any]] = []
    pools: dict[int, str] = {}  # id(values) -> pool name
    for m in ds.modalities:
        _check_column_name(m.name, columns)
        columns[m.name] = pa.array(m.index.numpy(), type=pa.int64())
        key = id(m.values)
        new_pool = key not in pools
        if new_pool:
            pools[key] = m.name
        entry = {
            "name": m.name,
            "kind": m.kind,
            "shape": list(m.values.shape[1:]),
            "dtype": _dtype_name(m.values.dtype, m.name),
            "variable_length": m.lengths is not None,
            "lengths_dtype": _dtype_name(m.lengths.dtype, m.name)
            if m.lengths is not None
            else None,
            "pool": pools[key],
            "rows": int(m.values.shape[0]),
        }
        modalities.append(entry)
        if new_pool:
            _write_pool(m, tmp / pool_file(m.name))
    labels = []
    for name, y in ds.labels.items():
        _check_column_name(name, columns)
        columns[name] = _tensor_column(y)
        labels.append(
            {"name": name, "shape": list(y.shape[1:]), "dtype": _dtype_name(y.dtype, name)}
        )
    tasks = [
        {"name": t.name, "kind": t.kind, "num_classes": t.num_classes} for t in ds.tasks.values()
    ]
    schema = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_samples": n,
        "fingerprint": ds.fingerprint or content_fingerprint(ds),
        "params": params,
        "splits": list(ds.splits),
        "modalities": modalities,
        "labels": labels,
        "tasks": tasks,
    }
    table = pa.table(columns)
    meta = json.dumps(schema, sort_keys=True, allow_nan=False).encode()
    table = table.replace_schema_metadata({META_KEY: meta})
    pq.write_table(table, tmp / SAMPLES_FILE, compression=_COMPRESSION)


def _check_column_name(name: str, columns: dict[str, Any]) -> None:
    if name in columns:
        raise ValueError(
            f"column name '{name}' is used twice (modalities, labels and 'split' share one namespace)"
        )


def _split_column(ds: MultimodalDataset, n: int) -> pa.Array:
    names = list(ds.splits)
    code = np.full(n, -1, dtype=np.int64)
    for k, name in enumerate(names):
        ids = ds.splits[name].numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"split '{name}' has sample ids outside [0, {n})")
        taken = code[ids] >= 0
        if taken.any() or np.unique(ids).size != ids.size:
            raise ValueError(
                f"split '{name}' overlaps another split or repeats ids; splits must be disjoint"
            )
        code[ids] = k
    values = np.array(names + [None], dtype=object)[code]  # code -1 picks None
    return pa.array(values, type=pa.string())


def _dtype_name(dtype: torch.dtype, what: str) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"'{what}': dtype {dtype} is not storable; storable: {sorted(_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _to_numpy(t: Tensor) -> np.ndarray:
    a = t.detach().cpu().contiguous().numpy()
    return a.astype(np.uint8) if a.dtype == np.bool_ else a


def _tensor_column(t: Tensor) -> pa.Array:
    a = _to_numpy(t)
    if a.ndim == 1:
        return pa.array(a)
    width = math.prod(a.shape[1:])
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width)


def _write_pool(m: Modality, path: Path) -> None:
    columns = {"value": _tensor_column(m.values)}
    if m.lengths is not None:
        columns["length"] = pa.array(m.lengths.numpy().astype(np.int64), type=pa.int64())
    pq.write_table(pa.table(columns), path, compression=_COMPRESSION)


def content_fingerprint(ds: MultimodalDataset) -> str:
    """A short hash of every tensor in `ds` (used when a dataset carries no fingerprint)."""
    h = hashlib.sha256()
    tensors = [m.values for m in ds.modalities] + [m.index for m in ds.modalities]
    tensors += [m.lengths for m in ds.modalities if m.lengths is not None]
    tensors += list(ds.labels.values()) + list(ds.splits.values())
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(_to_numpy(t).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- reading
def read_schema(path: str | Path) -> dict[str, Any]:
    """The JSON schema stored in `path/samples.parquet`."""
    f = Path(path) / SAMPLES_FILE
    if not f.is_file():
        raise DatasetFormatError(f"{path}: missing {SAMPLES_FILE}")
    meta = pq.read_schema(f).metadata or {}
    if META_KEY not in meta:
        raise DatasetFormatError(f"{f}: no '{META_KEY.decode()}' schema in the file metadata")
    schema = json.loads(meta[META_KEY])
    if schema.get("format") != FORMAT or schema.get("version") != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{f}: format {schema.get('format')!r} version {schema.get('version')!r}; "
            f"this reader handles {FORMAT!r} version {FORMAT_VERSION}"
        )
    return schema


def read_dataset(path: str | Path) -> MultimodalDataset:
    """Read a dataset directory written by `write_dataset`.

    Raises DatasetFormatError for missing files or a schema mismatch; run `validate_dataset`
    for the full check (index ranges, non-finite values, empty splits).
    """
    root = Path(path)
    schema = read_schema(root)
    table = _read_table(root / SAMPLES_FILE)
    problems = _check_samples_table(schema, table)
    if problems:
        raise DatasetFormatError(f"{root}: " + "; ".join(problems))
    pools: dict[str, tuple[Tensor, Tensor | None]] = {}
    modalities = []
    for entry in schema["modalities"]:
        if entry["pool"] not in pools:
            pools[entry["pool"]] = _read_pool(root, entry)
        values, lengths = pools[entry["pool"]]
        index = torch.from_numpy(_column_numpy(table, entry["name"]).astype(np.int64))
        modalities.append(Modality(entry["name"], entry["kind"], values, index, lengths))
    labels = {
        e["name"]: _column_tensor(table.column(e["name"]), e["shape"], e["dtype"])
        for e in schema["labels"]
    }
    tasks = {t["name"]: Task(t["name"], t["kind"], t["num_classes"]) for t in schema["tasks"]}
    split = table.column("split").to_numpy(zero_copy_only=False)
    splits = {
        s: torch.from_numpy(np.flatnonzero(split == s).astype(np.int64)) for s in schema["splits"]
    }
    return MultimodalDataset(modalities, labels, tasks, splits, fingerprint=schema["fingerprint"])


def _read_table(f: Path) -> pa.Table:
    """`pq.read_table`, with a damaged file (bad compression block, truncated footer) as one
    `DatasetFormatError` that says what to do instead of pyarrow's traceback."""
    try:
        return pq.read_table(f)
    except (pa.ArrowException, OSError) as err:
        reason = " ".join(str(err).split())[:200]
        raise DatasetFormatError(
            f"{f} is damaged and cannot be read ({type(err).__name__}: {reason}); re-create the "
            f"dataset (generate or import it again) or restore the file; `commlab data validate "
            f"{f.parent}` lists every problem"
        ) from None


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False))


def _column_tensor(col: pa.ChunkedArray, shape: list[int], dtype: str) -> Tensor:
    arr = col.combine_chunks()
    if isinstance(arr, pa.FixedSizeListArray):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
    else:
        flat = arr.to_numpy(zero_copy_only=False)
    a = np.array(flat, copy=True).reshape(len(arr), *shape)
    return torch.from_numpy(a).to(_DTYPES[dtype])


def _read_pool(root: Path, entry: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    f = root / pool_file(entry["pool"])
    if not f.is_file():
        raise DatasetFormatError(f"{root}: missing {f.name} (modality '{entry['name']}')")
    table = _read_table(f)
    problems = _check_pool(entry, table.schema, table.num_rows)
    if problems:
        raise DatasetFormatError(f"{f}: " + "; ".join(problems))
    values = _column_tensor(table.column("value"), entry["shape"], entry["dtype"])
    if values.is_floating_point() and not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise DatasetFormatError(
            f"{f}: modality '{entry['name']}' holds {bad} NaN/inf values; the data, not the "
            "training, is the problem: fix or re-import the source (importers take "
            "-o nonfinite=zero) and check it with `commlab data validate`"
        )
    lengths = None
    if entry["variable_length"]:
        lengths = torch.from_numpy(_column_numpy(table, "length").copy()).to(
            _DTYPES[entry["lengths_dtype"]]
        )
    return values, lengths


# ---------------------------------------------------------------- validation
def _value_width(field_type: pa.DataType) -> int | None:
    return field_type.list_size if pa.types.is_fixed_size_list(field_type) else None


def _check_column(schema: pa.Schema, name: str, shape: list[int], dtype: str) -> str | None:
    if name not in schema.names:
        return f"column '{name}' is missing"
    t = schema.field(name).type
    want = np.dtype("uint8" if dtype == "bool" else dtype)
    width = math.prod(shape)
    if shape:
        if _value_width(t) != width:
            return f"column '{name}' should be a FixedSizeList of {width} ({shape}), is {t}"
        t = t.value_type
    if t.to_pandas_dtype() != want:
        return f"column '{name}' has type {t}, schema says {dtype}"
    return None


def _check_samples_table(schema: dict[str, Any], table: pa.Table) -> list[str]:
    problems = []
    if table.num_rows != schema["num_samples"]:
        problems.append(f"{table.num_rows} sample rows, schema says {schema['num_samples']}")
    if "split" not in table.column_names or not pa.types.is_string(
        table.schema.field("split").type
    ):
        problems.append("column 'split' (string) is missing")
    for e in schema["modalities"]:
        if (p := _check_column(table.schema, e["name"], [], "int64")) is not None:
            problems.append(p)
    for e in schema["labels"]:
        if (p := _check_column(table.schema, e["name"], e["shape"], e["dtype"])) is not None:
            problems.append(p)
    return problems


def _check_pool(entry: dict[str, Any], schema: pa.Schema, num_rows: int) -> list[str]:
    problems = []
    if (p := _check_column(schema, "value", entry["shape"], entry["dtype"])) is not None:
        problems.append(p)
    if num_rows != entry["rows"]:
        problems.append(f"{num_rows} rows, schema says {entry['rows']}")
    if entry["variable_length"] and "length" not in schema.names:
        problems.append("column 'length' is missing for a variable-length modality")
    return problems


def validate_dataset(path: str | Path) -> list[str]:
    """Every problem found in the dataset directory `path`; an empty list means it is valid.

    Checks: files present, schema readable and matching the columns, pool indices in range,
    lengths within the padded length, no NaN/inf in float pools or labels, no empty split,
    class labels within `num_classes`.
    """
    root = Path(path)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    try:
        return _validate(root)
    except Exception as err:  # an unreadable file or malformed schema is a problem to report
        return [f"{root}: {type(err).__name__}: {err}"]


def _validate(root: Path) -> list[str]:
    schema = read_schema(root)
    table = pq.read_table(root / SAMPLES_FILE)
    problems = _check_samples_table(schema, table)
    if problems:
        return problems
    split = table.column("split").to_numpy(zero_copy_only=False)
    for s in schema["splits"]:
        if not np.any(split == s):
            problems.append(f"split '{s}' is empty")
    unknown = {s for s in set(split) if s is not None} - set(schema["splits"])
    if unknown:
        problems.append(f"'split' column holds undeclared splits {sorted(unknown)}")
    checked: dict[str, list[str]] = {}
    for entry in schema["modalities"]:
        if entry["pool"] not in checked:
            checked[entry["pool"]] = _validate_pool(root, entry)
            problems += checked[entry["pool"]]
        if not checked[entry["pool"]]:
            problems += _check_index(entry, _column_numpy(table, entry["name"]))
    tasks = {t["name"]: t for t in schema["tasks"]}
    for e in schema["labels"]:
        y = _column_tensor(table.column(e["name"]), e["shape"], e["dtype"])
        if y.is_floating_point() and not torch.isfinite(y).all():
            problems.append(f"label '{e['name']}' holds NaN or inf")
        task = tasks.get(e["name"])
        classes = task["num_classes"] if task and task["kind"] in ("multiclass", "binary") else None
        if classes and y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
            problems.append(f"label '{e['name']}' lies outside [0, {classes})")
    return problems


def _validate_pool(root: Path, entry: dict[str, Any]) -> list[str]:
    """File, column types and row count; values are read only where they need checking."""
    f = root / pool_file(entry["pool"])
    if not f.is_file():
        return [f"missing {f.name} (modality '{entry['name']}')"]
    try:
        pf = pq.ParquetFile(f)
        problems = [
            f"{f.name}: {p}" for p in _check_pool(entry, pf.schema_arrow, pf.metadata.num_rows)
        ]
        if problems:
            return problems
        # Read every column: a damaged compression block shows only when its page is decoded
        data = pf.read()
        if entry["dtype"].startswith("float"):
            col = data.column("value").combine_chunks()
            if not np.isfinite(col.flatten().to_numpy(zero_copy_only=False)).all():
                problems.append(f"modality '{entry['name']}': pool holds NaN or inf")
        if entry["variable_length"]:
            lengths = _column_numpy(data, "length")
            if lengths.size and (lengths.min() < 0 or lengths.max() > entry["shape"][0]):
                problems.append(
                    f"modality '{entry['name']}': lengths outside [0, {entry['shape'][0]}]"
                )
    except Exception as err:
        return [f"{f.name}: unreadable ({type(err).__name__}: {err})"]
    return problems


def _check_index(entry: dict[str, Any], index: np.ndarray) -> list[str]:
    rows = entry["rows"]
    bad = np.flatnonzero((index < 0) | (index >= rows))
    if bad.size:
        k = int(bad[0])
        return [
            f"modality '{entry['name']}': {bad.size} samples index outside the pool "
            f"(sample {k} -> row {int(index[k])}, pool has {rows} rows)"
        ]
    return []
