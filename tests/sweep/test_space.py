from pathlib import Path

import pytest

from commlab.sweep.space import (
    SearchSpaceError,
    check_metric,
    expected_metrics,
    load_space,
    to_overrides,
)

ROOT = Path(__file__).resolve().parents[2]
TRIFEATURES_TASKS = {
    "share": "multiclass",
    "unique1": "multiclass",
    "unique2": "multiclass",
    "synergy": "binary",
}


def write(tmp_path, body: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(f"base: {ROOT / 'configs/trifeatures/smoke.yaml'}\n" + body)
    return p


@pytest.mark.parametrize("name", ["trifeatures-smoke.yaml", "trifeatures.yaml"])
def test_shipped_spaces_are_valid(name):
    space = load_space(ROOT / "search_spaces" / name)
    check_metric(space, TRIFEATURES_TASKS)
    assert space.spec.num_samples >= 4 and space.spec.params


def test_shared_keys_get_one_value(tmp_path):
    p = write(
        tmp_path,
        "metric: train/loss\nmode: min\nparams:\n  c:\n    dist: uniform\n    low: 0.1\n    high: 0.5\n"
        "    keys: [augment.modalities.0.crop_scale_min, augment.modalities.1.crop_scale_min]\n",
    )
    space = load_space(p)
    cfg = space.trial_config({"c": 0.3})
    assert [m.crop_scale_min for m in cfg.augment.modalities] == [0.3, 0.3]
    assert to_overrides(space.spec, {"c": 0.3}) == [
        "augment.modalities.0.crop_scale_min=0.3",
        "augment.modalities.1.crop_scale_min=0.3",
    ]


@pytest.mark.parametrize(
    "body, needle",
    [
        (
            "metric: train/loss\nmode: min\nnum_sample: 3\n",
            "unknown key 'num_sample' (did you mean 'num_samples'?)",
        ),
        (
            "metric: train/loss\nmode: min\nscheduler: {name: asha, grace_periods: 2}\n",
            "scheduler.grace_periods",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  loss.temprature: {dist: uniform, low: 0.1, high: 0.2}\n",
            "params.loss.temprature",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  optim.lr: {dist: loguniform, low: 0.0, high: 0.1}\n",
            "loguniform needs low > 0",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  optim.lr: {dist: uniform, low: 0.1, high: 0.01}\n",
            "must be smaller than high",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  loss.temperature: {dist: uniform, low: -0.1, high: 0.2}\n",
            "loss.temperature",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  model.pool: {dist: choice, values: [cls, max]}\n",
            "model.pool",
        ),
        (
            "metric: train/loss\nmode: min\nparams:\n  model.pool: {dist: choice}\n",
            "non-empty list of values",
        ),
        ("metric: train/loss\nmode: maximize\n", "mode"),
        ("metric: train/loss\nmode: min\noverrides: [train.epoch=3]\n", "train.epoch"),
    ],
)
def test_bad_spaces_name_file_and_key(tmp_path, body, needle):
    p = write(tmp_path, body)
    with pytest.raises(SearchSpaceError) as err:
        load_space(p)
    assert str(p) in str(err.value) and needle in str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(SearchSpaceError, match="not found"):
        load_space(tmp_path / "nope.yaml")
    p = tmp_path / "s.yaml"
    p.write_text("base: missing.yaml\nmetric: train/loss\nmode: min\n")
    with pytest.raises(SearchSpaceError, match="base: config file not found"):
        load_space(p)


def test_metric_must_be_produced(tmp_path):
    space = load_space(write(tmp_path, "metric: probe/shape/balanced_acc\nmode: max\n"))
    with pytest.raises(
        SearchSpaceError,
        match="does not produce 'probe/shape/balanced_acc'.*did you mean 'probe/share/balanced_acc'",
    ):
        check_metric(space, TRIFEATURES_TASKS)
    names = expected_metrics({"y": "regression", "g": "multilabel"})
    assert (
        "probe/y/mse" in names
        and "probe/g/f1_macro" in names
        and "probe/mean/balanced_acc" not in names
    )


def test_grace_period_beyond_epochs(tmp_path):
    p = write(
        tmp_path, "metric: train/loss\nmode: min\nscheduler: {name: asha, grace_period: 50}\n"
    )
    with pytest.raises(SearchSpaceError, match="grace_period"):
        load_space(p)
