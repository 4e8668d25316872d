"""Driver-side Tune callbacks: close MLflow child runs that Tune ended, and a compact live view."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from rich.console import Console
from rich.markup import escape

from commlab.checkpoint_format import CHECKPOINT_NAME
from commlab.tags import LOST_TAG, PARENT_TAG, STOPPED_EARLY_TAG, TRIAL_TAG
from commlab.tracking import finish_run
from commlab.tracking.runs import RunLogger, RunRef, set_tags

METRIC_NAMESPACES = ("train", "val", "probe", "perf")


class FinishingASHA(ASHAScheduler):
    """ASHA that lets a trial end by itself after its last epoch.

    Ray's ASHA answers STOP to every result at `max_t`, i.e. to each trial's last report. Tune
    then tears the trial down while rank 0 is still logging, after `fit()`, the checkpoint
    artifact, the config and the R/U/S report: depending on who won that race, FINISHED runs
    had no R/U/S tags or artifacts (and no checkpoint for `commlab promote`). The rungs and
    every early-stopping decision are ASHA's own.
    """

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE  # the trial function returns right after
        return action


class CloseChildRuns(Callback):
    """Runs in the Tuner process. When ASHA stops a trial, its Train workers are torn down and
    the worker never closes its MLflow run; an errored trial may not either. Close them here:
    stopped early -> FINISHED with the tag `commlab.stopped_early=true` (an early stop is the
    scheduler working, not a failure: Tune's own MLflowLoggerCallback also ends such trials
    FINISHED) and the checkpoint of its last report as its `checkpoint` artifact, error ->
    FAILED. A run already terminal keeps its status."""

    # How long to let a stopped trial's rank 0 finish logging the epoch it just reported
    # before the driver logs what is still missing (it logs each epoch *after* reporting it).
    SETTLE_S = 3.0

    def __init__(self, parent: Any, max_epochs: int) -> None:
        self.parent = parent
        self.max_epochs = max_epochs
        self.reported: dict[str, dict[int, dict[str, float]]] = {}  # trial -> epoch -> metrics

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        epoch = result.get("epoch")
        if isinstance(epoch, int | float) and not isinstance(epoch, bool):
            self.reported.setdefault(trial.trial_id, {})[int(epoch)] = {
                k: v
                for k, v in result.items()
                if k.split("/", 1)[0] in METRIC_NAMESPACES and isinstance(v, int | float)
            }

    def _backfill(self, trial: Any, ref: RunRef) -> None:
        """Log the epochs Tune saw that the run lacks. A trial stopped by ASHA is torn down
        right after its report, and its rank 0 logs that epoch to MLflow only after the
        report: without this, a trial stopped at its first rung could have no metrics."""
        seen = self.reported.get(trial.trial_id, {})
        if not seen or set(seen) <= RunLogger(ref).logged_epochs:
            return
        time.sleep(self.SETTLE_S)
        logger = RunLogger(ref)  # re-read: rank 0 may have finished meanwhile
        for epoch in sorted(set(seen) - logger.logged_epochs):
            logger.log_epoch(epoch, seen[epoch])

    def _log_last_checkpoint(self, trial: Any, ref: RunRef) -> None:
        """A trial ASHA stopped never reaches its final logging, which puts its checkpoint in
        MLflow: log the checkpoint of its last report instead (from local or shared storage;
        a remote URI is left alone), so that `commlab promote` can promote it."""
        path = (trial.last_result or {}).get("checkpoint_path")
        if not path or "://" in str(path):
            return
        file = Path(path) / CHECKPOINT_NAME
        logger = RunLogger(ref)
        if file.is_file() and not logger.client.list_artifacts(ref.run_id, "checkpoint"):
            logger.log_artifact(file, "checkpoint")

    def _running_children(self, trial_id: str | None = None) -> list[tuple[RunRef, Any]]:
        """(reference, MLflow run) of the parent's child runs still RUNNING (of one trial,
        given `trial_id`)."""
        query = f"tags.`{PARENT_TAG}` = '{self.parent.run_id}' and attributes.status = 'RUNNING'"
        if trial_id is not None:
            query += f" and tags.`{TRIAL_TAG}` = '{trial_id}'"
        runs = self.parent.client().search_runs([self.parent.experiment_id], filter_string=query)
        parent = self.parent
        return [(RunRef(parent.tracking_uri, parent.experiment_id, r.info.run_id), r) for r in runs]

    def _close(
        self,
        trial: Any,
        status: str,
        tags: dict[str, str] | None = None,
        last_checkpoint: bool = False,
    ) -> None:
        for ref, _ in self._running_children(trial.trial_id):
            self._backfill(trial, ref)
            if last_checkpoint:
                self._log_last_checkpoint(trial, ref)
            if tags:
                set_tags(ref.client(), ref.run_id, tags)
            finish_run(ref, status)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        """Close child runs of trials this sweep does not know: a driver that died right after
        a trial started (before Tune's next save of its state, at most every 10 s) leaves that
        trial's child run RUNNING, and `--resume` runs its slot as a new trial. The lost run
        ends KILLED with `commlab.lost_trial=true`; what it logged stays."""
        known = {t.trial_id for t in trials}
        for ref, run in self._running_children():
            if run.data.tags.get(TRIAL_TAG) in known:
                continue
            set_tags(ref.client(), ref.run_id, {LOST_TAG: "true"})
            finish_run(
                ref,
                "KILLED",
                "the sweep's driver stopped before Tune recorded this trial; "
                "--resume ran its slot as a new trial",
            )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epochs = epochs_done(trial.last_result or {})
        if epochs >= self.max_epochs:
            self._close(trial, "FINISHED")
        else:
            self._close(trial, "FINISHED", {STOPPED_EARLY_TAG: "true"}, last_checkpoint=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")


def epochs_done(result: dict[str, Any]) -> int:
    """Epochs a trial has trained: its own 0-based `epoch` metric + 1 (Tune's
    training_iteration restarts when a resumed trial continues from its checkpoint)."""
    epoch = result.get("epoch")
    if isinstance(epoch, int | float) and not isinstance(epoch, bool):
        return int(epoch) + 1
    return int(result.get("training_iteration", 0) or 0)


class ProgressView(Callback):
    """One compact line whenever something changes: trials running / done / stopped / errored,
    and the best value of the selection metric so far."""

    def __init__(self, metric: str, mode: str, max_epochs: int) -> None:
        # No Console attribute: Tune pickles its callbacks into the experiment state.
        self.metric, self.mode = metric, mode
        self.max_epochs = max_epochs
        self.best: tuple[float, str] | None = None
        self.t0 = time.perf_counter()
        self.ended: dict[str, str] = {}  # trial id -> done | stopped | failed
        self.max_iter: dict[str, int] = {}

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        value = result.get(self.metric)
        self.max_iter[trial.trial_id] = epochs_done(result)
        if isinstance(value, int | float) and not math.isnan(value):
            better = self.best is None or (
                value > self.best[0] if self.mode == "max" else value < self.best[0]
            )
            if better:
                self.best = (float(value), trial.trial_id)
        self._line(
            trials,
            f"{trial.trial_id} epoch {epochs_done(result)}: {self.metric}={_fmt(value)}",
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epochs = self.max_iter.get(trial.trial_id, 0)
        self.ended[trial.trial_id] = "done" if epochs >= self.max_epochs else "stopped"
        self._line(trials, f"{trial.trial_id} {self.ended[trial.trial_id]} after {epochs} epoch(s)")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended[trial.trial_id] = "failed"
        # Worker output is not streamed to the driver: say why, and where the whole error is
        reason = _last_line(getattr(trial, "error_file", None))
        path = getattr(trial, "path", None) or getattr(trial, "local_path", None) or ""
        detail = f": {escape(reason)}" if reason else ""
        self._line(trials, f"[red]{trial.trial_id} failed[/]{detail} (error.txt in {path})")

    def _line(self, trials: list[Any], event: str) -> None:
        counts = {"running": 0, "pending": 0, "done": 0, "stopped": 0, "failed": 0}
        for t in trials:
            key = self.ended.get(t.trial_id) or ("running" if t.status == "RUNNING" else "pending")
            counts[key] += 1
        best = f"best {_fmt(self.best[0])} ({self.best[1]})" if self.best else "best -"
        state = " ".join(f"{k} {v}" for k, v in counts.items() if v)
        _console().print(
            f"[{time.perf_counter() - self.t0:6.0f}s] {state} | {best} | {event}", highlight=False
        )


_CONSOLE: Console | None = None


def _console() -> Console:
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


def _last_line(error_file: Any) -> str:
    try:
        lines = [ln for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    except (OSError, TypeError):
        return ""
    return lines[-1].strip()[:300] if lines else ""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
