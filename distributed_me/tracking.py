"""MLflow plumbing shared by victims, attacks, sweeps and reports (MLflow, not Ray: safe in the core).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, otherwise one SQLite store for everything this machine runs:
``sqlite:///$DME_HOME/mlflow.db`` (``DME_HOME`` defaults to ``~/.cache/distributed_me``), with artifacts beside it in
``$DME_HOME/mlartifacts``. One fixed place, not the working directory, because ``ray job submit`` runs the driver in
a temporary copy of the working directory: a store there would vanish with it. ``dme ui`` serves the same store.
(The ``file:`` store is in maintenance mode in MLflow 3, so SQLite it is.)
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def dme_home() -> Path:
    return Path(os.environ.get("DME_HOME", Path.home() / ".cache" / "distributed_me")).expanduser()


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    home = dme_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home.resolve() / 'mlflow.db'}"


def use_store() -> str:
    """Point this process's MLflow at the store (``tracking_uri()``), its model registry included, and return it.

    MLflow's registry has a default of its own (``sqlite:///mlflow.db`` of the working directory) that a
    ``tracking_uri=`` argument does not override for ``models:/`` URIs: a fresh process resolving a victim registered
    by ``dme train-victim`` would look in (and create) ``./mlflow.db`` and not find it."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


#: the MLflow tag the UI shows (and edits) as an experiment's or a run's description, rendered as Markdown
NOTE_TAG = "mlflow.note.content"


def ensure_experiment(name: str, description: str | None = None) -> str:
    """Create the experiment if needed (once, in the driver: concurrent creation collides on SQLite).

    Local stores get their artifacts under ``$DME_HOME/mlartifacts/NAME`` (MLflow would otherwise use ``./mlruns`` of
    whatever directory the process happens to run in); a tracking server keeps its own artifact root.

    ``description`` becomes the experiment's description in the MLflow UI only when it has none yet: a description
    someone wrote (or edited in the UI) is never overwritten by the next sweep that records into the experiment.
    """
    import mlflow

    uri = use_store()
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if description and not exp.tags.get(NOTE_TAG):
            _describe(uri, exp.experiment_id, description)
        return exp.experiment_id
    location = None
    if _local_store(uri):
        location = (dme_home() / "mlartifacts" / name).resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location,
                                        tags={NOTE_TAG: description} if description else None)
    except Exception:  # another process created it in between
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        if description and not exp.tags.get(NOTE_TAG):
            _describe(uri, exp.experiment_id, description)
        return exp.experiment_id


def _describe(uri: str, experiment_id: str, description: str) -> None:
    """A missing description is cosmetic: failing to set it must not stop a sweep."""
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).set_experiment_tag(experiment_id, NOTE_TAG, description)
    except Exception as e:
        log.warning("could not set the description of MLflow experiment %s: %s", experiment_id, e)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def mlflow_run(experiment: str, run_name: str, tags: dict | None = None, nested: bool = False,
               parent_run_id: str | None = None) -> Iterator:
    """Start a run that always ends: FINISHED on success, FAILED (with the error as a tag) on any exception."""
    import mlflow

    exp_id = ensure_experiment(experiment)
    all_tags = {"dme.git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags, nested=nested)
    try:
        yield run
    except BaseException as e:
        mlflow.set_tag("dme.error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
