"""Reading a sweep's trial runs back from MLflow: the one place for it, shared by ``dme report`` and
``dme leaderboard``. No Ray here.

A trial is a FINISHED child run of the sweep's parent run. A trial that finished twice (same ``dme.trial_key``: a
retried attempt whose first one finished unseen) counts once, its newest run. Searches are paged, since a store
answers at most ``max_results`` per call.
"""

from __future__ import annotations

import math
from typing import Any

from ..extraction import CHOICES, FACTORS, METRIC_NAMES, AttackSpec

PAGE = 5000  # runs per search call


def search_all(c: Any, exp_ids: list[str], where: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run matching ``where`` in these experiments, page by page."""
    out: list[Any] = []
    token = None
    while True:
        page = c.search_runs(exp_ids, where, max_results=PAGE, order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def finished_trials(c: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The FINISHED child runs of ``parent_run_id``, newest first, one per trial key."""
    runs = search_all(c, [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                          "attributes.status = 'FINISHED'", ["attributes.start_time DESC"])
    seen: set[str] = set()
    out = []
    for r in runs:
        key = r.data.tags.get("dme.trial_key") or r.info.run_id
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def trial_row(run: Any) -> dict[str, Any]:
    """A trial run as a row: its run id, every factor param (a string, ``None`` if absent), every attacker choice
    param (its default if absent), every metric of the
    result schema (``nan`` if absent) and the cost model's projection, every ``projected_*`` metric the run has (none
    on runs from before projections were logged; the report compares them with the actual ``seconds_*``)."""
    return {"run_id": run.info.run_id, **{k: run.data.params.get(k) for k in FACTORS},
            **{k: run.data.params.get(k, AttackSpec.model_fields[k].default) for k in CHOICES},
            **{k: run.data.metrics.get(k, math.nan) for k in METRIC_NAMES},
            **{k: v for k, v in run.data.metrics.items() if k.startswith(("projected_", "detection."))}}
