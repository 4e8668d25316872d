"""Promotion: a sweep's best finished trial becomes a registered model version with an alias.

The promoted model is an MLflow **pyfunc model directory** whose loader is `commlab.pretrained`::

    MLmodel                      flavour python_function, loader_module commlab.pretrained
    data/encoder/checkpoint.pt   weights + resolved config + metadata (torch.load weights_only)
    data/encoder/config.yaml     the resolved experiment config, for people
    data/encoder/lineage.json    sweep, trial, metric, data fingerprint, code version
    requirements.txt, python_env.yaml, conda.yaml

No pickled Python object is involved: `commlab.load_encoder("models:/NAME@ALIAS")` rebuilds the
method from the checkpoint's config, and `mlflow.pyfunc.load_model` works wherever commlab is
installed. The directory is an MLflow 3 *logged model* of the trial's experiment (source run =
the trial) and each registry version points at it; the trial run itself is not modified.

Selection: the best FINISHED trial by the best value of the metric over the trial's history
(max or min by mode), the rule the sweep uses for its `commlab.best_trial_id` tag; ties go to
the earlier trial. Lineage is stored as model-version tags (`commlab.*`). Promoting a trial
that a version of the model already holds (tag `commlab.trial_run_id`) only (re)sets the alias.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from commlab.checkpoint_format import CHECKPOINT_NAME, load_checkpoint, package_versions
from commlab.config import ExperimentConfig, to_yaml
from commlab.tags import (
    CODE_VERSION_TAG,
    DATA_FINGERPRINT_TAG,
    EPOCHS_TAG,
    METHOD_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    MODE_TAG,
    SEED_TAG,
    SWEEP_RUN_ID_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    TRIAL_RUN_TAG,
)
from commlab.tracking.query import (
    MODES,
    children,
    client_for,
    find_sweep,
    rank,
    trial_row,
)

CHECKPOINT_ARTIFACT = f"checkpoint/{CHECKPOINT_NAME}"
CONFIG_ARTIFACT = "config.yaml"
DATA_DIR = "encoder"  # the pyfunc data directory: data/encoder/
LOADER_MODULE = "commlab.pretrained"
# Kept out of the promoted checkpoint: training state, not the model.
_TRAINING_ONLY = ("optimizer", "scheduler", "rng", "global_step")
_ALIAS = re.compile(r"^[\w\-]+$")
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")
_MAX_NAME = 256  # the registry's name column


class PromotionError(ValueError):
    """Promotion cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Promotion:
    model: str
    version: int
    alias: str
    created: bool  # False: the trial was already a version; only the alias was (re)set
    sweep: str
    sweep_run_id: str
    trial_id: str
    trial_run_id: str
    metric: str
    mode: str
    value: float
    model_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.model}@{self.alias}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def check_model_name(name: str) -> None:
    """MLflow's registered-model name rules, checked before any call, plus '@' (it would break
    `models:/NAME@ALIAS` URIs) and quotes (registry search filters cannot express them)."""
    if not isinstance(name, str) or not name.strip():
        raise PromotionError("model name is empty")
    bad = [c for c in ("/", ":", "@", "'", '"') if c in name]
    if bad:
        raise PromotionError(f"invalid model name {name!r}: it must not contain {' '.join(bad)}")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        raise PromotionError(
            f"invalid model name {name!r}: names are used as paths and must not resolve to "
            f"another name ({norm!r})"
        )
    if name != name.strip():
        raise PromotionError(f"invalid model name {name!r}: leading or trailing whitespace")
    if len(name) > _MAX_NAME:
        raise PromotionError(f"invalid model name: longer than {_MAX_NAME} characters")


def check_alias(alias: str) -> None:
    if not alias or not _ALIAS.match(alias) or len(alias) > 255:
        raise PromotionError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' (at most 255)"
        )
    if alias.lower() == "latest" or _VERSION_ALIAS.match(alias):
        raise PromotionError(f"alias {alias!r} is reserved by MLflow (latest, v<number>)")


