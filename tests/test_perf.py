import copy
import json
import time

import pytest
import torch
from torch import nn

from commlab import perf


def test_decide_keeps_the_default_unless_another_is_faster_by_the_margin():
    assert perf.decide({"fp32": 1.0, "bf16-mixed": 0.95}, "fp32", margin=1.1) == "fp32"
    assert perf.decide({"fp32": 1.0, "bf16-mixed": 0.5}, "fp32", margin=1.1) == "bf16-mixed"
    assert perf.decide({"packed": 1.0, "sequential": 0.9}, "packed") == "sequential"
    assert perf.decide({"packed": 1.0, "sequential": 1.0}, "packed") == "packed"


def test_timed_choice_measures_once_then_decides_from_the_cache(tmp_path):
    path = tmp_path / "perf.json"
    calls = {"a": 0, "b": 0}

    def slow() -> None:
        calls["a"] += 1
        sum(range(200_000))

    def fast() -> None:
        calls["b"] += 1

    choice, entry = perf.timed_choice("k", {"a": slow, "b": fast}, "a", rounds=3, path=path)
    assert choice == "b" and calls == {"a": 4, "b": 4}  # 1 warm-up + 3 rounds each
    assert set(json.loads(path.read_text())["k"]["seconds"]) == {"a", "b"}

    def boom() -> None:
        raise AssertionError("a cached choice must not measure again")

    again, cached = perf.timed_choice("k", {"a": boom, "b": boom}, "a", path=path)
    assert again == "b" and cached == entry


class _Toy(nn.Module):
    """A method-like module: `loss(a, b)` returns an object with `.loss`; BatchNorm inside."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.modes: list[bool] = []  # training flag at every loss call

    def loss(self, a, b):
        self.modes.append(self.training)

        class Out:
            loss = self.bn(self.lin(a)).square().mean() + self.lin(b).sum()

        return Out


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU where oneDNN runs bf16 (this machine may lack it): auto precision measures."""
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: True)


def test_auto_precision_is_fp32_without_measuring_on_a_cpu_without_native_bf16(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: False)
    path = tmp_path / "perf.json"
    key = f"precision-train|{perf.device_key('cpu')}|toy"
    path.write_text(json.dumps({key: {"seconds": {"fp32": 1.0, "bf16-mixed": 0.2}}}))

    class Untimed(_Toy):
        def loss(self, a, b):
            raise AssertionError("nothing is timed without native bf16")

    a = torch.randn(16, 8)
    choice, entry = perf.choose_step_precision(
        Untimed(), a, a, torch.device("cpu"), "toy", path=path
    )
    assert choice == "fp32"
    assert entry == {"seconds": {}, "reason": perf.NO_NATIVE_BF16}


def test_cpu_has_native_bf16_is_what_onednn_reports():
    assert perf.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert perf.machine_info()["native_bf16"] is perf.cpu_has_native_bf16()


@pytest.mark.usefixtures("native_bf16")
@pytest.mark.parametrize(
    ("bf16_s", "expected"), [(0.2, "bf16-mixed"), (0.95, "fp32"), (3.0, "fp32")]
)
def test_auto_precision_is_a_function_of_the_cached_measurement(tmp_path, bf16_s, expected):
    path = tmp_path / "perf.json"
    key = f"precision-train|{perf.device_key('cpu')}|toy"
    path.write_text(json.dumps({key: {"seconds": {"fp32": 1.0, "bf16-mixed": bf16_s}}}))
    m, a = _Toy(), torch.randn(16, 8)
    for _ in range(3):
        choice, entry = perf.choose_step_precision(m, a, a, torch.device("cpu"), "toy", path=path)
        assert choice == expected and entry["seconds"]["bf16-mixed"] == bf16_s
    # another model (signature) on the same device is measured on its own
    other, _ = perf.choose_step_precision(m, a, a, torch.device("cpu"), "other", path=path)
    assert set(json.loads(path.read_text())) == {
        key,
        f"precision-train|{perf.device_key('cpu')}|other",
    }


