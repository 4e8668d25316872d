"""`commlab data import`: thin wiring to `import_dataset`, with clear failures."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from commlab.cli import app
from commlab.data.parquet import read_dataset, read_schema, validate_dataset

from .fixtures import write_affect_pickle, write_mimic_pickle
from .helpers import assert_nothing_written

runner = CliRunner()


def text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_import_affect_with_options(tmp_path: Path) -> None:
    src = write_affect_pickle(tmp_path / "humor.pkl", "humor")
    out = tmp_path / "humor"
    args = ["data", "import", "humor", str(src), "--out", str(out), "--no-progress"]
    result = runner.invoke(app, [*args, "--modalities", "audio,text", "-o", "nonfinite=zero"])
    assert result.exit_code == 0, result.output
    assert validate_dataset(out) == []
    assert read_dataset(out).names == ["audio", "text"]
    assert read_schema(out)["params"]["options"]["nonfinite"] == "zero"
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in text(again)


def test_import_mimic_task(tmp_path: Path) -> None:
    src = write_mimic_pickle(tmp_path / "im.pk")
    out = tmp_path / "mimic"
    result = runner.invoke(
        app, ["data", "import", "mimic", str(src), "--out", str(out), "--task", "-1"]
    )
    assert result.exit_code == 0, result.output
    assert list(read_dataset(out).tasks) == ["mortality"]


def test_malformed_source_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    out = tmp_path / "out"
    result = runner.invoke(app, ["data", "import", "mosi", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "not a readable pickle" in text(result)
    assert_nothing_written(out)


def test_unknown_importer_and_option(tmp_path: Path) -> None:
    src = write_mimic_pickle(tmp_path / "im.pk")
    result = runner.invoke(app, ["data", "import", "imagenet", str(src), "--out", "x"])
    assert result.exit_code == 2 and "unknown importer 'imagenet'" in text(result)
    result = runner.invoke(
        app, ["data", "import", "mimic", str(src), "--out", "x", "--image-size", "3"]
    )
    assert result.exit_code == 2 and "no option(s) image_size" in text(result)


def test_help_says_pickles_are_loaded_restricted() -> None:
    result = runner.invoke(app, ["data", "import", "--help"])
    assert result.exit_code == 0
    assert "restricted unpickler" in text(result) and "refused" in text(result)
