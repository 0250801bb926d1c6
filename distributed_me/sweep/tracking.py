"""MLflow records of a sweep: one parent run per sweep, one child run per trial attempt. No Ray here.

Explicit :class:`mlflow.MlflowClient` calls rather than the fluent API: trials run in threads of Tune's actors, where
a process-global "active run" would be shared, and every run must end with a definite status (FINISHED, FAILED with
the error, or KILLED when a resumed sweep finds a run its dead driver left RUNNING).

What the MLflow UI shows (``dme ui``), so that a sweep can be browsed there rather than only through ``dme report``:

- the experiment's description says how its runs are laid out and how to filter them (:data:`BROWSE_GUIDE`);
- the parent run, named ``sweep NAME``, has the sweep's ``description`` (and, once the trials are done, the summary
  table: see :func:`distributed_me.report.publish_report`) as its run description, the spec as ``sweep.json``, and
  the report under ``report/``;
- a child run per trial attempt, named after its factors (:func:`trial_run_name`), with every factor of
  :data:`~distributed_me.extraction.FACTORS` as a param, per-epoch curves as metrics with ``step = epoch``, and the
  piracy model as an artifact.

Filtering in the UI's search box (MLflow's search syntax: strings in single quotes, names with dots in backticks;
params are strings, so numbers are quoted too)::

    tags.`dme.sweep` = 'quickstart'                         every run of a sweep
    tags.`dme.kind` = 'sweep'                               only the sweeps' parent runs
    params.strategy = 'random' and params.budget = '250'    trials by factor (any name of FACTORS)
    params.optimizer = 'adam' and metrics.fidelity > 0.5    factors and results together

Tags on trials: ``dme.sweep``, ``dme.kind`` (``sweep`` / ``trial``), ``dme.attack``, ``dme.victim``,
``dme.defense``, ``dme.budget``, ``dme.trial_key``, ``dme.trial_id``.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from ..tracking import NOTE_TAG, ensure_experiment, git_commit, tracking_uri

log = logging.getLogger(__name__)

#: the experiment description of sweep experiments: how the runs are laid out and filtered (shown atop the runs list)
BROWSE_GUIDE = """Model-extraction sweeps recorded by `distributed_me`.

- **Parent runs** (`sweep NAME`, tag `dme.kind` = `sweep`): the sweep's description and summary table, the spec
  (`sweep.json`) and the report: `report/report.html` (rendered), `report/report.md`, `report/results.csv` (one row
  per finished trial), `report/summary.json` (table) and `report/plots/*.png`.
- **Child runs**, one per trial attempt, named after their factors: every factor is a param, per-epoch curves are
  metrics (step = epoch), the piracy model is the artifact `piracy_model.pt`.

Filter in the search box (strings in single quotes; params are strings, numbers too):

