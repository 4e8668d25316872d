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


def write(tmp_path, body: str, base: str = "configs/trifeatures/smoke.yaml") -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(f"base: {ROOT / base}\n" + body)
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


@pytest.mark.parametrize(
    ("base", "metric"),
    [
        ("configs/synthetic/cross.yaml", "train/clip_loss"),
        ("configs/synthetic/cmc.yaml", "train/cmc_loss_0_1"),
        ("configs/synthetic/cross_self.yaml", "train/self_acc_2"),
        ("configs/synthetic/comm.yaml", "train/ssl_loss_2"),
        ("configs/trifeatures/smoke.yaml", "train/ssl_acc_0"),
    ],
)
def test_metric_may_be_any_term_the_method_logs(tmp_path, base, metric):
    check_metric(
        load_space(write(tmp_path, f"metric: {metric}\nmode: min\n", base)), TRIFEATURES_TASKS
    )


@pytest.mark.parametrize(
    ("base", "metric", "hint"),
    [
        ("configs/synthetic/cross.yaml", "train/clip_los", "did you mean 'train/clip_loss'"),
        ("configs/synthetic/cross.yaml", "train/ssl_loss_0", "it produces: "),
        ("configs/synthetic/comm.yaml", "train/ssl_loss_3", "did you mean 'train/ssl_loss_"),
        ("configs/synthetic/comm.yaml", "train/clip_loss", "it produces: "),
    ],
)
def test_metric_the_method_does_not_log_is_rejected_with_a_hint(tmp_path, base, metric, hint):
    space = load_space(write(tmp_path, f"metric: {metric}\nmode: min\n", base))
    with pytest.raises(SearchSpaceError, match=f"does not produce '{metric}'.*{hint}"):
        check_metric(space, TRIFEATURES_TASKS)


def test_metric_must_be_logged_by_every_method_the_space_samples(tmp_path):
    methods = "params:\n  model.method: {dist: choice, values: [cross, cmc]}\n"
    for metric in ("train/ssl_acc", "train/loss"):
        body = f"metric: {metric}\nmode: max\n{methods}"
        check_metric(load_space(write(tmp_path, body, "configs/synthetic/cross.yaml")), {})
    space = load_space(
        write(
            tmp_path,
            f"metric: train/clip_loss\nmode: min\n{methods}",
            "configs/synthetic/cross.yaml",
        )
    )
    with pytest.raises(SearchSpaceError, match="does not produce 'train/clip_loss'"):
        check_metric(space, {})


def test_loss_params_are_checked_against_the_methods_options(tmp_path):
    body = "metric: train/loss\nmode: min\nparams:\n  loss.temperature: {dist: uniform, low: 0.05, high: 0.5}\n"
    with pytest.raises(
        SearchSpaceError,
        match=r"(?s)params.loss.temperature .*'loss.temperature' is not an option of method 'cross'; "
        r"its options: gather, logit_scale_init",
    ):
        load_space(write(tmp_path, body, "configs/synthetic/cross.yaml"))
    load_space(write(tmp_path, body, "configs/synthetic/cmc.yaml"))
