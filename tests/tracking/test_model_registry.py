"""Promotion, lineage, loading and embedding against a real sqlite MLflow store (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from commlab.cli import app
from commlab.data.parquet import read_dataset
from commlab.pretrained import Encoder, embed_dataset, load_encoder
from commlab.tracking.model_registry import (
    PromotionError,
    check_alias,
    check_model_name,
    fetch_model,
    model_versions,
    promote,
)
from commlab.tracking.query import QueryError
from commlab.train.checkpoint import load_checkpoint
from tests.tracking.conftest import METRIC, TrialSpec, make_sweep, standard_trials

runner = CliRunner()
MODEL = "toy-encoder"


@pytest.fixture
def sweep(sqlite_uri, trained):
    return make_sweep(sqlite_uri, "toy-sweep", standard_trials(trained), best_trial="t2")


@pytest.fixture
def batch(trained):
    return read_dataset(trained.dataset).batch(torch.arange(0, 96, 3))


def test_promote_registers_the_best_finished_trial_with_lineage(sqlite_uri, sweep, trained):
    client = MlflowClient(sqlite_uri)
    t0_before = client.get_run(sweep.trials["t0"]).info
    p = promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    # t2 is better but KILLED; t0 beats t1 by its best value (0.7 > 0.68)
    assert (p.trial_id, p.trial_run_id, p.value) == ("t0", sweep.trials["t0"], 0.7)
    assert (p.version, p.alias, p.created) == (1, "champion", True)
    assert (p.metric, p.mode, p.sweep_run_id) == (METRIC, "max", sweep.run_id)
    assert p.uri == f"models:/{MODEL}@champion"
    assert p.model_id and p.model_id.startswith("m-")

    ckpt = load_checkpoint(trained.checkpoints[1])
    (v,) = model_versions(MODEL, sqlite_uri)
    assert v["aliases"] == ["champion"] and v["run_id"] == sweep.trials["t0"]
    assert v["tags"] == {
        "commlab.sweep": "toy-sweep",
        "commlab.sweep_run_id": sweep.run_id,
        "commlab.trial_run_id": sweep.trials["t0"],
        "commlab.trial_id": "t0",
        "commlab.metric": METRIC,
        "commlab.mode": "max",
        "commlab.metric_value": "0.7",
        "commlab.data_fingerprint": ckpt["data_fingerprint"],
        "commlab.code_version": ckpt["code_version"],
        "commlab.method": "comm",
        "commlab.epochs": "2",
        "commlab.seed": "0",
    }
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1
    logged = client.get_logged_model(p.model_id)
    assert logged.source_run_id == sweep.trials["t0"]
    # the trial run is left as it was
    t0_after = client.get_run(sweep.trials["t0"]).info
    assert (t0_after.status, t0_after.end_time) == (t0_before.status, t0_before.end_time)


def test_promotion_is_idempotent(sqlite_uri, sweep):
    client = MlflowClient(sqlite_uri)
    first = promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    again = promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    assert (again.version, again.created) == (first.version, False)
    assert len(model_versions(MODEL, sqlite_uri)) == 1
    # another alias on the same trial: same version, both aliases
    staging = promote("toy-sweep", MODEL, alias="staging", tracking_uri=sqlite_uri)
    assert (staging.version, staging.created) == (1, False)
    assert model_versions(MODEL, sqlite_uri)[0]["aliases"] == ["champion", "staging"]
    # a removed alias is set again, still without a new version
    client.delete_registered_model_alias(MODEL, "champion")
    assert promote("toy-sweep", MODEL, tracking_uri=sqlite_uri).created is False
    assert client.get_registered_model(MODEL).aliases == {"champion": 1, "staging": 1}
    assert len(model_versions(MODEL, sqlite_uri)) == 1


def test_a_new_best_trial_gets_a_new_version_and_the_alias(sqlite_uri, sweep, trained):
    promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    better = make_sweep(
        sqlite_uri,
        "second",
        [TrialSpec("s0", history=[0.95], checkpoint=trained.checkpoints[0])],
        best_trial="s0",
    )
    p = promote("second", MODEL, tracking_uri=sqlite_uri)
    assert (p.version, p.created, p.trial_run_id) == (2, True, better.trials["s0"])
    assert MlflowClient(sqlite_uri).get_registered_model(MODEL).aliases == {"champion": 2}
    assert [v["aliases"] for v in model_versions(MODEL, sqlite_uri)] == [[], ["champion"]]


def test_promote_by_another_metric_needs_a_mode(sqlite_uri, sweep):
    with pytest.raises(PromotionError, match="--mode max|min is needed to rank by 'train/loss'"):
        promote("toy-sweep", MODEL, metric="train/loss", tracking_uri=sqlite_uri)
    p = promote("toy-sweep", MODEL, metric="train/loss", mode="min", tracking_uri=sqlite_uri)
    assert (p.trial_id, p.metric, p.value) == ("t0", "train/loss", 3.0)
    # the sweep's own metric, explicitly, with the opposite mode
    p = promote("toy-sweep", "worst", metric=METRIC, mode="min", tracking_uri=sqlite_uri)
    assert p.trial_id == "t0"  # t0's worst (0.5) is lower than t1's (0.65)


def test_loaded_encoder_embeds_like_the_trial_checkpoint(sqlite_uri, sweep, trained, batch):
    promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    reference = load_encoder(trained.checkpoints[1])
    expected = reference.embed(batch)
    assert expected.shape == (32, 16) and torch.isfinite(expected).all()
    t0 = sweep.trials["t0"]
    for source in (
        f"models:/{MODEL}@champion",
        f"models:/{MODEL}/1",
        t0,
        f"runs:/{t0}",
        f"runs:/{t0}/checkpoint/checkpoint.pt",
    ):
        enc = load_encoder(source, tracking_uri=sqlite_uri)
        assert isinstance(enc, Encoder) and not enc.training and not enc.method.training
        assert torch.equal(enc.embed(batch), expected), source
        assert enc.meta["data_fingerprint"] == "toy" and enc.meta["source"] == source
    # the checkpoint's training state is not part of the promoted model
    model_dir = fetch_model(
        f"models:/{MODEL}@champion", sqlite_uri.removeprefix("sqlite:///") + ".dl", sqlite_uri
    )
    promoted = load_checkpoint(model_dir / "data" / "encoder" / "checkpoint.pt")
    assert "optimizer" not in promoted and "rng" not in promoted
    assert (model_dir / "data" / "encoder" / "config.yaml").read_text().startswith("name: toy")
    assert (
        json.loads((model_dir / "data" / "encoder" / "lineage.json").read_text())[
            "commlab.trial_run_id"
        ]
        == t0
    )
    # a downloaded model directory is a local source too
    assert torch.equal(load_encoder(model_dir).embed(batch), expected)


def test_pyfunc_flavour_predicts_embeddings(sqlite_uri, sweep, trained, batch, tmp_path):
    import mlflow.pyfunc

    promote("toy-sweep", MODEL, tracking_uri=sqlite_uri)
    model_dir = fetch_model(f"models:/{MODEL}@champion", tmp_path / "model", sqlite_uri)
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    inputs = {}
    for m, x, pad in zip(("a", "b"), batch.xs, batch.pad, strict=True):
        inputs[m] = x.numpy()
        inputs[f"{m}.lengths"] = (~pad).sum(1).numpy()
    out = pyfunc.predict(inputs)
    expected = load_encoder(trained.checkpoints[1]).embed(batch).numpy()
    assert out.shape == expected.shape
    assert torch.allclose(torch.from_numpy(out), torch.from_numpy(expected), atol=1e-6)


def test_embed_dataset_writes_parquet(trained, tmp_path):
    enc = load_encoder(trained.checkpoints[1])
    ds = read_dataset(trained.dataset)
    out = tmp_path / "emb" / "toy.parquet"
    result = embed_dataset(enc, trained.dataset, out, batch_size=10, progress=False)
    assert (result.rows, result.dim, result.path) == (96, 16, out)
    table = pq.read_table(out)
    assert table.column_names == ["sample_id", "split", "embedding"]
    etype = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.list_size == 16
    assert etype.value_type == pa.float32()
    assert table.schema.field("sample_id").type == pa.int64()
    assert table.column("sample_id").to_pylist() == list(range(96))
    splits = table.column("split").to_pylist()
    assert splits[:72] == ["train"] * 72 and splits[72:] == ["test"] * 24
    emb = torch.tensor(table.column("embedding").to_pylist())
    assert torch.allclose(emb, enc.embed(ds.batch(torch.arange(96))), atol=1e-5)
    meta = json.loads(table.schema.metadata[b"commlab"])
    assert meta["dim"] == 16 and meta["dataset_fingerprint"] == ds.fingerprint
    test_only = embed_dataset(enc, trained.dataset, tmp_path / "t.parquet", splits=["test"])
    assert test_only.rows == 24
    with pytest.raises(ValueError, match="no split"):
        embed_dataset(enc, trained.dataset, tmp_path / "x.parquet", splits=["val"])
    assert not (tmp_path / "x.parquet").exists()


def test_cli_promote_and_embed(sqlite_uri, sweep, trained, tmp_path):
    args = ["promote", "--sweep", "toy-sweep", "--model", MODEL, "--tracking-uri", sqlite_uri]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["version"], doc["trial_id"], doc["created"]) == (1, "t0", True)
    assert doc["uri"] == f"models:/{MODEL}@champion"
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "already registered as version 1" in " ".join(result.stdout.split())

    out = tmp_path / "emb.parquet"
    result = runner.invoke(
        app,
        ["embed", f"models:/{MODEL}@champion", str(trained.dataset), "--out", str(out),
         "--tracking-uri", sqlite_uri, "--split", "test", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 24

    result = runner.invoke(app, [*args[:3], "--model", "bad/name", "--tracking-uri", sqlite_uri])
    assert result.exit_code == 2 and "must not contain /" in result.stderr
    result = runner.invoke(
        app, ["embed", "models:/nope@champion", str(trained.dataset), "--out", str(out),
              "--tracking-uri", sqlite_uri],
    )  # fmt: skip
    assert result.exit_code == 2 and "nope" in result.stderr


# ---------------------------------------------------------------- errors
def test_no_finished_trials(sqlite_uri):
    make_sweep(
        sqlite_uri,
        "stopped",
        [TrialSpec("a", status="KILLED", history=[0.8]), TrialSpec("b", status="FAILED"),
         TrialSpec("c", status="RUNNING", history=[0.1])],
    )  # fmt: skip
    with pytest.raises(
        PromotionError, match=r"no FINISHED trials \(1 FAILED, 1 KILLED, 1 RUNNING\)"
    ):
        promote("stopped", MODEL, tracking_uri=sqlite_uri)
    make_sweep(sqlite_uri, "empty", [])
    with pytest.raises(PromotionError, match="has no trials"):
        promote("empty", MODEL, tracking_uri=sqlite_uri)


def test_metric_missing(sqlite_uri):
    make_sweep(sqlite_uri, "unprobed", [TrialSpec("a", history=[0.5], metric="val/other")])
    with pytest.raises(PromotionError, match=rf"metric '{METRIC}' is missing.*'val/other'"):
        promote("unprobed", MODEL, tracking_uri=sqlite_uri)
    with pytest.raises(PromotionError, match="metric 'probe/nope' is missing"):
        promote("unprobed", MODEL, metric="probe/nope", mode="max", tracking_uri=sqlite_uri)


def test_checkpoint_missing(sqlite_uri, trained):
    make_sweep(
        sqlite_uri,
        "no-ckpt",
        [TrialSpec("a", history=[0.9]), TrialSpec("b", history=[0.5], checkpoint=trained.checkpoints[0])],
    )  # fmt: skip
    with pytest.raises(
        PromotionError,
        match=r"trial a \(run \w+\) has no checkpoint artifact checkpoint/checkpoint.pt",
    ):
        promote("no-ckpt", MODEL, tracking_uri=sqlite_uri)
    assert MlflowClient(sqlite_uri).search_registered_models() == []


def test_unknown_sweep(sqlite_uri):
    with pytest.raises(QueryError, match="no sweep named 'nope'"):
        promote("nope", MODEL, tracking_uri=sqlite_uri)


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("   ", "empty"), ("a/b", "must not contain /"), ("a:b", "must not contain :"),
     ("a@b", "must not contain @"), ("it's", "must not contain '"), (".", "resolve"), ("..x", "resolve"), ("a/../b", "/"),
     ("x ", "whitespace"), ("x" * 300, "longer than")],
)  # fmt: skip
def test_invalid_model_names_fail_before_any_mlflow_call(name, why):
    with pytest.raises(PromotionError, match=why):
        check_model_name(name)
    # nothing listens on port 9: reaching MLflow would fail differently
    with pytest.raises(PromotionError, match=why):
        promote("any", name, tracking_uri="http://127.0.0.1:9")


@pytest.mark.parametrize("alias", ["", "v1", "V12", "latest", "has space", "a/b"])
def test_invalid_aliases(alias):
    with pytest.raises(PromotionError, match="alias"):
        check_alias(alias)
    with pytest.raises(PromotionError, match="alias"):
        promote("any", MODEL, alias=alias, tracking_uri="http://127.0.0.1:9")


def test_valid_names_pass():
    for name in ("comm-encoder", "team.comm_encoder v2", "CoMM"):
        check_model_name(name)
    for alias in ("champion", "challenger-2", "prod_eu", "v1x"):
        check_alias(alias)


def test_load_encoder_errors(sqlite_uri, trained, tmp_path, batch):
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.pt"):
        load_encoder(tmp_path / "empty")
    with pytest.raises(LookupError, match="models:/nope@champion"):
        load_encoder("models:/nope@champion", tracking_uri=sqlite_uri)
    with pytest.raises(ValueError, match="give an alias"):
        load_encoder("models:/nope", tracking_uri=sqlite_uri)
    ckpt = load_checkpoint(trained.checkpoints[0])
    del ckpt["modalities"]
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="no 'modalities'"):
        load_encoder(tmp_path / "old.pt")
    enc = load_encoder(trained.checkpoints[0])
    with pytest.raises(ValueError, match="batch has 1 modalities, the encoder takes 2"):
        enc.embed(type(batch)(xs=batch.xs[:1], pad=batch.pad[:1]))
    wrong = type(batch)(xs=[batch.xs[0][..., :3], batch.xs[1]], pad=batch.pad)
    with pytest.raises(ValueError, match="modality 'a'"):
        enc.embed(wrong)


def test_import_commlab_stays_cheap():
    code = (
        "import sys, commlab; "
        "assert not {'torch', 'mlflow', 'ray'} & set(sys.modules), sorted(sys.modules); "
        "from commlab import load_encoder; assert callable(load_encoder); "
        "assert 'torch' in sys.modules and 'mlflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