- a sweep's runs: ``tags.`dme.sweep` = 'quickstart'``
- trials by factor: ``params.strategy = 'random' and params.budget = '250'``
- factors and results: ``params.optimizer = 'adam' and metrics.fidelity > 0.5``
"""

PACKAGES = ("torch", "torchvision", "ray", "mlflow", "timm", "optuna", "numpy", "pydantic", "distributed_me")


def client():
    """One client per tracking URI and process (trial workers are reused: no new store connection per trial)."""
    return _client(tracking_uri())


@lru_cache(maxsize=4)
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def find_parent(experiment: str, sweep: str) -> str | None:
    """The parent run of sweep ``sweep`` (the newest, if a name was reused), or ``None``."""
    exp_id = ensure_experiment(experiment)
    runs = client().search_runs([exp_id], f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def parent_note(sweep: str, description: str | None) -> str:
    """The parent run's description before the report exists: the spec's description and where to look next."""
    text = description.strip() if description else f"Sweep `{sweep}`."
    return (f"{text}\n\nTrials: the child runs below this one (filter ``tags.`dme.sweep` = '{sweep}'``); the report "
            "appears under the artifacts' `report/` once the trials are done.")


def trial_run_name(factors: dict[str, Any]) -> str:
    """A run name a person can read in the runs list, e.g. ``random · digits/label · 250 queries · cnn32 adam ·
    seed 0``: the factors people compare first, then any set option (lr, pretrained, augment, pool...)."""
    f = {k: v for k, v in factors.items() if v is not None and str(v) not in ("None", "")}
    parts = [str(f.get("strategy", "trial"))]
    if "victim" in f or "policy" in f:
        parts.append("/".join(str(f[k]) for k in ("victim", "policy") if k in f))
    if "budget" in f:
        parts.append(f"{f['budget']} queries")
    model = " ".join(str(f[k]) for k in ("arch", "optimizer") if k in f)
    if "lr" in f:
        model += f" lr={f['lr']}"
    if model:
        parts.append(model.strip())
    shown = {"strategy", "victim", "policy", "budget", "arch", "optimizer", "lr", "seed"}
    for k, v in f.items():
        if k in shown or v is False or str(v) == "False":
            continue
        shown_value = Path(str(v)).name if k == "pool" else v  # a pool may be a folder: its name is enough
        parts.append(k if v is True or str(v) == "True" else f"{k} {shown_value}")
    if "seed" in f:
        parts.append(f"seed {f['seed']}")
    return " · ".join(parts)


def start_parent(experiment: str, sweep: str, spec: dict, cluster: dict[str, float], preset: str | None) -> str:
    """Create the sweep's parent run with the spec as an artifact, git commit, package versions, cluster resources;
    the experiment gets :data:`BROWSE_GUIDE` as its description when it has none, the run the spec's description."""
    exp_id = ensure_experiment(experiment, description=BROWSE_GUIDE)
    c = client()
    run = c.create_run(exp_id, run_name=f"sweep {sweep}", tags={
        "dme.kind": "sweep", "dme.sweep": sweep, "dme.git_commit": git_commit(), "dme.preset": preset or "",
        "dme.python": platform.python_version(), NOTE_TAG: parent_note(sweep, spec.get("description"))})
    rid = run.info.run_id
    from mlflow.entities import Param

    params = [Param(f"package.{k}", v) for k, v in package_versions().items()]
    params += [Param(f"cluster.{k}", str(v)) for k, v in sorted(cluster.items()) if not k.startswith("node:")]
    c.log_batch(rid, params=params)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sweep.json"
        path.write_text(json.dumps(spec, indent=2, default=str))
        c.log_artifact(rid, str(path))
    return rid


def log_plan(run_id: str, metrics: dict[str, float], device_key: str | None = None) -> None:
    """The sweep plan's totals (or the sweep's own phases so far) on the parent run, tagged with the device they were
    priced for (what later plans learn their corrections from, :mod:`distributed_me.cost.history`)."""
    from mlflow.entities import Metric, RunTag

    from ..cost.history import DEVICE_TAG

    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                       tags=[RunTag(DEVICE_TAG, device_key)] if device_key else [])


def end_stale_children(run_id: str, reason: str) -> int:
    """Mark KILLED, with ``reason``, every child run of ``run_id`` still RUNNING: attempts whose process died without
    closing its run (a lost worker node, a killed driver). Call only when no trial of the sweep runs."""
    c = client()
    run = c.get_run(run_id)
    stale = c.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                                    "attributes.status = 'RUNNING'", max_results=10000)
    for r in stale:
        c.set_tag(r.info.run_id, "dme.error", reason)
        c.set_terminated(r.info.run_id, status="KILLED")
    if stale:
        log.info("marked %d stale trial runs KILLED: %s", len(stale), reason)
    return len(stale)


def reopen_parent(run_id: str) -> None:
    """On resume: the parent runs again, and child runs its dead driver left RUNNING are marked KILLED."""
    client().update_run(run_id, status="RUNNING")
    end_stale_children(run_id, "driver died while this trial ran; the trial was resumed as a new run")


def end_parent(run_id: str, status: str, summary: dict[str, float] | None = None, error: str | None = None) -> None:
    c = client()
    if summary:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
    if error:
        c.set_tag(run_id, "dme.error", error[:5000])
    c.set_terminated(run_id, status=status)


