"""The on-disk dataset format: exact round trips, validation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from commlab.data import parquet
from commlab.data.base import Modality, MultimodalDataset, Task
from commlab.data.parquet import (
    DatasetFormatError,
    read_dataset,
    read_schema,
    validate_dataset,
    write_dataset,
)

N = 12


def make_dataset(seq_nan: bool = False) -> MultimodalDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=g)
    seq = torch.randn(7, 6, 2, generator=g)
    if seq_nan:
        seq[3, 1, 0] = float("nan")
    text = torch.randint(0, 100, (N, 9), generator=g)
    tab = torch.randn(N, 4, generator=g, dtype=torch.float64)
    modalities = [
        Modality("img_a", "image", images, torch.randint(0, 5, (N,), generator=g)),
        Modality("img_b", "image", images, torch.randint(0, 5, (N,), generator=g)),  # same pool
        Modality(
            "seq",
            "sequence",
            seq,
            torch.randint(0, 7, (N,), generator=g),
            lengths=torch.randint(1, 7, (7,), generator=g),
        ),
        Modality(
            "text",
            "text",
            text,
            torch.arange(N),
            lengths=torch.randint(1, 10, (N,), generator=g, dtype=torch.int64).to(torch.int32),
        ),
        Modality("tab", "tabular", tab, torch.arange(N)),
    ]
    labels = {
        "cls": torch.randint(0, 3, (N,), generator=g),
        "reg": torch.randn(N, generator=g),
        "tags": torch.rand(N, 4, generator=g) > 0.5,
        "multi": torch.randn(N, 2, 3, generator=g, dtype=torch.float16),
    }
    tasks = {
        "cls": Task("cls", "multiclass", 3),
        "reg": Task("reg", "regression"),
        "tags": Task("tags", "multilabel", 4),
        "multi": Task("multi", "regression"),
    }
    splits = {"train": torch.arange(0, 6), "val": torch.tensor([6, 8]), "test": torch.arange(9, 12)}
    return MultimodalDataset(
        modalities, labels, tasks, splits, fingerprint="toy"
    )  # sample 7: no split


def assert_same(a: MultimodalDataset, b: MultimodalDataset) -> None:
    assert a.names == b.names and a.fingerprint == b.fingerprint
    for ma, mb in zip(a.modalities, b.modalities, strict=True):
        assert ma.kind == mb.kind
        assert ma.values.dtype == mb.values.dtype and ma.values.shape == mb.values.shape
        assert torch.equal(ma.values.nan_to_num(0), mb.values.nan_to_num(0))
        assert torch.equal(ma.index, mb.index)
        assert (ma.lengths is None) == (mb.lengths is None)
        if ma.lengths is not None:
            assert ma.lengths.dtype == mb.lengths.dtype and torch.equal(ma.lengths, mb.lengths)
    assert list(a.labels) == list(b.labels)
    for k in a.labels:
        assert a.labels[k].dtype == b.labels[k].dtype, k
        assert torch.equal(a.labels[k], b.labels[k]), k
    assert a.tasks == b.tasks
    assert list(a.splits) == list(b.splits)
    for k in a.splits:
        assert torch.equal(a.splits[k], b.splits[k])


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ds = make_dataset()
    out = write_dataset(ds, tmp_path / "toy", params={"source": "test", "n": N})
    back = read_dataset(out)
    assert_same(ds, back)
    assert back.modalities[0].values.dtype == torch.uint8
    # one pool file for the two modalities that share their values, and shared again on read
    assert sorted(p.name for p in out.iterdir()) == [
        "modality-img_a.parquet",
        "modality-seq.parquet",
        "modality-tab.parquet",
        "modality-text.parquet",
        "samples.parquet",
    ]
    assert back.modalities[0].values is back.modalities[1].values
    batch = back.batch(back.split("train"))
    assert batch.xs[0].dtype == torch.uint8 and batch.pad[2] is not None


def test_schema_is_in_the_file_metadata(tmp_path: Path) -> None:
    out = write_dataset(make_dataset(), tmp_path / "toy", params={"source": "test"})
    schema = read_schema(out)
    assert schema["version"] == parquet.FORMAT_VERSION and schema["num_samples"] == N
    assert schema["fingerprint"] == "toy" and schema["params"] == {"source": "test"}
    mods = {m["name"]: m for m in schema["modalities"]}
    assert mods["img_a"]["shape"] == [3, 4, 4] and mods["img_a"]["dtype"] == "uint8"
    assert mods["img_b"]["pool"] == "img_a" and mods["seq"]["variable_length"]
    assert {t["name"]: t["num_classes"] for t in schema["tasks"]}["cls"] == 3
    table = pq.read_table(out / "samples.parquet")
    assert table.column("split").to_pylist()[6:9] == ["val", None, "val"]
    assert table.schema.field("img_a").type == pa.int64()
    value_type = pq.read_schema(out / "modality-img_a.parquet").field("value").type
    assert pa.types.is_fixed_size_list(value_type) and value_type.list_size == 48


def test_same_input_gives_identical_bytes_and_empty_fingerprint_is_filled(tmp_path: Path) -> None:
    ds = make_dataset()
    a, b = write_dataset(ds, tmp_path / "a"), write_dataset(ds, tmp_path / "b")
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    ds.fingerprint = ""
    fp = read_schema(write_dataset(ds, tmp_path / "c"))["fingerprint"]
    assert len(fp) == 16 and fp == parquet.content_fingerprint(make_dataset())


def test_validate_accepts_a_good_dataset(tmp_path: Path) -> None:
    assert validate_dataset(write_dataset(make_dataset(), tmp_path / "toy")) == []


def _rewrite_samples(path: Path, fn) -> None:
    f = path / "samples.parquet"
    table = pq.read_table(f)
    meta = table.schema.metadata
    table = fn(table)
    pq.write_table(table.replace_schema_metadata(meta), f)


def test_validate_finds_an_out_of_range_index(tmp_path: Path) -> None:
    out = write_dataset(make_dataset(), tmp_path / "toy")

    def corrupt(table: pa.Table) -> pa.Table:
        idx = table.column("img_b").to_numpy().copy()
        idx[4] = 5  # the image pool has 5 rows
        i = table.column_names.index("img_b")
        return table.set_column(i, "img_b", pa.array(idx))

    _rewrite_samples(out, corrupt)
    problems = validate_dataset(out)
    assert len(problems) == 1 and "img_b" in problems[0] and "sample 4" in problems[0]


def test_validate_finds_nan_in_a_float_pool(tmp_path: Path) -> None:
    problems = validate_dataset(write_dataset(make_dataset(seq_nan=True), tmp_path / "toy"))
    assert problems == ["modality 'seq': pool holds NaN or inf"]


def test_validate_finds_nan_labels_and_bad_classes(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.labels["reg"][2] = float("inf")
    ds.labels["cls"][0] = 3
    problems = validate_dataset(write_dataset(ds, tmp_path / "toy"))
    assert any("'reg'" in p and "NaN or inf" in p for p in problems)
    assert any("'cls'" in p and "outside [0, 3)" in p for p in problems)


def test_validate_and_read_report_a_missing_file(tmp_path: Path) -> None:
    out = write_dataset(make_dataset(), tmp_path / "toy")
    (out / "modality-seq.parquet").unlink()
    problems = validate_dataset(out)
    assert len(problems) == 1 and "missing modality-seq.parquet" in problems[0]
    with pytest.raises(DatasetFormatError, match="modality-seq.parquet"):
        read_dataset(out)
    (out / "samples.parquet").unlink()
    assert "missing samples.parquet" in validate_dataset(out)[0]
    assert validate_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} is not a directory"]


def test_validate_finds_a_schema_mismatch(tmp_path: Path) -> None:
    out = write_dataset(make_dataset(), tmp_path / "toy")

    def lie_about_shape(table: pa.Table) -> pa.Table:
        schema = json.loads(table.schema.metadata[b"commlab"])
        schema["modalities"][0]["shape"] = [3, 8, 8]
        schema["modalities"][1]["shape"] = [3, 8, 8]
        return table.replace_schema_metadata({b"commlab": json.dumps(schema)})

    f = out / "samples.parquet"
    table = lie_about_shape(pq.read_table(f))
    pq.write_table(table, f)
    problems = validate_dataset(out)
    assert len(problems) == 1 and "FixedSizeList of 192" in problems[0]
    with pytest.raises(DatasetFormatError):
        read_dataset(out)


def test_validate_finds_an_empty_split(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.splits["extra"] = torch.zeros(0, dtype=torch.long)
    assert validate_dataset(write_dataset(ds, tmp_path / "toy")) == ["split 'extra' is empty"]


def test_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = parquet._write_pool
    calls = []

    def failing(m, path):
        calls.append(m.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(m, path)

    monkeypatch.setattr(parquet, "_write_pool", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(make_dataset(), tmp_path / "toy")
    assert calls == ["img_a", "seq"]
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write_dataset(make_dataset(), tmp_path / "toy")
    with pytest.raises(FileExistsError):
        write_dataset(make_dataset(), out)

    def failing(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(parquet, "_write_pool", failing)
    with pytest.raises(RuntimeError):
        write_dataset(make_dataset(), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    assert validate_dataset(out) == []
    monkeypatch.undo()
    ds = make_dataset()
    ds.fingerprint = "new"
    write_dataset(ds, out, overwrite=True)
    assert read_schema(out)["fingerprint"] == "new" and [p.name for p in tmp_path.iterdir()] == [
        "toy"
    ]


def test_writer_rejects_what_it_cannot_store(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.splits["val"] = torch.tensor([5, 6])  # 5 is also in train
    with pytest.raises(ValueError, match="disjoint"):
        write_dataset(ds, tmp_path / "a")
    ds = make_dataset()
    ds.modalities[4].values = ds.modalities[4].values.to(torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        write_dataset(ds, tmp_path / "b")
    ds = make_dataset()
    ds.labels["seq"] = torch.zeros(N)
    with pytest.raises(ValueError, match="'seq' is used twice"):
        write_dataset(ds, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int16, torch.int32, torch.float16, torch.float64, torch.bool]
)
def test_pool_dtypes_survive(tmp_path: Path, dtype: torch.dtype) -> None:
    values = (torch.arange(24).reshape(4, 6) % 2).to(dtype)
    ds = MultimodalDataset(
        [Modality("x", "tabular", values, torch.tensor([3, 0, 1]))],
        labels={"y": torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)},
        tasks={"y": Task("y", "regression")},
        splits={"train": torch.tensor([0, 2]), "test": torch.tensor([1])},
    )
    back = read_dataset(write_dataset(ds, tmp_path / "d"))
    assert back.modalities[0].values.dtype == dtype and torch.equal(
        back.modalities[0].values, values
    )
    assert back.labels["y"].dtype == torch.float64


def test_written_dataset_has_ordinary_permissions(tmp_path: Path) -> None:
    """Written through a private temp dir (mkdtemp: 0700), the finished dataset is as readable
    as anything else the user writes (the umask decides), e.g. by a Ray node's user."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = write_dataset(make_dataset(), tmp_path / "ds")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files)
