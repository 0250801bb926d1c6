"""MLflow plumbing shared by victims, attacks and sweeps (MLflow, not Ray: safe in the core).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, otherwise MLflow 3's own default, a SQLite store
``mlflow.db`` in the working directory (the ``file:`` store is in maintenance mode). ``dme ui`` serves the same store.
"""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def ensure_experiment(name: str) -> str:
    """Create the experiment if needed (once, in the driver: concurrent creation collides on SQLite)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else mlflow.create_experiment(name)


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
