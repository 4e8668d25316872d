"""`train.grad_sync`: DDP and deferred gradient averaging train alike on 2 gloo workers, and a
non-finite loss on one rank stops every rank at the same step."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from commlab.data.base import DataBundle
from commlab.train.loop import NonFiniteLossError, PretrainRun, WorkerContext, resolve_grad_sync
from commlab.train.worker import _NanAtStep, wrap_for_data_parallel
from tests.conftest import toy_config, toy_sequence_dataset
from tests.gloo import run_on_workers

OVERRIDES = ("train.epochs=2", "train.probe_every=0", "train.batchnorm_sync=head")


def _run(grad_sync: str, nan_on_rank: int | None, rank: int) -> dict[str, Any]:
    cfg = toy_config(overrides=(*OVERRIDES, f"train.grad_sync={grad_sync}"))
    ctx = WorkerContext(rank=rank, world_size=torch.distributed.get_world_size())
    ds = toy_sequence_dataset()

    def wrap(method: torch.nn.Module) -> torch.nn.Module:
        model = wrap_for_data_parallel(method, ctx, "head", resolve_grad_sync(cfg, ctx))
        return _NanAtStep(model, 1) if rank == nan_on_rank else model

    run = PretrainRun(cfg, ctx, data=DataBundle(ds, ds), wrap_model=wrap)
    losses = []
    try:
        for epoch in range(cfg.train.epochs):
            losses.append(run.run_epoch(epoch)["train/loss"])
    except NonFiniteLossError as err:
        return {"error": str(err), "step": run.global_step, "sync": run.grad_sync}
    state = {k: v.clone() for k, v in run.method.state_dict().items()}
    return {"state": state, "losses": losses, "sync": run.grad_sync, "steps": run.global_step}


def _on_two_workers(tmp_path: Path, grad_sync: str, nan_on_rank: int | None = None) -> list[Any]:
    fn = functools.partial(_run, grad_sync, nan_on_rank)
    out = tmp_path / f"{grad_sync}-nan{nan_on_rank}"
    out.mkdir()
    return run_on_workers(fn, out, world=2, timeout_s=120)


@pytest.mark.timeout(300)
def test_deferred_and_ddp_gradient_sync_train_alike(tmp_path):
    ddp = _on_two_workers(tmp_path, "ddp")
    deferred = _on_two_workers(tmp_path, "deferred")
    assert [r["sync"] for r in ddp + deferred] == ["ddp", "ddp", "deferred", "deferred"]
    assert ddp[0]["steps"] == deferred[0]["steps"] > 2
    for a, b in zip(ddp, deferred, strict=True):
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
        for name, value in a["state"].items():
            torch.testing.assert_close(b["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # both ranks hold the same weights: averaged gradients, and the only BatchNorm (the
    # projection head's) synced
    for name, value in deferred[0]["state"].items():
        torch.testing.assert_close(deferred[1]["state"][name], value, msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("grad_sync", ["deferred", "ddp"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path, grad_sync):
    ranks = _on_two_workers(tmp_path, grad_sync, nan_on_rank=1)
    for r in ranks:
        assert r["sync"] == grad_sync
        assert "non-finite loss at epoch 0 step 1" in r["error"]
        assert r["step"] == 1  # the step before it was taken, that one was not


def test_grad_sync_is_none_for_one_worker_and_as_configured_for_more():
    two = WorkerContext(rank=0, world_size=2)
    default = toy_config()
    assert resolve_grad_sync(default, WorkerContext()) == "none"
    assert resolve_grad_sync(default, two) == "ddp"
    deferred = toy_config(overrides=("train.grad_sync=deferred",))
    assert resolve_grad_sync(deferred, WorkerContext()) == "none"
    assert resolve_grad_sync(deferred, two) == "deferred"
    with pytest.raises(ValueError, match="grad_sync"):
        toy_config(overrides=("train.grad_sync=sometimes",))
