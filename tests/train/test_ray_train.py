"""Pretraining on Ray Train (V2) with real Ray on CPU (gloo), plus synced BatchNorm on gloo.

The Ray tests share one local Ray (tests/train/conftest.py) and each uses a fresh storage path
and sqlite MLflow store in its tmp_path, because Ray Train silently resumes a run whose
(storage_path, name) repeat.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from commlab.config import ExperimentConfig, flatten
from commlab.data.base import Batch
from commlab.models import build_method
from commlab.models.norm import GlobalBatchNorm, batch_norm_groups, sync_batchnorm
from commlab.train.checkpoint import FORMAT, load_checkpoint
from commlab.train.loop import NonFiniteLossError, PretrainRun, WorkerContext
from commlab.train.trainer import (
    REPORT_POLL_ENV,
    REPORT_POLL_S,
    NonFiniteRunError,
    PretrainFailedError,
    RayTrainSettings,
    build_trainer,
    pretrain_ray,
    resolve_run_name,
)
from commlab.train.worker import build_run
from tests.conftest import toy_config
from tests.gloo import run_on_workers
from tests.train.conftest import ray_config

# 4 epochs, warmup + cosine, clipping: resuming must restore the schedule, not restart it.
RESUME_CFG = (
    "train.epochs=4",
    "train.probe_every=2",
    "optim.scheduler=cosine",
    "optim.warmup_epochs=1",
    "optim.grad_clip=1.0",
)


# ---------------------------------------------------------------- helpers
def _runs(settings: RayTrainSettings) -> list[Any]:
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(settings: RayTrainSettings, run_id: str, key: str) -> list[int]:
    history = MlflowClient(settings.tracking_uri).get_metric_history(run_id, key)
    return sorted(int(m.step) for m in history)


def _weights(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(checkpoint_dir) / "checkpoint.pt")["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def straight_run(ray_local, toy_parquet, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of 4 uninterrupted epochs on 2 workers (the reference for resuming)."""
    root = tmp_path_factory.mktemp("straight")
    cfg = ray_config(toy_parquet, *RESUME_CFG)
    res = pretrain_ray(cfg, RayTrainSettings(workers=2, storage_path=str(root), tracking=False))
    assert res.checkpoint is not None
    return _weights(res.checkpoint)