def find_version(client: MlflowClient, model: str, trial_run_id: str) -> ModelVersion | None:
    """The oldest version of `model` promoted from the trial run `trial_run_id`, if any."""
    try:
        found = client.search_model_versions(
            f"name = '{model}' and tags.`{TRIAL_RUN_TAG}` = '{trial_run_id}'"
        )
    except MlflowException:
        return None  # no such registered model yet
    versions = [v for v in found if v.tags.get(TRIAL_RUN_TAG) == trial_run_id]
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _select(client: MlflowClient, parent: Any, metric: str, mode: str) -> dict[str, Any]:
    name = parent.data.tags.get(SWEEP_TAG, parent.info.run_id)
    runs = children(client, parent)
    if not runs:
        raise PromotionError(f"sweep {name!r} (run {parent.info.run_id}) has no trials")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        raise PromotionError(f"sweep {name!r} has no FINISHED trials ({statuses})")
    rows = rank([trial_row(client, r, metric, mode) for r in finished], mode)
    if rows[0]["value"] is None:
        logged = sorted({k for r in finished for k in r.data.metrics})
        raise PromotionError(
            f"metric {metric!r} is missing: none of the {len(finished)} FINISHED trials of sweep "
            f"{name!r} logged a finite value of it; metrics they logged: {logged}"
        )
    return rows[0]


def _download_checkpoint(client: MlflowClient, trial: dict[str, Any], dst: Path) -> Path:
    folder = posixpath.dirname(CHECKPOINT_ARTIFACT)
    listed = {a.path for a in client.list_artifacts(trial["run_id"], folder)}
    if CHECKPOINT_ARTIFACT not in listed:
        raise PromotionError(
            f"trial {trial['trial_id']} (run {trial['run_id']}) has no checkpoint artifact "
            f"{CHECKPOINT_ARTIFACT}; was it logged by a commlab worker? (its artifacts under "
            f"{folder}/: {sorted(listed) or 'none'})"
        )
    return Path(client.download_artifacts(trial["run_id"], CHECKPOINT_ARTIFACT, str(dst)))


def build_model_dir(
    ckpt: dict[str, Any], config_yaml: str, lineage: dict[str, str], out: Path
) -> Path:
    """Write the pyfunc model directory (layout in the module docstring) at `out`."""
    data = out.parent / f"{out.name}-data" / DATA_DIR
    data.mkdir(parents=True)
    torch.save({k: v for k, v in ckpt.items() if k not in _TRAINING_ONLY}, data / CHECKPOINT_NAME)
    (data / "config.yaml").write_text(config_yaml)
    (data / "lineage.json").write_text(json.dumps(lineage, indent=1) + "\n")
    packages = package_versions()
    # Explicit requirements: inferring them would import the model in a subprocess.
    reqs = [f"{p}=={packages[p]}" for p in ("commlab", "torch", "numpy", "kornia") if p in packages]
    mlflow.pyfunc.save_model(
        str(out),
        loader_module=LOADER_MODULE,
        data_path=str(data),
        pip_requirements=reqs,
        metadata={"commlab": lineage},
    )
    return out


