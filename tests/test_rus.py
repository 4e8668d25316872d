import json

import pytest

from commlab.data.base import Task
from commlab.rus import RusReport, format_rus_table, rus_from_metrics, rus_report

METRICS = {
    "probe/share/balanced_acc": 0.999,
    "probe/unique1/balanced_acc": 0.878,
    "probe/unique2/balanced_acc": 0.5,
    "probe/synergy/balanced_acc": 0.719,
    "probe/synergy/roc_auc": 0.8,
    "probe/colour1/balanced_acc": 0.95,
    "probe/share/acc": 0.1,
    "probe/mean/balanced_acc": 0.77,
}
TASKS = {
    "share": Task("share", "multiclass", 10),
    "unique1": Task("unique1", "multiclass", 10),
    "unique2": Task("unique2", "multiclass", 10),
    "synergy": Task("synergy", "binary", 2),
    "colour1": Task("colour1", "multiclass", 5, diagnostic=True),
}


def test_rus_from_metrics_maps_tasks_to_axes():
    assert rus_from_metrics(METRICS) == {"redundancy": 0.999, "uniqueness": 0.878, "synergy": 0.719}


def test_rus_from_metrics_partial_and_absent():
    assert rus_from_metrics({"probe/synergy/balanced_acc": 0.6}) == {"synergy": 0.6}
    assert rus_from_metrics({"probe/unique/balanced_acc": 0.7}) == {"uniqueness": 0.7}
    assert rus_from_metrics({"probe/share/acc": 0.9, "train/loss": 1.0}) is None
    assert rus_from_metrics({}) is None


def test_rus_report_chance_comes_from_the_tasks():
    report = rus_report(METRICS, TASKS)
    assert report is not None
    assert report.rus == {"redundancy": 0.999, "uniqueness": 0.878, "synergy": 0.719}
    assert report.chance == {"redundancy": 0.1, "uniqueness": 0.1, "synergy": 0.5}
    # a dataset with 4 shapes and 3-class uniqueness has other chance levels
    other = {
        **TASKS,
        "share": Task("share", "multiclass", 4),
        "unique1": Task("unique1", "multiclass", 3),
    }
    assert rus_report(METRICS, other).chance == {
        "redundancy": 0.25,
        "uniqueness": 1 / 3,
        "synergy": 0.5,
    }
    # every classification probe is listed, diagnostic tasks included, AUC where logged
    assert set(report.probes) == {"share", "unique1", "unique2", "synergy", "colour1"}
    assert report.probes["colour1"] == {"balanced_acc": 0.95, "chance": 0.2}
    assert report.probes["synergy"]["roc_auc"] == 0.8
    assert rus_report({"probe/colour1/balanced_acc": 0.9}, TASKS) is None


def test_report_files(tmp_path):
    report = rus_report(METRICS, TASKS)
    paths = report.write(tmp_path / "nested" / "out", title="CoMM on Trifeatures")
    assert set(paths) == {"json", "md", "png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = json.loads(paths["json"].read_text())
    assert doc["rus"] == report.rus and doc["title"] == "CoMM on Trifeatures"
    assert doc["chance"] == {"redundancy": 0.1, "uniqueness": 0.1, "synergy": 0.5}
    assert doc["probes"]["colour1"]["balanced_acc"] == 0.95

    md = paths["md"].read_text()
    assert md.startswith("# CoMM on Trifeatures")
    for row in (
        "| redundancy | share | 99.9 | 10.0 |",
        "| uniqueness | unique1 | 87.8 | 10.0 |",
        "| synergy | synergy | 71.9 | 50.0 |",
        "| colour1 | 95.0 | 20.0 | - |",
        "| synergy | 71.9 | 50.0 | 0.800 |",
    ):
        assert row in md


def test_report_partial(tmp_path):
    report = rus_report({"probe/synergy/balanced_acc": 0.5}, TASKS)
    paths = report.write(tmp_path)
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
def test_report_errors(tmp_path, rus, match):
    with pytest.raises(ValueError, match=match):
        RusReport(rus, {}).write(tmp_path)


def test_format_rus_table_mean_std():
    table = format_rus_table(
        {
            "CoMM": {"redundancy": [0.99, 1.0, 0.98], "uniqueness": [0.8, 0.9], "synergy": 0.7},
            "Cross": {"redundancy": [1.0], "synergy": [0.5, 0.5]},
        },
        chance={"redundancy": 0.1, "uniqueness": 0.1, "synergy": 0.5},
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| method | redundancy | uniqueness | synergy |"
    assert lines[2] == "| CoMM | 99.0 ± 1.0 | 85.0 ± 7.1 | 70.0 |"
    assert lines[3] == "| Cross | 100.0 | - | 50.0 ± 0.0 |"
    assert lines[4] == "| chance | 10.0 | 10.0 | 50.0 |"


def test_format_rus_table_columns_and_errors():
    table = format_rus_table({"A": {"synergy": 0.6}})
    assert table == "| method | synergy |\n|---|---:|\n| A | 60.0 |\n"
    with pytest.raises(ValueError, match="at least one row"):
        format_rus_table({})
    with pytest.raises(ValueError, match="row 'A': unknown axes"):
        format_rus_table({"A": {"speed": 1.0}})
    with pytest.raises(ValueError, match="empty list"):
        format_rus_table({"A": {"synergy": []}})
