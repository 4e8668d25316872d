"""commlab.dist and the gathering objectives on 2 CPU processes (gloo).

One spawn runs every check; each child writes its results to tmp files and the parent asserts
them against single-process runs on the concatenated global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from commlab import dist
from commlab.objectives import (
    LogitScale,
    LossOutput,
    clip_loss,
    cmc_loss,
    comm_loss,
    cross_self_loss,
)
from tests.gloo import run_on_workers

WORLD = 2
B = 3  # per-rank batch
D_IN, D = 6, 5
TIMEOUT_S = 60


def _comm(xs: list[Tensor], gather: bool) -> LossOutput:
    return comm_loss(xs[:3], xs[3:], temperature=0.2, gather=gather)  # 2 modalities + full


def _cross_self(xs: list[Tensor], gather: bool) -> LossOutput:
    return cross_self_loss(*xs, temperature=0.2, ssl_scale=0.7, gather=gather)


def _cmc(xs: list[Tensor], gather: bool) -> LossOutput:
    return cmc_loss(xs, temperature=0.2, gather=gather)


# name -> (objective, number of (B, D) inputs)
CASES: dict[str, tuple[Callable[[list[Tensor], bool], LossOutput], int]] = {
    "comm": (_comm, 6),
    "cross_self": (_cross_self, 4),
    "cmc": (_cmc, 3),
}


def _global_inputs(n: int, width: int, seed: int) -> list[Tensor]:
    """The global batch (WORLD * B rows), identical on every process."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(WORLD * B, width, generator=g, dtype=torch.float64)
    return [
        base + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64) for _ in range(n)
    ]


def _encoder() -> nn.Linear:
    torch.manual_seed(123)
    return nn.Linear(D_IN, D).double()


def _encode(enc: nn.Module, raws: list[Tensor]) -> list[Tensor]:
    # one forward for all inputs, as a training step would batch them through DDP
    return list(enc(torch.cat(raws)).split(raws[0].shape[0]))


def _rows(x: Tensor, rank: int) -> Tensor:
    return x[rank * B : (rank + 1) * B]


