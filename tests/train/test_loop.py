import json

import pytest
import torch

from commlab.data.base import DataBundle
from commlab.train.checkpoint import FORMAT, load_checkpoint
from commlab.train.epoch_end import format_progress
from commlab.train.local import pretrain_local
from commlab.train.loop import (
    NonFiniteLossError,
    PretrainRun,
    WorkerContext,
    lr_factor,
    param_groups,
    rank_seed,
)
from tests.conftest import toy_config, toy_sequence_dataset


def _bundle(ds=None):
    ds = ds or toy_sequence_dataset()
    return DataBundle(pretrain=ds, probe=ds, description="toy")


def test_loss_falls_and_probe_learns():
    cfg = toy_config("comm", ("train.epochs=6", "train.probe_every=6"))
    run = PretrainRun(cfg, data=_bundle())
    hist = []
    run.fit(lambda e, m, r: hist.append(m))
    assert len(hist) == 6 and [int(m["epoch"]) for m in hist] == list(range(6))
    assert hist[-1]["train/loss"] < hist[0]["train/loss"]
    assert "probe/cls/balanced_acc" in hist[-1] and "probe/cls/balanced_acc" not in hist[0]
    assert hist[-1]["probe/cls/balanced_acc"] > 0.5  # 4 classes, chance 0.25
    for key in ("perf/samples_per_s", "perf/mfu", "train/ssl_acc", "train/ssl_loss_2", "train/lr"):
        assert key in hist[0] and hist[0][key] > 0


def test_no_weight_decay_on_norms_and_biases():
    run = PretrainRun(toy_config("comm"), data=_bundle())
    decay, no_decay = param_groups(run.method, 0.1)
    names = {id(p): n for n, p in run.method.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("ln_1" in names[id(p)] for p in no_decay["params"])
    assert all(
        names[id(p)].endswith("bias") or p.ndim < 2 or "ln" in names[id(p)] or "bn" in names[id(p)]
        for p in no_decay["params"]
    )
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_warmup_cosine_schedule():
    cfg = toy_config(
        "comm",
        (
            "train.epochs=10",
            "optim.scheduler=cosine",
            "optim.warmup_epochs=2",
            "optim.lr=1e-3",
            "optim.warmup_start_lr=1e-5",
            "optim.min_lr=1e-5",
        ),
    )
    lrs = [cfg.optim.lr * lr_factor(cfg, e) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] > 1e-5


def test_resume_equals_straight_run():
    over = ("train.epochs=4", "train.probe_every=0")
    straight = PretrainRun(toy_config("comm", over), data=_bundle())
    straight.fit()
    first = PretrainRun(
        toy_config("comm", ("train.epochs=2", "train.probe_every=0")), data=_bundle()
    )
    first.fit()
    state = first.state_dict()
    resumed = PretrainRun(toy_config("comm", over), data=_bundle())
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    resumed.fit()
    for (name, a), b in zip(
        straight.method.state_dict().items(), resumed.method.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_non_finite_loss_names_step_and_term():
    ds = toy_sequence_dataset()
    ds.modalities[0].values[:] = float("nan")
    run = PretrainRun(toy_config("comm"), data=_bundle(ds))
    with pytest.raises(NonFiniteLossError, match=r"epoch 0 step 0 .*ssl_loss_"):
        run.fit()


def test_batch_too_large_is_clear():
    with pytest.raises(ValueError, match="too few for one batch"):
        PretrainRun(toy_config("comm", ("data.batch_size=512",)), data=_bundle())


def test_pretrain_local_writes_self_describing_checkpoint(tmp_path, monkeypatch):
    from commlab.train import local

    monkeypatch.setattr(local, "PretrainRun", lambda cfg: PretrainRun(cfg, data=_bundle()))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = toy_config("comm", ("train.epochs=2", "train.probe_every=1"))
    res = pretrain_local(cfg, run_dir=tmp_path / "run")
    ckpt = load_checkpoint(res.checkpoint)  # weights_only=True inside
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == 2 and ckpt["seed"] == cfg.seed
    assert ckpt["config"]["model"]["method"] == "comm"
    assert (
        ckpt["data_fingerprint"] == "toy" and "torch" in ckpt["packages"] and ckpt["code_version"]
    )
    assert "probe/cls/balanced_acc" in ckpt["metrics"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0.0, 1.0]
    # a second run with the same name does not overwrite the first
    res2 = pretrain_local(cfg, run_dir=tmp_path / "run")
    assert res2.run_dir == tmp_path / "run-1"
    # --resume continues the first run up to a larger epoch count
    cfg3 = toy_config("comm", ("train.epochs=3", "train.probe_every=1"))
    res3 = pretrain_local(cfg3, run_dir=tmp_path / "run", resume=True)
    assert load_checkpoint(res3.checkpoint)["epoch"] == 3
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3

    # each run directory is one MLflow run; --resume continued the first one
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert res.mlflow_run_id == res3.mlflow_run_id != res2.mlflow_run_id
    first = client.get_run(res.mlflow_run_id)
    assert first.info.status == "FINISHED" and first.info.run_name == "run"
    assert first.data.params["model.method"] == "comm"
    assert first.data.tags["commlab.kind"] == "pretrain"
    steps = [m.step for m in client.get_metric_history(res.mlflow_run_id, "train/loss")]
    assert steps == [0, 1, 2]
    assert "probe/cls/balanced_acc" in first.data.metrics
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "checkpoint")}
    assert arts == {"checkpoint/checkpoint.pt"}
    assert client.get_run(res2.mlflow_run_id).info.run_name == "run-1"
    # --no-tracking: files only
    res4 = pretrain_local(cfg, run_dir=tmp_path / "quiet", tracking=False)
    assert res4.mlflow_run_id is None and len(client.search_runs([first.info.experiment_id])) == 2