def trial_key(factors: dict[str, Any]) -> str:
    """A stable id of a factor combination: the same trial of the same sweep has the same key in every attempt."""
    import hashlib

    return hashlib.sha256(json.dumps(factors, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_trial(experiment_id: str, parent_run_id: str, key: str):
    """A FINISHED child run of this combination under this parent, if one exists (a resumed sweep must not redo it:
    Tune's own experiment state is saved periodically and can miss a trial that finished just before a crash)."""
    runs = client().search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                                 f"tags.`dme.trial_key` = '{key}' and attributes.status = 'FINISHED'",
                                max_results=1)
    return runs[0] if runs else None


#: how a trial attempt's run ended -> the MLflow status it gets
OUTCOMES = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def open_trial_run(experiment_id: str, parent_run_id: str, sweep: str, name: str | None, factors: dict[str, Any],
                   extra_tags: dict[str, str] | None = None, extra_params: dict[str, Any] | None = None) -> str:
    """Create a trial attempt's child run (tags, every factor as a param) and return its id. Stateless, like
    :func:`log_trial_metrics` and :func:`end_trial_run`: a recorder that restarts loses nothing it needs."""
    c = client()
    tags = {"mlflow.parentRunId": parent_run_id, "dme.kind": "trial", "dme.sweep": sweep,
            "dme.attack": str(factors["strategy"]), "dme.victim": str(factors["victim"]),
            "dme.defense": str(factors["policy"]), "dme.budget": str(factors["budget"]),
            "dme.trial_key": trial_key(factors), "dme.git_commit": _commit(), **(extra_tags or {})}
    run_id = c.create_run(experiment_id, run_name=name or trial_run_name(factors), tags=tags).info.run_id
    from mlflow.entities import Param

    params = {**factors, **{k: json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v
                            for k, v in (extra_params or {}).items()}}
    c.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run_id


@lru_cache(maxsize=1)
def _commit() -> str:
    """The code's commit, once per process (a ``git`` subprocess per trial otherwise)."""
    return git_commit()


def log_trial_metrics(run_id: str, values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
    """``timestamp_ms`` from the caller makes a repeated call add nothing: MLflow skips a point identical in key,
    value, step and timestamp (a recorder call retried after its process died may have landed already)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def end_trial_run(run_id: str, outcome: str, message: str | None = None) -> None:
    """End an attempt's run: ``finished``, ``stopped`` (by the scheduler: KILLED with ``dme.stopped``) or ``failed``
    (FAILED with the error as ``dme.error``)."""
    c = client()
    if outcome == "stopped":
        c.set_tag(run_id, "dme.stopped", message or "stopped early by the scheduler")
    elif outcome == "failed":
        c.set_tag(run_id, "dme.error", (message or "failed")[:5000])
    c.set_terminated(run_id, status=OUTCOMES[outcome])


def outcome_of(exc: BaseException | None) -> tuple[str, str | None]:
    """How an attempt ended, from the exception that left its run (None: it finished)."""
    if exc is None:
        return "finished", None
    if isinstance(exc, SystemExit):  # Tune ends a trial it stops (ASHA) by sys.exit in its report call
        return "stopped", "stopped early by the scheduler"
    return "failed", f"{type(exc).__name__}: {exc}"


class TrialRun:
    """A child run for one trial attempt; use as a context manager so it always ends with a status. Every factor is
    a param (what the UI filters on: ``params.NAME = 'VALUE'``); ``name=None`` names the run by
    :func:`trial_run_name`. In a sweep's trials the same calls go through the sweep's recorder actor instead
    (:mod:`distributed_me.sweep.recorder`)."""

    def __init__(self, experiment_id: str, parent_run_id: str, sweep: str, name: str | None, factors: dict[str, Any],
                 extra_tags: dict[str, str] | None = None, extra_params: dict[str, Any] | None = None):
        self.client = client()
        self.run_id = open_trial_run(experiment_id, parent_run_id, sweep, name, factors, extra_tags, extra_params)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        log_trial_metrics(self.run_id, values, step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def __enter__(self) -> "TrialRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        end_trial_run(self.run_id, *outcome_of(exc))
        return False