# ---------------------------------------------------------------- end to end
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_workers_end_to_end(ray_local, toy_parquet, settings):
    cfg = ray_config(toy_parquet, "train.epochs=3", "train.probe_every=2")
    res = pretrain_ray(cfg, settings)

    # self-describing checkpoint of the last epoch, plus rank 1's RNG state
    ckpt_dir = Path(res.checkpoint)
    ckpt = load_checkpoint(ckpt_dir / "checkpoint.pt")
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == 3 and ckpt["seed"] == cfg.seed
    assert ExperimentConfig.model_validate(ckpt["config"]) == cfg
    assert ckpt["data_fingerprint"] == "toy" and [m["name"] for m in ckpt["modalities"]] == [
        "a",
        "b",
    ]
    assert ckpt["metrics"]["epoch"] == 2.0 and "probe/cls/balanced_acc" in ckpt["metrics"]
    assert (ckpt_dir / "rng-rank1.pt").is_file()
    assert res.metrics["epoch"] == 2.0
    kept = [p for p in Path(res.run_dir).glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= settings.num_to_keep

    # exactly one MLflow run: params = flattened config, every epoch once, artifacts
    (run,) = _runs(settings)
    assert run.info.run_id == res.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    assert run.data.tags["commlab.workers"] == "2" and run.data.tags["commlab.attempts"] == "1"
    for key in ("train/loss", "train/ssl_acc", "perf/samples_per_s", "perf/mfu", "train/lr"):
        assert _steps(settings, run.info.run_id, key) == [0, 1, 2], key
    assert _steps(settings, run.info.run_id, "probe/cls/balanced_acc") == [1, 2]
    losses = MlflowClient(settings.tracking_uri).get_metric_history(run.info.run_id, "train/loss")
    by_step = {m.step: m.value for m in losses}
    assert by_step[2] < by_step[0]
    assert by_step[2] == pytest.approx(ckpt["metrics"]["train/loss"])
    client = MlflowClient(settings.tracking_uri)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "config.yaml"}
    logged = client.download_artifacts(
        run.info.run_id, "checkpoint/checkpoint.pt", str(ckpt_dir.parent)
    )
    _assert_same_weights(load_checkpoint(logged)["model"], ckpt["model"])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_epochs_are_not_held_to_rays_poll_interval(
    ray_local, toy_parquet, tmp_path, monkeypatch
):
    """Each worker's next report waits until the controller took the previous one, at its next
    poll of the workers; at Ray's default poll (every 2 s) every epoch lasted 2 s. commlab polls
    every REPORT_POLL_S, so epochs of a fraction of a second follow each other that fast."""
    monkeypatch.delenv(REPORT_POLL_ENV, raising=False)  # no test-only setting: commlab's own
    cfg = ray_config(toy_parquet, "train.epochs=6", "train.probe_every=0")
    settings = RayTrainSettings(
        workers=2, storage_path=str(tmp_path), tracking=False, num_to_keep=None
    )
    res = pretrain_ray(cfg, settings)
    assert os.environ[REPORT_POLL_ENV] == str(REPORT_POLL_S)
    ckpts = [load_checkpoint(p / "checkpoint.pt") for p in Path(res.run_dir).glob("checkpoint_*/")]
    created = sorted(c["created_at"] for c in ckpts)
    assert len(created) == 6
    epoch_s = max(c["metrics"]["perf/epoch_time_s"] for c in ckpts)
    assert epoch_s < 0.5  # the epochs themselves are short ...
    gaps = [b - a for a, b in zip(created, created[1:], strict=False)]
    assert statistics.median(gaps) < 1.0, gaps  # ... and so are the intervals between them