@pytest.mark.usefixtures("native_bf16")
def test_auto_precision_times_the_models_own_step_on_a_copy(tmp_path):
    path = tmp_path / "perf.json"
    m, a = _Toy(), torch.randn(16, 8)
    choice, entry = perf.choose_step_precision(m, a, a, torch.device("cpu"), "toy", path=path)
    assert choice in perf.PRECISIONS
    assert set(entry["seconds"]) == {"fp32", "bf16-mixed"}
    assert all(v > 0 for v in entry["seconds"].values())
    assert m.lin.weight.grad is None and int(m.bn.num_batches_tracked) == 0  # untouched
    assert m.modes == []  # the copy ran the steps ...
    copies = []

    def local_copy(module):
        copies.append(copy.deepcopy(module).eval())  # ... in training mode, whatever it was
        return copies[-1]

    perf.choose_step_precision(m, a, a, torch.device("cpu"), "t2", path=path, local_copy=local_copy)
    assert len(copies) == 1 and copies[0].modes and all(copies[0].modes)
    assert perf.choose_step_precision(m, a, a, torch.device("cpu"), "toy", path=path)[0] == choice


def test_step_flops_counts_forward_and_backward_and_leaves_the_model_alone():
    m = _Toy()
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    flops = perf.step_flops(m, a, b)
    # two (16x8)@(8x4) products forward; backward: grad of weight for both, grad of input
    # is not needed (inputs do not require grad)
    assert flops == 2 * (2 * 16 * 8 * 4) + 2 * (2 * 16 * 8 * 4)
    assert m.lin.weight.grad is None and int(m.bn.num_batches_tracked) == 0


def test_mfu_definition_and_peak():
    peak = perf.dense_peak_flops("cpu", torch.float32, n=128, reps=2)
    assert peak > 0
    assert perf.mfu(2e9, 0.5, 8e9) == pytest.approx(0.5)


def test_dense_kernels_state_the_flops_torch_counts():
    for name, (fn, flops) in perf.dense_kernels("cpu", torch.float32, n=64).items():
        assert perf.count_flops(fn) == flops, name


def test_dense_peak_is_the_fastest_kernel(monkeypatch):
    def kernels(device, dtype, n):
        return {
            "slow": (lambda: time.sleep(0.02), 1e9),  # 50 GFLOP/s at best
            "fast": (lambda: time.sleep(0.01), 2e9),  # 200 GFLOP/s at best
        }

    monkeypatch.setattr(perf, "dense_kernels", kernels)
    peak = perf.dense_peak_flops("cpu", torch.float32, reps=2)
    assert 100e9 < peak <= 200e9


def test_peak_budget_measures_again_once_its_share_of_the_time_has_passed():
    now = [0.0]
    taken = []

    def measure(dtype):  # a measurement that takes 0.1 s of the clock
        taken.append((now[0], dtype))
        now[0] += 0.1
        return float(len(taken))

    budget = perf.PeakBudget(measure, share=0.02, clock=lambda: now[0])
    assert budget.peak(torch.float32) == 1.0  # the first call measures
    now[0] += 4.8  # 4.8 s later: under 0.1 / 0.02 = 5 s since the last measurement
    assert budget.peak(torch.float32) == 1.0 and len(taken) == 1
    now[0] += 0.3  # 5.1 s since it
    assert budget.peak(torch.float32) == 2.0 and taken[-1] == (pytest.approx(5.2), torch.float32)
    assert budget.peak(torch.bfloat16) == 3.0  # another dtype is measured at once
    assert budget.peak(torch.bfloat16) == 3.0 and len(taken) == 3


def test_machine_info_records_threads_and_load():
    info = perf.machine_info()
    assert info["torch_threads"] == torch.get_num_threads()
    assert "load_average_1_5_15" in info and "cpu_flags" in info