def test_progress_line():
    line = format_progress(
        2,
        10,
        {
            "train/loss": 1.5,
            "train/ssl_acc": 40.0,
            "probe/share/balanced_acc": 0.9,
            "perf/samples_per_s": 1234.0,
            "perf/mfu": 0.31,
            "perf/epoch_time_s": 2.0,
        },
    )
    assert line.startswith("epoch   3/10") and "loss 1.5000" in line and "share 0.900" in line
    assert "1,234 samples/s" in line and "mfu 0.31" in line


def test_workers_share_initial_weights_but_not_dropout_masks():
    cfg = toy_config("comm", ("model.dropout=0.5",))
    runs, masks = [], []
    for rank in (0, 1):
        runs.append(PretrainRun(cfg, WorkerContext(rank=rank, world_size=2), data=_bundle()))
        # the global stream right after construction is what dropout draws from
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.5) > 0)
    a, b = (r.method.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(masks[0], masks[1])
    assert rank_seed(cfg.seed, 0) == cfg.seed and rank_seed(cfg.seed, 1) != cfg.seed


@pytest.fixture
def perf_cache(tmp_path, monkeypatch):
    """A fresh per-test cache of measured speed choices (commlab.perf)."""
    path = tmp_path / "perf.json"
    monkeypatch.setenv("COMMLAB_PERF_CACHE", str(path))
    return path


def _fixed_batch_loss(run: PretrainRun) -> tuple[torch.Tensor, list[torch.dtype]]:
    gen = torch.Generator().manual_seed(7)
    va, vb = run._views(torch.arange(run.per_rank_batch), gen)
    dtypes: list[torch.dtype] = []
    lin = run.method.fusion.blocks[0].c_fc
    handle = lin.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.no_grad(), run._autocast():
        out = run.model(va, vb)
    handle.remove()
    return out.loss.float(), dtypes


def test_bf16_mixed_gives_the_fp32_loss_on_a_fixed_batch(perf_cache):
    base = ("train.fusion=packed",)
    fp32 = PretrainRun(toy_config("comm", (*base, "train.precision=fp32")), data=_bundle())
    bf16 = PretrainRun(toy_config("comm", (*base, "train.precision=bf16-mixed")), data=_bundle())
    legacy = toy_config("comm", ("train.precision=bf16",))  # the old name still loads
    assert legacy.train.precision == "bf16-mixed"
    loss32, dt32 = _fixed_batch_loss(fp32)
    loss16, dt16 = _fixed_batch_loss(bf16)
    assert dt32 == [torch.float32] and dt16 == [torch.bfloat16]  # bf16 really ran
    assert loss32.dtype == torch.float32 and torch.isfinite(loss16)
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)
    assert not torch.equal(loss16, loss32)


