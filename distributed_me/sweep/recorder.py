"""The sweep's recorder: one Ray actor that makes every MLflow call of the sweep's trials.

Why an actor rather than an MLflow client in each trial worker: a fresh worker paid about 1.4 s (on this project's
2-core machine) before its first trial could open its run: importing MLflow (0.6 s) and opening the store (0.8 s for
SQLite). The recorder pays that once, in its own process, while the driver is still pricing the sweep, building
defense kits and deploying; trial workers never import MLflow. Per-epoch metrics become fire-and-forget calls
(about a millisecond for the trial, instead of a store write on its training thread), and with SQLite one process
writes, so two trials never contend for the file's lock.

What is unchanged: each attempt still gets its own child run with the same tags and params
(:func:`~distributed_me.sweep.tracking.open_trial_run`), and the run ends FINISHED, KILLED (stopped by the
scheduler) or FAILED. A trial waits for its pending metric calls before it ends its run, so a run never ends with its
curves still in flight; an attempt whose worker dies leaves its run RUNNING, and the driver marks it KILLED, as
before. The recorder is pinned to the driver's node (a worker node may be removed mid-sweep), restarts if its process
dies, and keeps no state of its own: every call names its run. Calls are retried on the restarted process, so each
must be safe to repeat: metrics carry the trial's timestamp (MLflow skips an identical point: a retried call that had
landed adds nothing), ends and artifacts overwrite, and opening a run is not retried (the trial fails instead, and
Tune retries it as a new attempt). Its name is derived from the parent run, so a resumed
sweep's recorder has the name its restored trials know. A trial that cannot find it logs to MLflow itself.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import tracking

log = logging.getLogger(__name__)


def recorder_name(parent_run_id: str) -> str:
    return f"dme-recorder-{parent_run_id}"


class Recorder:
    """The actor's class: thin, stateless wrappers around :mod:`.tracking`'s trial-run functions."""

    def __init__(self, uri: str) -> None:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        # the import and the store's opening happen now, while the driver still deploys: not in a trial's time
        tracking.client().search_experiments(max_results=1)

    def ready(self) -> bool:
        return True

    def finished(self, experiment_id: str, parent_run_id: str, key: str) -> tuple[str, dict[str, float]] | None:
        run = tracking.finished_trial(experiment_id, parent_run_id, key)
        return None if run is None else (run.info.run_id, dict(run.data.metrics))

    def open(self, *args: Any) -> str:
        return tracking.open_trial_run(*args)

    def metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        tracking.log_trial_metrics(run_id, values, step, timestamp_ms)

    def artifact(self, run_id: str, filename: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / filename
            path.write_bytes(data)
            tracking.client().log_artifact(run_id, str(path))

    def end(self, run_id: str, outcome: str, message: str | None) -> None:
        tracking.end_trial_run(run_id, outcome, message)


def start_recorder(parent_run_id: str, uri: str):
    """Start (or, on a resume whose old recorder still lives, get) the sweep's recorder on this (the driver's) node.
    Returns at once: the actor warms up in the background."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(Recorder).options(
        name=recorder_name(parent_run_id), get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=3,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    return actor.remote(uri)


def stop_recorder(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception as e:  # a recorder already gone is what stop wants
        log.debug("recorder already gone: %s", e)


def find_recorder(parent_run_id: str):
    """The sweep's recorder from inside a trial, or None (a sweep started before recorders existed, or a lost one)."""
    import ray

    try:
        return ray.get_actor(recorder_name(parent_run_id))
    except ValueError:
        log.warning("no recorder for sweep run %s: this trial logs to MLflow itself", parent_run_id)
        return None


class RecordedRun:
    """:class:`~distributed_me.sweep.tracking.TrialRun`'s interface, through the recorder: ``metrics`` does not wait
    (the calls are collected and awaited before the run ends); ``artifact`` and the end do."""

    def __init__(self, recorder, experiment_id: str, parent_run_id: str, sweep: str, name: str | None,
                 factors: dict[str, Any], extra_tags: dict[str, str] | None = None,
                 extra_params: dict[str, Any] | None = None) -> None:
        import ray

        self.recorder = recorder
        self.pending: list = []
        # not retried: a retry after the recorder died could open a second run (the trial fails; Tune retries it)
        self.run_id: str = ray.get(recorder.open.options(max_task_retries=0).remote(
            experiment_id, parent_run_id, sweep, name, factors, extra_tags, extra_params))

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        # the trial's timestamp: a call retried on a restarted recorder after it had landed adds no second point
        self.pending.append(self.recorder.metrics.remote(self.run_id, values, step, int(time.time() * 1000)))

    def artifact(self, path: str | Path) -> None:
        import ray

        ray.get(self.recorder.artifact.remote(self.run_id, Path(path).name, Path(path).read_bytes()))

    def flush(self) -> None:
        """Wait for every metric call so far; one that failed raises here."""
        import ray

        pending, self.pending = self.pending, []
        ray.get(pending)

    def __enter__(self) -> RecordedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        import ray

        outcome, message = tracking.outcome_of(exc)
        lost: Exception | None = None
        try:
            self.flush()
        except Exception as e:  # the run's curves are incomplete: it must not end, nor the trial, as if it finished
            log.error("metrics of run %s were not recorded: %s", self.run_id, e)
            lost = e
            if outcome == "finished":
                outcome, message = "failed", f"metrics were not recorded: {type(e).__name__}: {e}"
        ray.get(self.recorder.end.remote(self.run_id, outcome, message))
        if lost is not None and exc is None:
            raise RuntimeError(f"metrics of MLflow run {self.run_id} were not recorded: {lost}") from lost
        return False

