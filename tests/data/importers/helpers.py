"""Assertions shared by the importer tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from commlab.data.importers import SourceFormatError, import_dataset


def assert_nothing_written(out: Path) -> None:
    """Neither the dataset directory nor a temporary sibling of it exists."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def assert_import_fails(name: str, src: Path, out: Path, *words: str, **options: object) -> str:
    """The import raises one SourceFormatError naming the source file and `words`; no output."""
    with pytest.raises(SourceFormatError) as info:
        import_dataset(name, src, out, progress=False, **options)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert_nothing_written(out)
    return msg


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def assert_trained(metrics: dict[str, float], *probe_keys: str) -> None:
    assert math.isfinite(metrics["train/loss"])
    for k in probe_keys:
        assert k in metrics and math.isfinite(metrics[k]), k