def _checks(rank: int) -> dict[str, Any]:
    """Every distributed check on one rank (under tests.gloo.run_on_workers)."""
    res: dict[str, Any] = {"rank": dist.get_rank(), "world": dist.get_world_size()}
    res["is_dist"] = dist.is_dist()

    for name, (fn, n) in CASES.items():
        local = [_rows(x, rank).clone().requires_grad_() for x in _global_inputs(n, D, 0)]
        out = fn(local, True)
        out.loss.backward()
        res[name] = {
            "loss": out.loss.detach(),
            "terms": out.terms,
            "acc": out.acc,
            "grads": [x.grad for x in local],
        }
        enc = _encoder()
        ddp = DistributedDataParallel(enc)
        raws = [_rows(x, rank) for x in _global_inputs(n, D_IN, 1)]
        fn(_encode(ddp, raws), True).loss.backward()
        res[name]["ddp_grads"] = [p.grad.clone() for p in enc.parameters()]
        plain = _encoder()  # the same step, averaged after the backward pass instead of by DDP
        fn(_encode(plain, raws), True).loss.backward()
        dist.average_gradients_later(list(plain.parameters()))()
        res[name]["deferred_grads"] = [p.grad.clone() for p in plain.parameters()]

    z1, z2 = (_rows(x, rank) for x in _global_inputs(2, D, 2))
    res["clip_loss"] = clip_loss(z1, z2, LogitScale()(), gather=True).loss.detach()

    # unequal per-rank sizes: rank r holds r + 2 rows
    x = torch.full((rank + 2, 2), float(rank), dtype=torch.float64, requires_grad=True)
    gathered = dist.gather_with_grad(x)
    weights = torch.arange(gathered.numel(), dtype=torch.float64).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    res["uneven"] = {"gathered": gathered.detach(), "grad": x.grad, "weights": weights}
    res["no_grad"] = dist.gather_no_grad(x)
    x_same = x.detach().clone().requires_grad_()
    (dist.gather_with_grad(x_same, identical_loss=True) * weights).sum().backward()
    res["uneven"]["grad_identical_loss"] = x_same.grad

    # a loss that differs by rank: the general backward sums every rank's gradient; the
    # identical-loss one communicates nothing and so scales this rank's own
    summed = torch.ones((2, 2), dtype=torch.float64, requires_grad=True)
    scaled = torch.ones((2, 2), dtype=torch.float64, requires_grad=True)
    (dist.gather_with_grad(summed) * (rank + 1)).sum().backward()
    (dist.gather_with_grad(scaled, identical_loss=True) * (rank + 1)).sum().backward()
    res["rank_dependent"] = {"summed": summed.grad, "scaled": scaled.grad}
    res["sizes"] = dist.gather_sizes(rank + 5)
    with dist.equal_batch_sizes():  # the caller vouches for equal sizes: none are exchanged
        res["sizes_vouched"] = dist.gather_sizes(rank + 5)
    res["sizes_after"] = dist.gather_sizes(rank + 5)
    res["mean"] = dist.all_reduce_mean(torch.tensor([float(rank)]))
    mine = torch.tensor([float(rank + 1)])
    later = dist.all_reduce_sum_later(mine)
    res["later_meanwhile"] = dist.all_reduce_mean(torch.tensor([10.0 * rank]))  # in order
    res["later"] = later()
    res["later_input"] = mine.clone()
    res["broadcast"] = dist.broadcast_object({"from": rank}, src=0)

    # gradients of two dtypes and a parameter without one, a flag summed alongside
    p64 = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p32 = nn.Parameter(torch.zeros(2, 2))
    unused = nn.Parameter(torch.ones(2))
    p64.grad = torch.full((3,), 2.0 * (rank + 1), dtype=torch.float64)
    p32.grad = torch.full((2, 2), float(rank))
    grad_before = p32.grad
    finish = dist.average_gradients_later([p64, p32, unused], torch.tensor([float(rank + 1)]))
    res["average_meanwhile"] = dist.all_reduce_mean(torch.tensor([1.0]))  # queued behind it
    res["average"] = {
        "extra": finish(),
        "grads": [p64.grad, p32.grad, unused.grad],
        "in_place": p32.grad is grad_before,
    }
    module = nn.BatchNorm1d(2)
    with torch.no_grad():
        module.weight.fill_(rank + 1.0)
        module.running_mean.fill_(10.0 * rank)
    dist.broadcast_module(module, src=0)
    res["broadcast_module"] = {k: v.clone() for k, v in module.state_dict().items()}
    res["rank_zero"] = dist.rank_zero_only(lambda: "ran")()
    dist.barrier()
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_on_workers(_checks, tmp_path_factory.mktemp("dist"), WORLD, TIMEOUT_S)


def test_process_group_basics(results: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == WORLD and r["is_dist"] for r in results)
    assert all(r["mean"].item() == 0.5 for r in results)
    # a started sum completes after a later collective, and leaves its input alone
    assert all(r["later"].item() == 3.0 for r in results)  # 1 + 2
    assert all(r["later_meanwhile"].item() == 5.0 for r in results)
    assert [r["later_input"].item() for r in results] == [1.0, 2.0]
    assert dist.all_reduce_sum_later(torch.tensor([4.0]))().item() == 4.0  # no process group
    assert all(r["broadcast"] == {"from": 0} for r in results)
    assert [r["rank_zero"] for r in results] == ["ran", None]
    assert not dist.is_dist() and dist.get_rank() == 0 and dist.get_world_size() == 1


