import json

import pytest

from commlab.report import CHANCE, format_rus_table, rus_from_metrics, write_rus_report

METRICS = {
    "probe/share/balanced_acc": 0.999,
    "probe/unique1/balanced_acc": 0.878,
    "probe/unique2/balanced_acc": 0.5,
    "probe/synergy/balanced_acc": 0.719,
    "probe/share/acc": 0.1,
    "probe/mean/balanced_acc": 0.77,
}


def test_rus_from_metrics_maps_tasks_to_axes():
    assert rus_from_metrics(METRICS) == {"redundancy": 0.999, "uniqueness": 0.878, "synergy": 0.719}


def test_rus_from_metrics_partial_and_absent():
    assert rus_from_metrics({"probe/synergy/balanced_acc": 0.6}) == {"synergy": 0.6}
    assert rus_from_metrics({"probe/share/acc": 0.9, "train/loss": 1.0}) is None
    assert rus_from_metrics({}) is None


def test_write_rus_report_files(tmp_path):
    rus = {"redundancy": 0.999, "uniqueness": 0.878, "synergy": 0.719}
    paths = write_rus_report(rus, tmp_path / "nested" / "out", title="CoMM on Trifeatures")
    assert set(paths) == {"json", "md", "png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads(paths["json"].read_text())
    assert doc["rus"] == rus and doc["title"] == "CoMM on Trifeatures"
    assert doc["chance"] == CHANCE

    md = paths["md"].read_text()
    assert md.startswith("# CoMM on Trifeatures")
    for row in ("| redundancy | share | 99.9 | 10 |", "| uniqueness | unique1 | 87.8 | 10 |"):
        assert row in md
    assert "| synergy | synergy | 71.9 | 50 |" in md


def test_write_rus_report_partial(tmp_path):
    paths = write_rus_report({"synergy": 0.5}, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["rus"] == {"synergy": 0.5} and doc["chance"] == {"synergy": 0.5}
    assert "redundancy" not in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("rus", "match"),
    [
        ({}, "empty"),
        ({"redundancy": 99.9}, "not a fraction"),
        ({"novelty": 0.5}, "unknown axes.*redundancy, uniqueness, synergy"),
    ],
)
def test_write_rus_report_errors(tmp_path, rus, match):
    with pytest.raises(ValueError, match=match):
        write_rus_report(rus, tmp_path)


def test_format_rus_table_mean_std():
    table = format_rus_table(
        {
            "CoMM": {"redundancy": [0.99, 1.0, 0.98], "uniqueness": [0.8, 0.9], "synergy": 0.7},
            "Cross": {"redundancy": [1.0], "synergy": [0.5, 0.5]},
        }
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| method | redundancy | uniqueness | synergy |"
    assert lines[2] == "| CoMM | 99.0 ± 1.0 | 85.0 ± 7.1 | 70.0 |"
    assert lines[3] == "| Cross | 100.0 | - | 50.0 ± 0.0 |"
    assert lines[4] == "| chance | 10.0 | 10.0 | 50.0 |"


def test_format_rus_table_columns_and_errors():
    table = format_rus_table({"A": {"synergy": 0.6}}, chance_row=False)
    assert table == "| method | synergy |\n|---|---:|\n| A | 60.0 |\n"
    with pytest.raises(ValueError, match="at least one row"):
        format_rus_table({})
    with pytest.raises(ValueError, match="row 'A': unknown axes"):
        format_rus_table({"A": {"speed": 1.0}})
    with pytest.raises(ValueError, match="empty list"):
        format_rus_table({"A": {"synergy": []}})
