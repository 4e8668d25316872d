"""Dataset pickles are read with a restricted unpickler: code named in a pickle never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from commlab.cli import app
from commlab.data.importers.common import UnsafePickleError, load_pickle

from .fixtures import write_affect_pickle


class _RunsACommand:
    """What a malicious "dataset" pickle does: have the unpickler call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsACommand, _CallsEval])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(payload, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "mosi_data.pkl"
    src.write_bytes(pickle.dumps({"train": {"vision": payload(marker)}}))
    with pytest.raises(UnsafePickleError, match="refused to load"):
        load_pickle(src)
    assert not marker.exists()

    result = CliRunner().invoke(
        app, ["data", "import", "mosi", str(src), "--out", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 2
    msg = " ".join(result.output.split())
    assert "refused to load" in msg and (
        "os.system" in msg or "posix.system" in msg or "eval" in msg
    )
    assert "Traceback" not in result.output
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_numpy_and_builtin_pickles_still_load(protocol: int, tmp_path: Path) -> None:
    from collections import OrderedDict

    data = {
        "train": OrderedDict(
            vision=np.arange(12, dtype=np.float32).reshape(3, 4),
            labels=np.array([[1], [0], [1]], dtype=np.int64),
            id=np.array([b"a", b"b", b"c"]),
        ),
        "meta": [np.float64(0.5), {1, 2}, (3, "x"), b"raw"],
    }
    src = tmp_path / "ok.pkl"
    src.write_bytes(pickle.dumps(data, protocol=protocol))
    back = load_pickle(src)
    np.testing.assert_array_equal(back["train"]["vision"], data["train"]["vision"])
    assert back["meta"][1] == {1, 2} and back["meta"][0] == 0.5


def test_published_style_affect_pickle_imports(tmp_path: Path) -> None:
    src = write_affect_pickle(tmp_path / "mosi.pkl")
    result = CliRunner().invoke(
        app, ["data", "import", "mosi", str(src), "--out", str(tmp_path / "mosi"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mosi" / "schema.json").is_file() or any((tmp_path / "mosi").iterdir())
