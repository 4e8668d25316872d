"""The runs table: sweeps and trials read back from a real sqlite MLflow store (no Ray)."""

from __future__ import annotations

import json
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from commlab.cli import app
from commlab.tracking.query import (
    QueryError,
    find_sweep,
    infer_mode,
    list_sweeps,
    sweep_trials,
    sweeps_table,
    trials_table,
    ui_command,
)
from tests.tracking.conftest import METRIC, TrialSpec, make_sweep, standard_trials

runner = CliRunner()


def _text(renderable) -> str:
    console = Console(width=300, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def sweep(sqlite_uri):
    return make_sweep(sqlite_uri, "toy-sweep", standard_trials(), best_trial="t2")


def test_sweeps_listed_newest_first_with_their_tags(sqlite_uri, sweep):
    other = make_sweep(
        sqlite_uri, "loss-sweep", [TrialSpec("x", history=[0.3, 0.2], metric="val/loss")],
        experiment="other", metric="val/loss", mode="min", best_trial="x",
    )  # fmt: skip
    rows = list_sweeps(sqlite_uri)
    assert [r["name"] for r in rows] == ["loss-sweep", "toy-sweep"]
    newest = rows[0]
    assert newest["run_id"] == other.run_id
    assert newest["experiment"] == "other"
    assert (newest["metric"], newest["mode"]) == ("val/loss", "min")
    assert (newest["best_trial_id"], newest["best_metric"]) == ("x", 0.2)
    assert newest["trials"] == 1
    assert newest["status"] == "FINISHED"
    assert newest["duration_s"] >= 0
    assert rows[1]["trials"] == 4
    assert [r["name"] for r in list_sweeps(sqlite_uri, experiment="toy")] == ["toy-sweep"]
    with pytest.raises(QueryError, match="no MLflow experiment named 'nope'"):
        list_sweeps(sqlite_uri, experiment="nope")
    table = _text(sweeps_table(rows, wide=True))
    assert "loss-sweep" in table and "val/loss (min)" in table


def test_trials_ranked_by_the_sweeps_metric_best_over_history(sqlite_uri, sweep):
    data = sweep_trials("toy-sweep", sqlite_uri)
    assert (data["metric"], data["mode"]) == (METRIC, "max")
    trials = data["trials"]
    assert [t["trial_id"] for t in trials] == ["t2", "t0", "t1", "t3"]
    by_id = {t["trial_id"]: t for t in trials}
    # t0 ranks above t1 by its best value although its last one is lower
    assert (by_id["t0"]["value"], by_id["t0"]["last"]) == (0.7, 0.6)
    assert (by_id["t1"]["value"], by_id["t1"]["last"]) == (0.68, 0.68)
    assert by_id["t3"]["value"] is None
    assert [t["status"] for t in trials] == ["KILLED", "FINISHED", "FINISHED", "FAILED"]
    assert by_id["t0"]["params"] == {"optim.lr": 0.001, "loss.temperature": 0.1}
    assert by_id["t0"]["rus"] == {"redundancy": 0.9, "uniqueness": 0.4, "synergy": 0.55}
    assert by_id["t1"]["rus"] == {}
    assert by_id["t0"]["epochs"] == 3 and by_id["t3"]["epochs"] == 0
    assert by_id["t0"]["run_id"] == sweep.trials["t0"]
    assert all(t["duration_s"] is not None and t["duration_s"] >= 0 for t in trials)
    assert data["sweep"]["trials"] == 4 and data["sweep"]["best_trial_id"] == "t2"

    table = _text(trials_table(data, wide=True))
    lines = [line for line in table.splitlines() if line.strip().startswith("│ t")]
    assert [line.split()[1] for line in lines] == ["t2", "t0", "t1", "t3"]
    assert "t2 *" in table  # the sweep's own best trial is marked
    for col in ("RED", "UNI", "SYN", "optim.lr", METRIC):
        assert col in table
    assert "0.7000" in table and "0.900" in table


def test_sort_by_another_metric(sqlite_uri, sweep):
    data = sweep_trials("toy-sweep", sqlite_uri, sort="train/loss")
    assert data["mode"] == "min"  # inferred from the name
    assert [(t["trial_id"], t["value"]) for t in data["trials"]] == [
        ("t0", 3.0), ("t1", 4.0), ("t2", 5.0), ("t3", None),
    ]  # fmt: skip
    data = sweep_trials("toy-sweep", sqlite_uri, sort=METRIC, mode="min")
    assert [t["trial_id"] for t in data["trials"]] == ["t0", "t1", "t2", "t3"]
    with pytest.raises(ValueError, match="mode must be one of"):
        sweep_trials("toy-sweep", sqlite_uri, sort=METRIC, mode="best")


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("train/loss", "min"), ("val/loss", "min"), ("probe/y/mse", "min"),
     ("perf/epoch_time_s", "min"), (METRIC, "max"), ("perf/samples_per_s", "max"),
     ("probe/y/f1_macro", "max")],
)  # fmt: skip
def test_infer_mode(metric, mode):
    assert infer_mode(metric) == mode


