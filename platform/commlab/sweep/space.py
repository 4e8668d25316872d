"""Search-space YAML: a base experiment config, overrides, and tuned parameters by dotted key.

Everything is validated before anything starts; every error names the file and the key. The
format is documented in search_spaces/README.md.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from commlab.config import ConfigError, ExperimentConfig, apply_overrides, validate_config
from commlab.data import build_data
from commlab.models import METHODS  # also registers each method's `loss:` options


class SearchSpaceError(ValueError):
    """A search-space problem; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(_Strict):
    """One tuned parameter. `keys` defaults to the parameter's own name; several keys share
    one sampled value (e.g. the same jitter strength for both image modalities)."""

    dist: Literal["uniform", "loguniform", "int", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    keys: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.dist in {"uniform", "loguniform", "int"}:
            if self.low is None or self.high is None:
                raise ValueError(f"dist '{self.dist}' needs low and high")
            if self.values is not None:
                raise ValueError(f"dist '{self.dist}' takes low/high, not values")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
            if self.dist == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
            if self.dist == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError("int bounds must be whole numbers")
        else:
            if not self.values:
                raise ValueError(f"dist '{self.dist}' needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ValueError(f"dist '{self.dist}' takes values, not low/high")
        return self

    def extremes(self) -> list[Any]:
        """Values that must all give a valid config (bounds, or every listed value)."""
        if self.dist == "int":
            return [int(self.low or 0), int(self.high or 0)]
        if self.dist in {"uniform", "loguniform"}:
            return [self.low, self.high]
        return list(self.values or [])


class Searcher(_Strict):
    name: Literal["optuna", "random"] = "optuna"
    seed: int = 0


class Scheduler(_Strict):
    name: Literal["asha", "none"] = "asha"
    grace_period: Annotated[int, Field(ge=1)] = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2
    max_epochs: Annotated[int, Field(ge=1)] | None = None  # default: the base config's train.epochs


class Resources(_Strict):
    workers: Annotated[int, Field(ge=1)] = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0


class Stop(_Strict):
    time_budget_s: Annotated[float, Field(gt=0)] | None = None
    metric_threshold: float | None = None  # stop a trial once the metric reaches this (mode-aware)


class SearchSpace(_Strict):
    name: str | None = None
    base: str
    overrides: list[str] = Field(default_factory=list)
    metric: str
    mode: Literal["max", "min"]
    num_samples: Annotated[int, Field(ge=1)] = 8
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1
    searcher: Searcher = Field(default_factory=Searcher)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    stop: Stop = Field(default_factory=Stop)
    params: dict[str, Param] = Field(default_factory=dict)


class LoadedSpace(BaseModel):
    """A validated search space with its resolved base config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    spec: SearchSpace
    base_raw: dict[str, Any]
    base: ExperimentConfig
    text: str = ""  # the file as read (logged with the sweep; the path may vanish later)

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    @property
    def max_epochs(self) -> int:
        return self.spec.scheduler.max_epochs or self.base.train.epochs

    def trial_config(self, sampled: dict[str, Any]) -> ExperimentConfig:
        """The experiment config of one trial: base + overrides + the sampled values."""
        return validate_config(apply_overrides(self.base_raw, to_overrides(self.spec, sampled)))


def _fmt(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def to_overrides(spec: SearchSpace, sampled: dict[str, Any]) -> list[str]:
    out = []
    for name, value in sampled.items():
        param = spec.params[name]
        for key in param.keys or [name]:
            out.append(f"{key}={_fmt(value)}")
    return out


def _err(path: Path, msg: str) -> SearchSpaceError:
    return SearchSpaceError(f"{path}: {msg}")


def load_space(path: str | Path) -> LoadedSpace:
    """Parse and validate a search-space file; raise SearchSpaceError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise SearchSpaceError(f"search space file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise _err(path, f"not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise _err(path, "top level must be a mapping")
    try:
        spec = SearchSpace.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                parent = e["loc"][:-1]
                valid = _fields_at(parent)
                close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                lines.append(f"unknown key '{key}'{hint}")
            else:
                lines.append(f"{key}: {e['msg']}")
        raise _err(path, "invalid search space: " + "; ".join(lines)) from None

    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise _err(path, f"base: config file not found: {base_path}")
    try:
        base_raw = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise _err(
            path, f"base: {base_path} is not valid YAML: {' '.join(str(err).split())}"
        ) from None
    if not isinstance(base_raw, dict):
        raise _err(path, f"base: {base_path}: top level must be a mapping")
    try:
        base_raw = apply_overrides(base_raw, spec.overrides)
        base = validate_config(base_raw, str(base_path))
    except ConfigError as err:
        raise _err(path, f"overrides: {err}") from None
    for name, param in spec.params.items():
        for key in param.keys or [name]:
            for value in param.extremes():
                try:
                    validate_config(apply_overrides(base_raw, [f"{key}={_fmt(value)}"]))
                except ConfigError as err:
                    raise _err(path, f"params.{name} ({key}={value!r}): {err}") from None
    if spec.scheduler.name == "asha" and spec.scheduler.grace_period > (
        spec.scheduler.max_epochs or base.train.epochs
    ):
        raise _err(path, "scheduler.grace_period is larger than the number of epochs")
    return LoadedSpace(path=path, spec=spec, base_raw=base_raw, base=base, text=text)


def _fields_at(parent: tuple[Any, ...]) -> list[str]:
    """Valid key names under `parent` (for 'did you mean' hints)."""
    if not parent:
        return list(SearchSpace.model_fields)
    if parent[0] == "params":
        return list(Param.model_fields)
    sub = SearchSpace.model_fields.get(str(parent[0]))
    cls = sub.annotation if sub is not None else None
    return list(getattr(cls, "model_fields", {}))


def expected_metrics(tasks: dict[str, str], method: str = "comm", n_mod: int = 2) -> set[str]:
    """Metric names training produces with `method` on `n_mod` modalities, for a dataset whose
    tasks have these kinds: the loss and the terms and accuracies the method declares."""
    per_kind = {
        "multiclass": ("balanced_acc", "acc", "C"),
        "binary": ("balanced_acc", "acc", "C"),
        "multilabel": ("f1_macro", "f1_weighted", "C"),
        "regression": ("mse", "r2", "alpha"),
    }
    names = {"train/loss", "train/lr", "perf/samples_per_s", "perf/mfu", "perf/epoch_time_s"}
    names.update(f"train/{key}" for key in METHODS.get(method).loss_keys(n_mod))
    for task, kind in tasks.items():
        names.update(f"probe/{task}/{m}" for m in per_kind[kind])
    if sum(k in {"multiclass", "binary"} for k in tasks.values()) >= 2:
        names.add("probe/mean/balanced_acc")
    return names


def _methods(space: LoadedSpace) -> set[str]:
    """Every method a trial of this space can train: the base's, or those a parameter samples."""
    sampled = [
        param.extremes()
        for name, param in space.spec.params.items()
        if "model.method" in (param.keys or [name])
    ]
    return {str(m) for values in sampled for m in values} or {space.base.model.method}


def check_metric(space: LoadedSpace, tasks: dict[str, str]) -> None:
    """The selection metric must be one that training produces for this dataset, with every
    method the space trains."""
    metric = space.spec.metric
    n_mod = len(space.base.model.modalities)
    valid = set.intersection(*(expected_metrics(tasks, m, n_mod) for m in sorted(_methods(space))))
    if space.base.data.probe_tasks is not None:
        valid = {
            m
            for m in valid
            if not m.startswith("probe/")
            or m.split("/")[1] in space.base.data.probe_tasks
            or m.startswith("probe/mean/")
        }
    if metric.startswith("probe/") and metric in valid and space.base.train.probe_every != 1:
        raise _err(
            space.path,
            f"metric '{metric}' exists only on probe epochs; ASHA and Optuna need it every epoch: "
            "add train.probe_every=1 to overrides",
        )
    if metric in valid:
        return
    close = difflib.get_close_matches(metric, sorted(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise _err(
        space.path,
        f"metric: training does not produce '{metric}'{hint}; it produces: {', '.join(sorted(valid))}",
    )


def dataset_tasks(space: LoadedSpace) -> dict[str, str]:
    """Task kinds of the sweep's dataset (built once here; cached on disk for the trials)."""
    d = space.base.data
    bundle = build_data(d.name, str(Path(d.path).resolve()), space.base.seed, d.params)
    return {k: t.kind for k, t in bundle.probe.tasks.items()}


def sweep_plan(path: str | Path) -> LoadedSpace:
    """Validate a search space without running it (`commlab sweep --check`): the file, its
    base config, every parameter's extremes and the metric against the dataset's tasks."""
    space = load_space(path)
    check_metric(space, dataset_tasks(space))
    return space
