"""MLflow tag names, each written once: commlab's own (`commlab.*`) and the MLflow and Ray tags
commlab reads. Runs, sweeps, trials and registered model versions share these names; the
`commlab runs` tables, promotion and the tests find runs by them."""

# set by MLflow and Ray
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray.trial_id"  # a trial's Tune id, on its child run
# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says otherwise
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

# every commlab run
KIND_TAG = "commlab.kind"  # pretrain | sweep | trial (also the Ray job metadata key)
METHOD_TAG = "commlab.method"
RUN_KEY_TAG = "commlab.run_key"  # what reopens a run on resume
ERROR_TAG = "commlab.error"
WORKERS_TAG = "commlab.workers"
PROCESS_TAG = "commlab.process"  # host:pid of the process a sweep trial started in
ATTEMPTS_TAG = "commlab.attempts"
RESUMED_FROM_EPOCH_TAG = "commlab.resumed_from_epoch"
RUN_DIR_TAG = "commlab.run_dir"  # a local pretraining run's directory
RAY_RUN_DIR_TAG = "commlab.ray_run_dir"
CHANGED_PREFIX = "commlab.changed."  # + a param whose value changed on resume
PROBE_PREFIX = "commlab.probe."  # + <task>.<hyperparameter> a probe chose
RUS_PREFIX = "commlab.rus."  # + R/U/S axis

# sweeps (the parent run) and their trials
SWEEP_TAG = "commlab.sweep"  # the sweep's name, on the parent and every trial
METRIC_TAG = "commlab.metric"
MODE_TAG = "commlab.mode"
SWEEP_PATH_TAG = "commlab.sweep_path"
RESUME_ERROR_TAG = "commlab.resume_error"
TRIALS_TAG = "commlab.trials"
BEST_TRIAL_ID_TAG = "commlab.best_trial_id"
BEST_METRIC_TAG = "commlab.best_metric"
BEST_CHECKPOINT_TAG = "commlab.best_checkpoint"
BEST_PARAM_PREFIX = "commlab.best_param."
PARAM_PREFIX = "commlab.param."  # + a trial's sampled parameter
STOPPED_EARLY_TAG = "commlab.stopped_early"
# on a trial's child run that the sweep lost: its driver died before Tune recorded the trial
LOST_TAG = "commlab.lost_trial"
RUS_TRIAL_TAG = "commlab.rus_trial_id"  # the trial whose R/U/S report the parent carries

# registered model versions: lineage of the promoted trial (and SWEEP_TAG, METRIC_TAG,
# MODE_TAG, METHOD_TAG)
TRIAL_RUN_TAG = "commlab.trial_run_id"
SWEEP_RUN_ID_TAG = "commlab.sweep_run_id"
TRIAL_ID_TAG = "commlab.trial_id"
METRIC_VALUE_TAG = "commlab.metric_value"
DATA_FINGERPRINT_TAG = "commlab.data_fingerprint"
CODE_VERSION_TAG = "commlab.code_version"
EPOCHS_TAG = "commlab.epochs"
SEED_TAG = "commlab.seed"
