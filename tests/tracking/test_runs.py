"""tracking.runs against a real sqlite store: tags, probe hyperparameters, reopened runs."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from commlab.tracking.runs import RunLogger, finish_run, open_run


def test_probe_hyperparameters_are_tags_not_metrics(sqlite_uri):
    ref, _ = open_run(sqlite_uri, "probe-tags", "k1", "r1", params={"a": 1})
    logger = RunLogger(ref)
    for epoch, c in enumerate([0.1, 10.0]):
        logger.log_epoch(
            epoch,
            {
                "probe/shape/balanced_acc": 0.5 + epoch / 10,
                "probe/shape/C": c,
                "probe/size/alpha": 3.0,
                "train/loss": 1.0,
            },
        )
    run = MlflowClient(sqlite_uri).get_run(ref.run_id)
    assert "probe/shape/C" not in run.data.metrics and "probe/size/alpha" not in run.data.metrics
    assert run.data.metrics["probe/shape/balanced_acc"] == 0.6
    assert run.data.tags["commlab.probe.shape.C"] == "10"
    assert run.data.tags["commlab.probe.size.alpha"] == "3"


def test_non_string_tags_are_stored_as_strings(sqlite_uri):
    ref, _ = open_run(sqlite_uri, "tag-types", "k2", "r2", params={}, tags={"commlab.workers": 0})
    assert MlflowClient(sqlite_uri).get_run(ref.run_id).data.tags["commlab.workers"] == "0"
    finish_run(ref, "FINISHED")


def test_embeddings_file_has_ordinary_permissions(trained, tmp_path):
    """`commlab embed` writes through a private temp file (mkstemp: 0600); the finished file
    gets the permissions the umask gives any other file."""
    import os
    import stat

    from typer.testing import CliRunner

    from commlab.cli import app

    out = tmp_path / "emb.parquet"
    old = os.umask(0o022)
    try:
        args = ["embed", str(trained.checkpoints[-1]), str(trained.dataset), "--out", str(out)]
        res = CliRunner().invoke(app, [*args, "--no-progress"])
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
