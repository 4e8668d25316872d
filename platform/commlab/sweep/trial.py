"""One sweep trial: a Tune function trainable that runs a Ray Train (V2) pretraining run.

The trial's MLflow child run is nested under the sweep's parent run and keyed by the trial id,
so a resumed sweep (or a retried trial) logs into the same child run. The inner Train run is
named `train-trial_id=<id>`: a restarted trial resumes it from its last checkpoint.
"""

from __future__ import annotations

from typing import Any

from commlab.config import ExperimentConfig, apply_overrides, flatten, validate_config
from commlab.sweep.space import LoadedSpace, to_overrides

SWEEP_TAG = "commlab.sweep"
TRIAL_TAG = "ray.trial_id"
PARENT_TAG = "mlflow.parentRunId"


def trial_config(
    base_raw: dict[str, Any], overrides: list[str], max_epochs: int
) -> ExperimentConfig:
    return validate_config(apply_overrides(base_raw, [*overrides, f"train.epochs={max_epochs}"]))


def make_trainable(space: LoadedSpace, parent: Any, storage: str, sweep_name: str) -> Any:
    """A closure over plain data (picklable) that Tune runs once per trial."""
    spec = space.spec
    base_raw = space.base_raw
    max_epochs = space.max_epochs
    resources = spec.resources.model_dump()
    metric, mode = spec.metric, spec.mode

    def trainable(config: dict[str, Any]) -> None:
        import ray.train
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from commlab.tracking import finish_run
        from commlab.tracking.runs import open_run
        from commlab.train.trainer import RayTrainSettings, build_trainer

        ctx = tune.get_context()
        trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
        cfg = trial_config(base_raw, to_overrides(spec, config), max_epochs)
        ref, _ = open_run(
            parent.tracking_uri,
            cfg.name,
            run_key=f"trial:{storage}/{trial_id}",
            run_name=trial_name,
            params=flatten(cfg),
            tags={
                PARENT_TAG: parent.run_id,
                TRIAL_TAG: trial_id,
                SWEEP_TAG: sweep_name,
                "commlab.kind": "trial",
                "commlab.method": cfg.model.method,
                **{f"commlab.param.{k}": str(v) for k, v in config.items()},
            },
        )
        settings = RayTrainSettings(
            workers=resources["workers"],
            cpus_per_worker=resources["cpus_per_worker"],
            gpus_per_worker=resources["gpus_per_worker"],
            max_failures=1,
            selection_metric=metric,
            selection_mode=mode,
        )
        trainer = build_trainer(
            cfg,
            settings,
            name=f"train-trial_id={trial_id}",
            storage_path=storage,
            run=ref,
            callbacks=[TuneReportCallback()],
        )
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            finish_run(ref, "FAILED", f"{type(err).__name__}: {err}")
            raise
        outcome = result.return_value or {}
        if outcome.get("status") == "nonfinite":
            finish_run(ref, "FAILED", outcome.get("error"))
            raise RuntimeError(f"trial {trial_id}: {outcome.get('error')}")
        finish_run(ref, "FINISHED")

    trainable.__name__ = f"comm_trial_{sweep_name}".replace("-", "_")
    return trainable
