"""The shipped per-dataset configs and search spaces are valid and agree with the importers."""

from __future__ import annotations

import math

import pytest
import yaml

from commlab.config import apply_overrides, load_config, validate_config

from .fixtures import ROOT

DATASETS = {  # config dir -> (importer task, modality kinds in importer order)
    "mosi": ("sentiment", ["sequence", "sequence"]),
    "humor": ("humor", ["sequence", "sequence"]),
    "sarcasm": ("sarcasm", ["sequence", "sequence"]),
    "mimic": ("icd9_7", ["tabular", "sequence"]),
    "visionandtouch": ("contact", ["image", "sequence", "tabular"]),
    "mmimdb": ("genres", ["image", "text"]),
}
SPACE_KEYS = {
    "base", "overrides", "metric", "mode", "num_samples", "max_concurrent_trials", "searcher",
    "scheduler", "resources", "params",
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_config_loads_and_matches_the_importer(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name / "comm.yaml")
    _, kinds = DATASETS[name]
    assert cfg.data.name == "parquet" and cfg.data.path == f"data/{name}"
    assert len(cfg.model.modalities) == len(kinds)
    assert [a.kind for a in cfg.augment.modalities] == kinds


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_search_space_is_consistent(name: str) -> None:
    space = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    assert set(space) == SPACE_KEYS
    assert space["base"] == f"configs/{name}/comm.yaml"
    task, _ = DATASETS[name]
    assert space["metric"].startswith(f"probe/{task}/") and space["mode"] == "max"
    raw = yaml.safe_load((ROOT / space["base"]).read_text())
    raw = apply_overrides(raw, space["overrides"])
    assert space["scheduler"]["max_epochs"] == validate_config(raw).train.epochs
    for key, dist in space["params"].items():
        assert dist["dist"] in ("uniform", "loguniform") and dist["low"] < dist["high"]
        assert dist["dist"] == "uniform" or dist["low"] > 0
        for value in (dist["low"], dist["high"], math.sqrt(dist["low"] * dist["high"])):
            validate_config(apply_overrides(raw, [f"{key}={value}"]))