# ---------------------------------------------------------------- global batch equivalence
def _first_step(config: dict[str, Any]) -> None:
    """Ray worker: one training step of the real worker setup (DDP, synced BatchNorm,
    gathered negatives); saves views, loss and averaged gradients per rank."""
    import ray.train

    cfg = ExperimentConfig.model_validate(config["cfg"])
    tctx = ray.train.get_context()
    ctx = WorkerContext(tctx.get_world_rank(), tctx.get_world_size(), torch.device("cpu"))
    run = build_run(cfg, ctx)
    init = {k: v.clone() for k, v in run.method.state_dict().items()}
    run.sampler.set_epoch(0)
    order = torch.tensor(list(iter(run.sampler)), dtype=torch.long)
    va, vb = run._views(order[: run.per_rank_batch], torch.Generator().manual_seed(7 + ctx.rank))
    out = run.model(va, vb, gather=True)
    assert not run._backward(out)()  # averaged gradients (DDP or deferred); the loss is finite
    grads = {n: p.grad.clone() for n, p in run.method.named_parameters() if p.grad is not None}
    torch.save(
        {"init": init, "va": va.xs, "vb": vb.xs, "loss": out.loss.detach(), "grads": grads},
        Path(config["out"]) / f"rank{ctx.rank}.pt",
    )
    ray.train.report({"done": 1.0})


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("grad_sync", ["ddp", "deferred"])
def test_global_batch_loss_and_gradient_equal_one_process(
    ray_local, toy_parquet, tmp_path, grad_sync
):
    from ray.train.torch import TorchTrainer

    cfg = ray_config(toy_parquet)
    cfg.train.grad_sync = grad_sync
    settings = RayTrainSettings(workers=2, storage_path=str(tmp_path / "ray"), tracking=False)
    template = build_trainer(cfg, settings, name="first-step", storage_path=settings.storage_path)
    trainer = TorchTrainer(
        _first_step,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "out": str(tmp_path)},
        scaling_config=template.scaling_config,
        run_config=template.run_config,
    )
    trainer.fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # one process, plain BatchNorm, the concatenated global batch in rank order
    from tests.conftest import toy_sequence_dataset  # same data as on disk

    ds = toy_sequence_dataset()
    for m in ds.modalities:
        m.lengths = None
    from commlab.data.base import DataBundle

    single = PretrainRun(cfg, WorkerContext(), data=DataBundle(ds, ds))
    assert not any(isinstance(m, GlobalBatchNorm) for m in single.method.modules())
    single.method.load_state_dict(ranks[0]["init"])
    va = Batch(
        xs=[torch.cat(x) for x in zip(*(r["va"] for r in ranks), strict=True)], pad=[None] * 2
    )
    vb = Batch(
        xs=[torch.cat(x) for x in zip(*(r["vb"] for r in ranks), strict=True)], pad=[None] * 2
    )
    out = single.method.loss(va, vb, gather=False)
    out.loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in single.method.named_parameters() if p.grad is not None}
    assert any(".bn" in n or "net.1" in n for n in grads)  # BatchNorm params take part
    # gradients are O(1); biases feeding BatchNorm have exactly zero gradient, up to ~1e-7 noise
    for r in ranks:
        assert r["grads"].keys() == grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------- resume and faults
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_from_checkpoint_equals_straight_run(straight_run, toy_parquet, settings, tmp_path):
    """2 epochs, then the run dies (max_failures=0); a fresh fit() resumes it for 2 more."""
    cfg = ray_config(toy_parquet, *RESUME_CFG)
    first = settings.model_copy(update={"max_failures": 0, "run_name": "resume"})
    kill = {"kill": {"epoch": 1, "rank": 1, "marker": str(tmp_path / "killed")}}
    with pytest.raises(PretrainFailedError) as info:
        pretrain_ray(cfg, first, hooks=kill)
    (run,) = _runs(settings)
    assert run.info.status == "FAILED" and "commlab.error" in run.data.tags
    assert info.value.checkpoint is not None
    assert load_checkpoint(Path(info.value.checkpoint) / "checkpoint.pt")["epoch"] == 2

    again = settings.model_copy(update={"run_name": "resume", "resume": True})
    res = pretrain_ray(cfg, again)
    _assert_same_weights(_weights(res.checkpoint), straight_run)

    (run,) = _runs(settings)  # the same MLflow run, continued
    assert run.info.run_id == res.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["commlab.resumed_from_epoch"] == "2"
    assert "commlab.error" not in run.data.tags
    assert _steps(settings, run.info.run_id, "train/loss") == [0, 1, 2, 3]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_checkpoint_into_the_same_mlflow_run(
    straight_run, toy_parquet, settings, tmp_path
):
    """Rank 0 is SIGKILLed right after epoch 1's checkpoint is reported and before it logs the
    epoch to MLflow; with max_failures=1 the run restarts, logs epoch 1 from the checkpoint and
    finishes: one MLflow run, each epoch exactly once, same weights as without the failure."""
    cfg = ray_config(toy_parquet, *RESUME_CFG)
    marker = tmp_path / "killed"
    settings = settings.model_copy(update={"max_failures": 1})
    res = pretrain_ray(
        cfg, settings, hooks={"kill": {"epoch": 1, "rank": 0, "marker": str(marker)}}
    )
    assert marker.is_file()  # the kill really happened

    (run,) = _runs(settings)
    assert run.info.run_id == res.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["commlab.attempts"] == "2"
    assert run.data.tags["commlab.resumed_from_epoch"] == "2"
    for key in ("epoch", "train/loss", "perf/samples_per_s"):
        assert _steps(settings, run.info.run_id, key) == [0, 1, 2, 3], key
    assert _steps(settings, run.info.run_id, "probe/cls/balanced_acc") == [1, 3]
    _assert_same_weights(_weights(res.checkpoint), straight_run)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(
    toy_parquet, ray_local, settings
):
    cfg = ray_config(toy_parquet, "train.epochs=4")
    steps = 72 // 16  # train split / global batch
    t0 = time.monotonic()
    with pytest.raises(NonFiniteRunError) as info:
        pretrain_ray(cfg, settings, hooks={"nan_at_step": steps + 1})  # epoch 1, step 1
    assert time.monotonic() - t0 < 120  # no hang, no retries of a deterministic failure
    err = info.value
    assert isinstance(err, NonFiniteLossError)
    assert "epoch 1 step 1" in str(err) and "ssl_loss_0" in str(err)

    good = load_checkpoint(Path(err.checkpoint) / "checkpoint.pt")
    assert good["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())

    (run,) = _runs(settings)
    assert run.info.run_id == err.mlflow_run_id and run.info.status == "FAILED"
    assert "epoch 1 step 1" in run.data.tags["commlab.error"]
    assert run.data.tags["commlab.attempts"] == "1"  # settings.max_failures=1 was not used
    assert _steps(settings, run.info.run_id, "train/loss") == [0]


# ---------------------------------------------------------------- command line
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_pretrain_with_workers_on_trifeatures(ray_local, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from commlab.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = Path(__file__).resolve().parents[2] / "configs" / "trifeatures" / "smoke.yaml"
    args = [
        "pretrain", str(config),
        f"data.path={tmp_path / 'trifeatures'}",
        "data.params={size: 32, pairs: 256, test_pairs: 128}",
        "data.batch_size=32", "data.probe_max_train=256",
        "model.embed_dim=16", "model.n_heads=2", "model.head.hidden_dim=32", "model.head.out_dim=16",
        "model.modalities.0.encoder.params={width: 4, out_channels: 16, grid: 2}",
        "model.modalities.1.encoder.params={width: 4, out_channels: 16, grid: 2}",
        "train.epochs=1", "train.max_steps_per_epoch=2",
        "--workers", "2", "--out", str(tmp_path / "ray" / "smoke"), "--experiment", "cli",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "rus")} == {
        "rus/rus.json",
        "rus/rus.md",
        "rus/rus.png",
    }
    assert {"redundancy", "uniqueness", "synergy"} <= {
        k.rsplit(".", 1)[1] for k in run.data.tags if k.startswith("commlab.rus.")
    }


# ---------------------------------------------------------------- settings (no Ray)
def test_run_names_never_resume_silently(tmp_path):
    s = RayTrainSettings()
    assert resolve_run_name(str(tmp_path), "toy", s) == "toy"
    (tmp_path / "toy").mkdir()
    assert resolve_run_name(str(tmp_path), "toy", s) == "toy-1"
    with pytest.raises(FileExistsError, match="resume"):
        resolve_run_name(str(tmp_path), "toy", RayTrainSettings(run_name="toy"))
    assert resolve_run_name(str(tmp_path), "toy", RayTrainSettings(resume=True)) == "toy"
    with pytest.raises(FileNotFoundError):
        resolve_run_name(str(tmp_path), "other", RayTrainSettings(resume=True))


def test_trainer_is_built_from_settings(tmp_path):
    cfg = ray_config(Path("relative/data"))
    s = RayTrainSettings(
        workers=3,
        cpus_per_worker=2,
        max_failures=2,
        num_to_keep=4,
        selection_metric="probe/x",
        selection_mode="max",
    )
    t = build_trainer(cfg, s, name="n", storage_path=str(tmp_path))
    assert t.scaling_config.num_workers == 3 and not t.scaling_config.use_gpu
    assert t.scaling_config.resources_per_worker == {"CPU": 2.0}
    rc = t.run_config
    assert rc.name == "n" and rc.storage_path == str(tmp_path)
    assert rc.failure_config.max_failures == 2
    cc = rc.checkpoint_config
    assert (cc.num_to_keep, cc.checkpoint_score_attribute, cc.checkpoint_score_order) == (
        4,
        "probe/x",
        "max",
    )
    assert t.train_loop_config["sync_batchnorm"] is True
    sent = t.train_loop_config["cfg"]["data"]["path"]
    assert Path(sent).is_absolute() and sent.endswith("relative/data")  # workers change CWD
    gpu = build_trainer(
        cfg, RayTrainSettings(gpus_per_worker=1), name="g", storage_path=str(tmp_path)
    )
    assert gpu.scaling_config.use_gpu and gpu.scaling_config.resources_per_worker["GPU"] == 1


# ---------------------------------------------------------------- synced BatchNorm on gloo (no Ray)
WORLD, B, C = 2, 3, 4


def _bn_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, *shape, generator=g) * 3 + 1, torch.randn(
        WORLD * B, *shape, generator=g
    )