def test_find_sweep_by_name_or_run_id_and_clear_errors(sqlite_uri, sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri)
    assert find_sweep(client, "toy-sweep").info.run_id == sweep.run_id
    assert find_sweep(client, sweep.run_id).info.run_id == sweep.run_id
    with pytest.raises(QueryError, match=r"no sweep named 'nope'; sweeps: \['toy-sweep'\]"):
        find_sweep(client, "nope")
    with pytest.raises(QueryError, match="no sweep named"):
        find_sweep(client, sweep.trials["t0"])  # a run id, but not a sweep's
    # a namesake without trials (its driver died before any started) is not ambiguous
    orphan = make_sweep(sqlite_uri, "toy-sweep", [], experiment="orphans")
    assert find_sweep(client, "toy-sweep").info.run_id == sweep.run_id
    assert orphan.run_id != sweep.run_id
    twin = make_sweep(
        sqlite_uri, "toy-sweep", [TrialSpec("y", history=[0.5])], experiment="elsewhere"
    )
    with pytest.raises(QueryError, match="3 sweeps are named 'toy-sweep'.*--experiment"):
        find_sweep(client, "toy-sweep")
    assert find_sweep(client, "toy-sweep", experiment="elsewhere").info.run_id == twin.run_id


def test_cli_runs_json_and_tables(sqlite_uri, sweep, monkeypatch):
    import commlab.cli

    result = runner.invoke(app, ["runs", "--tracking-uri", sqlite_uri, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["toy-sweep"]

    args = ["runs", "--sweep", "toy-sweep", "--tracking-uri", sqlite_uri]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [t["trial_id"] for t in data["trials"]] == ["t2", "t0", "t1", "t3"]
    result = runner.invoke(app, [*args, "--json", "--sort", "train/loss"])
    assert [t["trial_id"] for t in json.loads(result.stdout)["trials"]][0] == "t0"

    monkeypatch.setattr(commlab.cli, "console", Console(width=300))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "t2 *" in result.stdout and "sorted by the best probe/mean/balanced_acc" in result.stdout
    result = runner.invoke(app, ["runs", "--tracking-uri", sqlite_uri])
    assert result.exit_code == 0 and "toy-sweep" in result.stdout


def test_cli_runs_errors(sqlite_uri, sweep):
    result = runner.invoke(app, ["runs", "--sweep", "nope", "--tracking-uri", sqlite_uri])
    assert result.exit_code == 2
    assert "no sweep named 'nope'" in result.stderr
    result = runner.invoke(app, ["runs", "--sort", METRIC, "--tracking-uri", sqlite_uri])
    assert result.exit_code == 2 and "--sweep" in result.stderr


def test_empty_store_lists_no_sweeps(sqlite_uri):
    assert list_sweeps(sqlite_uri) == []
    result = runner.invoke(app, ["runs", "--tracking-uri", sqlite_uri])
    assert result.exit_code == 0 and "no sweeps yet" in result.stdout


def test_ui_command(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ui_command(uri, "127.0.0.1", 5123)
    assert argv is not None
    assert argv[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--port") + 1] == "5123"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    pg = "postgresql+psycopg2://postgres@127.0.0.1:5432/mlflow"
    assert "--artifacts-destination" not in ui_command(pg)
    assert ui_command("http://127.0.0.1:5000") is None
    with pytest.raises(ValueError, match="not a database URI"):
        ui_command("file:///tmp/mlruns")
    # the default: sqlite:///<cwd>/mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert ui_command()[5] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    # an http store: print its URL, start nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 0 and "http://127.0.0.1:5999" in result.stdout


def test_runs_tables_fit_80_columns_and_wide_shows_everything(sqlite_uri, sweep):
    """At 80 columns every cell of the default tables is whole (no 1-3 character stubs)."""
    from rich.console import Console

    def render(renderable, width):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(renderable)
        return console.export_text()

    data = sweep_trials("toy-sweep", sqlite_uri)
    narrow = render(trials_table(data), 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    rows = [line for line in narrow.splitlines() if line.startswith("│ t")]
    assert [r.split("│")[1].strip() for r in rows] == ["t2 *", "t0", "t1", "t3"]
    assert [r.split("│")[2].strip() for r in rows] == ["KILLED", "FINISHED", "FINISHED", "FAILED"]
    assert "0.7000" in narrow and "--wide" in narrow
    sweeps = render(sweeps_table(list_sweeps(sqlite_uri)), 80)
    assert max(len(line) for line in sweeps.splitlines()) <= 80
    assert "toy-sweep" in sweeps and "FINISHED" in sweeps
    wide = render(trials_table(data, wide=True), 300)
    assert sweep.trials["t0"] in wide and "optim.lr" in wide


def test_early_stopped_trials_show_as_stopped_not_failed(sqlite_uri, sweep):
    from mlflow.tracking import MlflowClient

    MlflowClient(sqlite_uri).set_tag(sweep.trials["t1"], "commlab.stopped_early", "true")
    data = sweep_trials("toy-sweep", sqlite_uri)
    t1 = next(t for t in data["trials"] if t["trial_id"] == "t1")
    assert t1["status"] == "FINISHED" and t1["stopped_early"]
    assert "STOPPED" in _text(trials_table(data))