def test_gather_handles_uneven_sizes(results: list[dict[str, Any]]) -> None:
    expected = torch.cat([torch.full((r + 2, 2), float(r), dtype=torch.float64) for r in (0, 1)])
    starts = [0, 2]
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["uneven"]["gathered"], expected)
        torch.testing.assert_close(res["no_grad"], expected)
        # both ranks backprop the same weights: the summed grad is WORLD x this rank's rows
        rows = res["uneven"]["weights"][starts[rank] : starts[rank] + rank + 2]
        torch.testing.assert_close(res["uneven"]["grad"], WORLD * rows)
        torch.testing.assert_close(res["uneven"]["grad_identical_loss"], WORLD * rows)


def test_identical_loss_gather_backward_communicates_nothing(
    results: list[dict[str, Any]],
) -> None:
    for rank, res in enumerate(results):
        grads = res["rank_dependent"]
        # loss = (rank + 1) * sum: ranks 0 and 1 send back 1 and 2 per element
        torch.testing.assert_close(grads["summed"], torch.full((2, 2), 3.0, dtype=torch.float64))
        expected = torch.full((2, 2), WORLD * (rank + 1.0), dtype=torch.float64)
        torch.testing.assert_close(grads["scaled"], expected)


def test_equal_batch_sizes_skips_the_size_exchange(results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        assert res["sizes"] == [5, 6]
        assert res["sizes_vouched"] == [rank + 5] * WORLD
        assert res["sizes_after"] == [5, 6]


@pytest.mark.parametrize("name", list(CASES))
def test_gathered_loss_and_input_grads_match_single_process(
    results: list[dict[str, Any]], name: str
) -> None:
    fn, n = CASES[name]
    inputs = [x.clone().requires_grad_() for x in _global_inputs(n, D, 0)]
    ref = fn(inputs, False)
    ref.loss.backward()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res[name]["loss"], ref.loss.detach())
        for key, value in ref.terms.items():
            torch.testing.assert_close(res[name]["terms"][key], value)
        for key, value in ref.acc.items():
            torch.testing.assert_close(res[name]["acc"][key], value)
        for got, x in zip(res[name]["grads"], inputs, strict=True):
            # DDP averages gradients over ranks, so each rank carries WORLD x its share
            torch.testing.assert_close(got, WORLD * _rows(x.grad, rank))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("how", ["ddp", "deferred"])
def test_parameter_grads_match_single_process(
    results: list[dict[str, Any]], name: str, how: str
) -> None:
    fn, n = CASES[name]
    enc = _encoder()
    fn(_encode(enc, _global_inputs(n, D_IN, 1)), False).loss.backward()
    for res in results:
        for got, p in zip(res[name][f"{how}_grads"], enc.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad)


def test_average_gradients_later_averages_every_dtype_and_sums_the_extra(
    results: list[dict[str, Any]],
) -> None:
    for res in results:
        got = res["average"]
        assert got["extra"].tolist() == [3.0]  # 1 + 2: summed, not averaged
        torch.testing.assert_close(got["grads"][0], torch.full((3,), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["grads"][1], torch.full((2, 2), 0.5))
        torch.testing.assert_close(got["grads"][2], torch.zeros(2))  # none anywhere: zeros
        assert got["in_place"]
        assert res["average_meanwhile"].item() == 1.0
    # not distributed: gradients untouched, the extra handed back
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    flag = torch.tensor([1.0])
    assert dist.average_gradients_later([p], flag)() is flag
    assert p.grad.tolist() == [1.0, 1.0]


def test_broadcast_module_gives_every_rank_rank_zeros_weights_and_buffers(
    results: list[dict[str, Any]],
) -> None:
    for res in results:
        state = res["broadcast_module"]
        assert state["weight"].tolist() == [1.0, 1.0]
        assert state["running_mean"].tolist() == [0.0, 0.0]


def test_clip_rank_losses_average_to_single_process(results: list[dict[str, Any]]) -> None:
    z1, z2 = _global_inputs(2, D, 2)
    ref = clip_loss(z1, z2, LogitScale()()).loss.detach()
    torch.testing.assert_close(sum(r["clip_loss"] for r in results) / WORLD, ref)