def promote(
    sweep: str,
    model: str,
    *,
    alias: str = "champion",
    metric: str | None = None,
    mode: str | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> Promotion:
    """Register the best FINISHED trial of `sweep` (name or parent run id) as a version of
    `model` and point `alias` at it. `metric`/`mode` default to the sweep's selection metric;
    a metric other than the sweep's needs an explicit mode."""
    check_model_name(model)
    check_alias(alias)
    if mode is not None and mode not in MODES:
        raise PromotionError(f"mode must be one of {MODES}, got {mode!r}")
    client, _ = client_for(tracking_uri)
    choice = _choose(client, sweep, experiment, metric, mode)
    existing = find_version(client, model, choice.run_id)
    if existing is not None:
        client.set_registered_model_alias(model, alias, existing.version)
        return _promotion(model, alias, choice, existing, created=False)
    model_id, lineage = _log_encoder(client, choice)
    version = _register_version(client, model, choice, model_id, lineage)
    client.set_registered_model_alias(model, alias, version.version)
    return _promotion(model, alias, choice, version, created=True)


@dataclass(frozen=True)
class _Choice:
    """The trial to promote, and the sweep and ranking it won."""

    sweep: str  # the sweep's name
    sweep_run_id: str
    trial: dict[str, Any]  # the trial's row: trial_id, run_id, value, ...
    metric: str
    mode: str

    @property
    def run_id(self) -> str:
        return str(self.trial["run_id"])


def _choose(
    client: MlflowClient, sweep: str, experiment: str | None, metric: str | None, mode: str | None
) -> _Choice:
    """The sweep's best FINISHED trial by `metric` and `mode` (default: the sweep's)."""
    parent = find_sweep(client, sweep, experiment)
    sweep_name = parent.data.tags.get(SWEEP_TAG, sweep)
    metric, mode = _ranking(parent.data.tags, sweep_name, metric, mode)
    best = _select(client, parent, metric, mode)
    return _Choice(sweep_name, parent.info.run_id, best, metric, mode)


def _ranking(
    tags: dict[str, str], sweep_name: str, metric: str | None, mode: str | None
) -> tuple[str, str]:
    """The metric and mode to rank the trials by: the given ones, else the sweep's."""
    metric = metric or tags.get(METRIC_TAG)
    if not metric:
        raise PromotionError(
            f"sweep {sweep_name!r} has no {METRIC_TAG} tag: pass --metric and --mode"
        )
    if mode is None:
        if metric != tags.get(METRIC_TAG) or tags.get(MODE_TAG) not in MODES:
            raise PromotionError(
                f"--mode max|min is needed to rank by {metric!r}, which is not the sweep's "
                f"selection metric ({tags.get(METRIC_TAG)})"
            )
        mode = tags[MODE_TAG]
    return metric, mode


def _log_encoder(client: MlflowClient, choice: _Choice) -> tuple[str, dict[str, str]]:
    """The trial's checkpoint as a logged model of its experiment (source run = the trial);
    returns the logged model's id and the lineage it is tagged with."""
    with tempfile.TemporaryDirectory(prefix="commlab-promote-") as tmp:
        ckpt = _trial_checkpoint(client, choice.trial, Path(tmp) / "trial")
        config_yaml = to_yaml(ExperimentConfig.model_validate(ckpt["config"]))
        lineage = _lineage(choice, ckpt)
        model_dir = build_model_dir(ckpt, config_yaml, lineage, Path(tmp) / "model")
        trial_run = client.get_run(choice.run_id)
        logged = client.create_logged_model(
            trial_run.info.experiment_id,
            name=DATA_DIR,
            source_run_id=choice.run_id,
            tags=lineage,
            model_type="commlab-encoder",
        )
        try:
            client.log_model_artifacts(logged.model_id, str(model_dir))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id, lineage


def _trial_checkpoint(client: MlflowClient, trial: dict[str, Any], dst: Path) -> dict[str, Any]:
    path = _download_checkpoint(client, trial, dst)
    try:
        return load_checkpoint(path)
    except ValueError as err:
        raise PromotionError(f"trial {trial['trial_id']}: {err}") from None


def _lineage(choice: _Choice, ckpt: dict[str, Any]) -> dict[str, str]:
    """Where the promoted model comes from: model-version and logged-model tags."""
    return {
        SWEEP_TAG: choice.sweep,
        SWEEP_RUN_ID_TAG: choice.sweep_run_id,
        TRIAL_RUN_TAG: choice.run_id,
        TRIAL_ID_TAG: str(choice.trial["trial_id"]),
        METRIC_TAG: choice.metric,
        MODE_TAG: choice.mode,
        METRIC_VALUE_TAG: repr(float(choice.trial["value"])),
        DATA_FINGERPRINT_TAG: str(ckpt.get("data_fingerprint", "")),
        CODE_VERSION_TAG: str(ckpt.get("code_version", "")),
        METHOD_TAG: str(ckpt["config"]["model"]["method"]),
        EPOCHS_TAG: str(ckpt.get("epoch", "")),  # epochs trained (= next epoch)
        SEED_TAG: str(ckpt.get("seed", "")),
    }


def _register_version(
    client: MlflowClient, model: str, choice: _Choice, model_id: str, lineage: dict[str, str]
) -> ModelVersion:
    """A new version of `model` (registered on first use) holding the logged model."""
    _ensure_registered_model(client, model)
    trial = choice.trial
    # The source is the logged model's artifact location, not models:/<id>: the registry's
    # sqlalchemy store resolves models:/ URIs with the *global* tracking URI (mlflow 3.17).
    return client.create_model_version(
        model,
        source=client.get_logged_model(model_id).artifact_location,
        run_id=choice.run_id,
        tags=lineage,
        description=(
            f"best FINISHED trial {trial['trial_id']} of sweep {choice.sweep}: "
            f"{choice.metric} = {trial['value']:.4f} ({choice.mode}, best over the trial's history)"
        ),
        model_id=model_id,
    )


def _promotion(
    model: str, alias: str, choice: _Choice, version: ModelVersion, created: bool
) -> Promotion:
    return Promotion(
        model, int(version.version), alias, created, choice.sweep, choice.sweep_run_id,
        choice.trial["trial_id"], choice.run_id, choice.metric, choice.mode,
        float(choice.trial["value"]), version.model_id or _model_id_in(version.source),
    )  # fmt: skip


def _model_id_in(source: str | None) -> str | None:
    m = re.search(r"/models/(m-[0-9a-f]+)/", source or "")
    return m[1] if m else None


def _ensure_registered_model(client: MlflowClient, model: str) -> None:
    try:
        client.get_registered_model(model)
    except MlflowException:
        try:
            client.create_registered_model(
                model, description="CoMM encoders promoted by `commlab promote`"
            )
        except MlflowException as err:
            if "already exists" not in str(err).lower():  # a concurrent promote created it
                raise


# ---------------------------------------------------------------- loading
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?/?$")


def model_location(client: MlflowClient, uri: str) -> tuple[str, ModelVersion | None]:
    """Where the files of `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/m-<id>`
    are. Resolved with `client` (MLflow's own models:/ resolution uses the global URI)."""
    m = _MODELS_URI.match(uri)
    if m is None:
        raise ValueError(
            f"{uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<id>"
        )
    name, alias, version = m["name"], m["alias"], m["version"]
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version:
            mv = client.get_model_version(name, version)
        elif name.startswith("m-"):
            return client.get_logged_model(name).artifact_location, None
        else:
            raise ValueError(f"{uri!r}: give an alias (models:/{name}@champion) or a version")
    except MlflowException as err:
        raise LookupError(f"{uri}: {err.message}") from None
    return client.get_model_version_download_uri(name, mv.version), mv


def fetch_model(source: str, dst: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download what `source` names into `dst`: a promoted model directory for models:/ URIs,
    the checkpoint file for runs:/RUN_ID[/path] or a bare run id."""
    client, uri = client_for(tracking_uri)
    Path(dst).mkdir(parents=True, exist_ok=True)
    if source.startswith("models:/"):
        location, _ = model_location(client, source)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(dst), tracking_uri=uri
            )
        )
    run_id, _, path = source.removeprefix("runs:/").partition("/")
    path = path.strip("/") or CHECKPOINT_ARTIFACT
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except MlflowException as err:
        raise LookupError(f"run {run_id}: cannot fetch {path}: {err.message}") from None


def model_versions(model: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of `model` with its tags and aliases, oldest first."""
    client, _ = client_for(tracking_uri)
    aliases: dict[str, list[str]] = {}
    for a, v in client.get_registered_model(model).aliases.items():
        aliases.setdefault(str(v), []).append(a)
    versions = client.search_model_versions(f"name = '{model}'")
    return [
        {
            "version": int(v.version),
            "aliases": sorted(aliases.get(str(v.version), [])),
            "run_id": v.run_id,
            "source": v.source,
            "status": v.status,
            "tags": dict(v.tags),
        }
        for v in sorted(versions, key=lambda v: int(v.version))
    ]


__all__ = [
    "CHECKPOINT_ARTIFACT",
    "Promotion",
    "PromotionError",
    "build_model_dir",
    "check_alias",
    "check_model_name",
    "fetch_model",
    "find_version",
    "model_location",
    "model_versions",
    "promote",
]