def _native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Whether this CPU runs bf16 natively, as commlab sees it (this machine may lack it)."""
    from commlab import perf

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: native)


def test_without_native_bf16_auto_is_fp32_untimed_and_bf16_is_flagged(perf_cache, monkeypatch):
    _native_bf16(monkeypatch, False)
    over = ("train.epochs=1", "train.probe_every=0", "train.max_steps_per_epoch=1")
    auto = PretrainRun(toy_config("comm", (*over, "train.precision=auto")), data=_bundle())
    auto.run_epoch(0)
    assert auto.precision == "fp32"
    assert "auto: this CPU has no native bf16" in auto.settings_note
    assert not perf_cache.exists() or not any(
        k.startswith("precision-train|") for k in json.loads(perf_cache.read_text())
    )
    forced = PretrainRun(toy_config("comm", (*over, "train.precision=bf16-mixed")), data=_bundle())
    forced.run_epoch(0)
    assert forced.precision == "bf16-mixed"
    assert "configured, but this CPU has no native bf16" in forced.settings_note
    _native_bf16(monkeypatch, True)
    native = PretrainRun(toy_config("comm", (*over, "train.precision=bf16-mixed")), data=_bundle())
    native.run_epoch(0)
    assert "bf16-mixed (configured)" in native.settings_note


@pytest.mark.parametrize(("bf16_s", "expected"), [(0.1, "bf16-mixed"), (2.0, "fp32")])
def test_auto_precision_is_timed_on_the_first_batch_then_follows_the_cache(
    perf_cache, bf16_s, expected, monkeypatch
):
    _native_bf16(monkeypatch, True)
    over = ("train.epochs=1", "train.probe_every=0", "train.max_steps_per_epoch=2")
    cfg = toy_config("comm", (*over, "train.precision=auto", "train.fusion=packed"))
    first = PretrainRun(cfg, data=_bundle())
    first.run_epoch(0)  # measures this model's step in both precisions, once
    keys = [k for k in json.loads(perf_cache.read_text()) if k.startswith("precision-train|")]
    assert len(keys) == 1 and "|comm|model=" in keys[0]
    assert first.precision in ("fp32", "bf16-mixed")
    assert "auto: this model's step on this device" in first.settings_note
    # a cached entry decides: the next runs of this model follow it without measuring
    data = json.loads(perf_cache.read_text())
    data[keys[0]]["seconds"] = {"fp32": 1.0, "bf16-mixed": bf16_s}
    perf_cache.write_text(json.dumps(data))
    runs = [PretrainRun(cfg, data=_bundle()) for _ in range(2)]
    for r in runs:
        r.run_epoch(0)
    assert [r.precision for r in runs] == [expected, expected]
    _, dtypes = _fixed_batch_loss(runs[0])
    assert dtypes == [torch.bfloat16 if expected == "bf16-mixed" else torch.float32]
    # and another model (here: a wider projection head) is measured on its own
    wider = toy_config("comm", (*over, "train.precision=auto", "model.head.hidden_dim=48"))
    PretrainRun(wider, data=_bundle()).run_epoch(0)
    keys = [k for k in json.loads(perf_cache.read_text()) if k.startswith("precision-train|")]
    assert len(keys) == 2


def test_auto_fusion_measures_once_and_both_paths_train_alike(perf_cache):
    over = ("train.epochs=1", "train.probe_every=0", "train.max_steps_per_epoch=2")
    auto = PretrainRun(toy_config("comm", (*over, "train.fusion=auto")), data=_bundle())
    auto.fit()
    assert auto.method.fusion_path in ("packed", "sequential", "grouped")
    entry = next(
        v for k, v in json.loads(perf_cache.read_text()).items() if k.startswith("fusion|")
    )
    paths = {"packed", "sequential", "grouped"}
    assert set(entry["seconds"]) == paths
    # a cached entry decides: make another path the fastest one and build again
    other = sorted(paths - {auto.method.fusion_path})[0]
    data = json.loads(perf_cache.read_text())
    for k in data:
        if k.startswith("fusion|"):
            data[k]["seconds"] = {p: 0.1 if p == other else 1.0 for p in paths}
    perf_cache.write_text(json.dumps(data))
    again = PretrainRun(toy_config("comm", (*over, "train.fusion=auto")), data=_bundle())
    m_again = again.run_epoch(0)
    assert again.method.fusion_path == other
    explicit = PretrainRun(toy_config("comm", (*over, f"train.fusion={other}")), data=_bundle())
    m_explicit = explicit.run_epoch(0)
    assert m_again["train/loss"] == pytest.approx(m_explicit["train/loss"], rel=1e-6)


def test_mfu_uses_the_step_flops_and_the_compute_dtype_peak(perf_cache, monkeypatch):
    from commlab.train import loop

    seen = []

    def fake_peak(device, dtype):
        seen.append(dtype)
        return 1e9

    monkeypatch.setattr(loop, "dense_peak_flops", fake_peak)
    run = PretrainRun(toy_config("comm", ("train.fusion=packed",)), data=_bundle())
    m = run.run_epoch(0)
    step_s = m["perf/epoch_time_s"] / run.steps_per_epoch
    assert run.flops_per_step and m["perf/mfu"] == pytest.approx(run.flops_per_step / step_s / 1e9)
    assert seen == [torch.float32]
    # the fake peak takes no time, so its 2 % budget lets every epoch measure it again
    m = run.run_epoch(1)
    assert seen == [torch.float32] * 2 and "perf/mfu" in m
    # one that took 60 s is not taken again after a toy epoch of a few milliseconds
    run.peaks.cost = 60.0
    m = run.run_epoch(2)
    assert seen == [torch.float32] * 2
    step_s = m["perf/epoch_time_s"] / run.steps_per_epoch
    assert m["perf/mfu"] == pytest.approx(run.flops_per_step / step_s / 1e9)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["heads", "all"])
def test_compiled_step_equals_eager(perf_cache, scope):
    over = ("train.epochs=2", "train.probe_every=0", "train.max_steps_per_epoch=1")
    over = (*over, "train.fusion=sequential", "model.dropout=0.0")
    eager = PretrainRun(toy_config("comm", over), data=_bundle())
    compiled = PretrainRun(toy_config("comm", (*over, f"train.compile={scope}")), data=_bundle())
    m_e, m_c = eager.run_epoch(0), compiled.run_epoch(0)
    assert compiled.compiled and not eager.compiled
    what = {"heads": "fusion and projection head", "all": "the whole forward"}[scope]
    assert f"compiled ({scope}: {what})" in compiled.settings_note
    if scope == "all":
        assert compiled.method._compiled_call_impl is not None
    else:  # only the fusion and head: the encoders' forward stays eager
        assert compiled.method.compiled_heads and compiled.method._compiled_call_impl is None
    assert m_c["train/loss"] == pytest.approx(m_e["train/loss"], rel=1e-5, abs=1e-6)
    # gradients of the first step; parameters are not compared: AdamW's first update is about
    # lr * sign(grad), so a gradient that is zero up to rounding (the attention's key bias)
    # moves either way
    for (name, a), b in zip(
        eager.method.named_parameters(), compiled.method.parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3, msg=name)
    m_e, m_c = eager.run_epoch(1), compiled.run_epoch(1)
    assert m_c["train/loss"] == pytest.approx(m_e["train/loss"], rel=1e-3)