def _grouped_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 4.0, 0.5]).view(3, 1, 1)  # groups with different statistics
    return torch.randn(3, WORLD * B, C, generator=g) * scale + scale, torch.randn(
        3, WORLD * B, C, generator=g
    )


def _bn_checks(rank: int) -> dict:
    """GlobalBatchNorm's outputs, gradients and running statistics on one rank."""
    res = {}
    for shape in [(C,), (C, 5)]:
        x, w = _bn_inputs(shape)
        model = sync_batchnorm(nn.Sequential(nn.BatchNorm1d(C)), torch.device("cpu"))
        xr = x[rank * B : (rank + 1) * B].clone().requires_grad_()
        y = model(xr)
        (y * w[rank * B : (rank + 1) * B]).sum().backward()
        bn = model[0]
        res[str(shape)] = {
            "y": y.detach(), "grad": xr.grad, "wgrad": bn.weight.grad, "bgrad": bn.bias.grad,
            "running": (bn.running_mean.clone(), bn.running_var.clone()),
            "type": type(bn).__name__,
        }  # fmt: skip
    # grouped: G batches in one pass, each normalised with its own global statistics
    res["grouped"] = _grouped_bn_on_rank(rank)
    return res


def _grouped_bn_on_rank(rank: int, compiled: bool = False) -> dict:
    """The grouped GlobalBatchNorm on this rank's part of `_grouped_inputs` (through
    torch.compile, as `train.compile: heads` runs CoMM's head, when `compiled`)."""
    x, w = _grouped_inputs()
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm1d(C)), torch.device("cpu"))[0]
    fn = functools.partial(batch_norm_groups, bn)
    xr = x[:, rank * B : (rank + 1) * B].clone().requires_grad_()
    y = (torch.compile(fn) if compiled else fn)(xr)
    (y * w[:, rank * B : (rank + 1) * B]).sum().backward()
    return {
        "y": y.detach(), "grad": xr.grad, "wgrad": bn.weight.grad,
        "running": (bn.running_mean.clone(), bn.running_var.clone()),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_global_batchnorm_equals_batchnorm_on_the_concatenated_batch(tmp_path):
    ranks = run_on_workers(_bn_checks, tmp_path, WORLD, timeout_s=60)
    for shape in [(C,), (C, 5)]:
        x, w = _bn_inputs(shape)
        x = x.clone().requires_grad_()
        bn = nn.BatchNorm1d(C)
        (bn(x) * w).sum().backward()
        got = [r[str(shape)] for r in ranks]
        assert all(g["type"] == "GlobalBatchNorm" for g in got)
        ref_y = nn.functional.batch_norm(x.detach(), None, None, training=True)  # weight 1, bias 0
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.cat([g["grad"] for g in got]), x.grad, rtol=1e-4, atol=1e-5
        )
        # each rank holds its part of the parameter gradient; DDP sums (averages) them
        torch.testing.assert_close(
            sum(g["wgrad"] for g in got), bn.weight.grad, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(sum(g["bgrad"] for g in got), bn.bias.grad, rtol=1e-4, atol=1e-5)
        for g in got:
            torch.testing.assert_close(g["running"][0], bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g["running"][1], bn.running_var, rtol=1e-5, atol=1e-6)

    # grouped (one collective per call): equals plain BatchNorm on each group's global batch
    x, w = _grouped_inputs()
    x = x.clone().requires_grad_()
    bn = nn.BatchNorm1d(C)
    ref = torch.stack([bn(x[k]) for k in range(3)])
    (ref * w).sum().backward()
    got = [r["grouped"] for r in ranks]
    torch.testing.assert_close(
        torch.cat([g["y"] for g in got], 1), ref.detach(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(torch.cat([g["grad"] for g in got], 1), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sum(g["wgrad"] for g in got), bn.weight.grad, rtol=1e-4, atol=1e-5)
    for g in got:
        torch.testing.assert_close(g["running"][0], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g["running"][1], bn.running_var, rtol=1e-5, atol=1e-6)


def _bn_compiled_check(rank: int) -> dict:
    """The grouped GlobalBatchNorm eager and under torch.compile, on one rank."""
    return {
        "eager": _grouped_bn_on_rank(rank),
        "compiled": _grouped_bn_on_rank(rank, compiled=True),
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_global_batchnorm_under_torch_compile_equals_eager(tmp_path):
    ranks = run_on_workers(_bn_compiled_check, tmp_path, WORLD, timeout_s=150)
    x, _ = _grouped_inputs()
    for r in ranks:
        for key in ("y", "grad", "wgrad"):
            torch.testing.assert_close(r["compiled"][key], r["eager"][key], rtol=1e-4, atol=1e-5)
        for k in range(2):
            torch.testing.assert_close(r["compiled"]["running"][k], r["eager"]["running"][k])
    # and the statistics are the global batch's, not the rank's own
    y = torch.cat([r["compiled"]["y"] for r in ranks], 1)
    ref = torch.stack([nn.functional.batch_norm(x[k], None, None, training=True) for k in range(3)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_global_batchnorm_is_plain_batchnorm_without_workers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm2d(2)))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    converted = sync_batchnorm(model, torch.device("cpu"))
    assert converted is model
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[2][0], GlobalBatchNorm)
    assert model.state_dict().keys() == ref.keys()  # checkpoints stay loadable either way
    x = torch.randn(5, 3)
    plain = nn.BatchNorm1d(4)
    plain.load_state_dict({k.split(".", 1)[1]: v for k, v in ref.items() if k.startswith("1.")})
    torch.testing.assert_close(model[1](model[0](x)), plain(model[0](x)))


@pytest.mark.parametrize("scope", ["all", "head", "none", True, False])
def test_batchnorm_sync_scope_converts_the_chosen_layers(scope):
    from commlab.train.worker import sync_scope

    method = build_method(toy_config("comm"), [(8, 6), (8, 5)])
    # an encoder BatchNorm next to the head's, to see which ones a scope converts
    method.stack.encoders[0].extra_bn = nn.BatchNorm1d(4)
    sync_scope(method, torch.device("cpu"), scope)
    head_bn = [m for m in method.head.modules() if isinstance(m, _BatchNorm)]
    enc_bn = [m for m in method.stack.modules() if isinstance(m, _BatchNorm)]
    assert len(head_bn) == 2 and len(enc_bn) == 1
    want_head = scope in ("all", "head", True)
    want_enc = scope in ("all", True)
    assert all(isinstance(m, GlobalBatchNorm) == want_head for m in head_bn)
    assert all(isinstance(m, GlobalBatchNorm) == want_enc for m in enc_bn)
    with pytest.raises(ValueError, match="all, head or none"):
        sync_scope(method, torch.device("cpu"), "some")
