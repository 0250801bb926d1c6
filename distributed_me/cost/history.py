"""The calibration improves from recorded runs: what finished runs took against what the cost model said.

Every sweep trial (and every ``dme attack`` logged to MLflow) records ``projected_raw_seconds_PHASE`` (the cost model
alone) beside ``seconds_PHASE`` (what it took), tagged with the device and calibration it was priced with
(``dme.cost_device``, :attr:`Rates.key <distributed_me.cost.rates.Rates.key>`): a device measured again starts
without corrections, because factors learned against old figures would correct the new ones wrongly (measured: after
a re-measurement on a quiet machine the raw projections of the quickstart were exact, 1.00, and the factor 0.78 learned
against figures measured under load sent them to 1.26).
:func:`learned_factors` reads the newest such runs of one device and returns, per phase, the median of actual / raw
— per kind of work (:func:`work_key`: strategy, victim, piracy architecture) with at least :data:`MIN_RUNS` runs, none
otherwise — clipped to
[:data:`MIN_FACTOR`, :data:`MAX_FACTOR`] so that one odd run cannot send a projection off by orders of magnitude.
A plan multiplies each phase by its factor; the factors are learned from raw figures, never from corrected ones, so
they do not compound. Phases under :data:`MIN_SECONDS` in either figure are left out (timer noise dominates them).
The sweep's trials phase as a whole gets a factor per sweep name (from that sweep's earlier runs), and its fixed
costs are medians over every recorded sweep on the device. Preparation steps log both figures on the parent run but
are not learned from yet (one run per sweep, each a different reference set).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

from .plan import PROJECTED_RAW

log = logging.getLogger(__name__)

MIN_RUNS = 2
MIN_SECONDS = 0.2
MIN_FACTOR, MAX_FACTOR = 0.1, 10.0
DEVICE_TAG = "dme.cost_device"


@dataclass
class Corrections:
    """Per-phase factors learned from recorded runs (empty: the cost model alone), keyed by :func:`work_key`."""

    by_work: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: int = 0
    sweep: dict[str, float] = field(default_factory=dict)  # medians of recorded sweep_seconds_* (fixed costs)
    trials_factors: dict[str, float] = field(default_factory=dict)  # per sweep name: actual / raw trials phase

    def factors(self, strategy: str | None, victim: str | None = None, arch: str | None = None) -> dict[str, float]:
        return dict(self.by_work.get(work_key(strategy, victim, arch), {}))

    def trials_factor(self, sweep: str) -> float:
        return self.trials_factors.get(sweep, 1.0)


def work_key(strategy: str | None, victim: str | None, arch: str | None) -> str:
    """What a correction is learned for: the same strategy, against the same victim (its input size), with the same
    piracy architecture. Measured: factors learned on 16 px digits trials (0.78) sent 32 px CIFAR-10 trials of the
    same strategies 1.2x over their corrected projection, while their raw projection was off by 1.04; so a correction
    applies only to work of its own kind, never across."""
    return f"{strategy}|{victim}|{arch}"


def _median_ratios(rows: list[dict[str, float]]) -> dict[str, float]:
    ratios: dict[str, list[float]] = {}
    for m in rows:
        for k, raw in m.items():
            if not k.startswith(PROJECTED_RAW) or k.endswith("_total"):
                continue
            phase = k[len(PROJECTED_RAW):]
            actual = m.get(f"seconds_{phase}")
            if actual is None or raw < MIN_SECONDS or actual < MIN_SECONDS:
                continue
            ratios.setdefault(phase, []).append(actual / raw)
    return {p: min(MAX_FACTOR, max(MIN_FACTOR, statistics.median(r))) for p, r in ratios.items() if len(r) >= MIN_RUNS}


def _clip(x: float) -> float:
    return min(MAX_FACTOR, max(MIN_FACTOR, x))


def learned_factors(device_key: str, max_runs: int = 300) -> Corrections:
    """Corrections for ``device_key`` from the tracking store's newest ``max_runs`` finished runs priced for it (see
    the module docstring). Any failure to read the store gives no corrections: a projection never fails for it."""
    try:
        from mlflow import MlflowClient

        from ..tracking import tracking_uri

        client = MlflowClient(tracking_uri())
        exps = [e.experiment_id for e in client.search_experiments()]
        if not exps:
            return Corrections()
        runs = client.search_runs(exps, f"tags.`{DEVICE_TAG}` = '{device_key}' and attributes.status = 'FINISHED'",
                                  max_results=max_runs, order_by=["attributes.start_time DESC"])
    except Exception as e:  # an unreachable or empty store
        log.info("no recorded runs to correct projections with: %s", e)
        return Corrections()
    trials = [r for r in runs if any(k.startswith(PROJECTED_RAW) for k in r.data.metrics)]
    by: dict[str, list[dict[str, float]]] = {}
    for r in trials:
        p = r.data.params
        by.setdefault(work_key(p.get("strategy"), p.get("victim"), p.get("arch")), []).append(r.data.metrics)
    parents = [r for r in runs if any(k.startswith("sweep_seconds_") for k in r.data.metrics)]
    sweep_rows = [r.data.metrics for r in parents]
    sweep = {}
    for k in {k for m in sweep_rows for k in m if k.startswith("sweep_seconds_")}:
        sweep[k[len("sweep_seconds_"):]] = statistics.median(m[k] for m in sweep_rows if k in m)
    # the trials phase as a whole (Tune's scheduling, contention between concurrent trials), per sweep: another
    # sweep's concurrency and trial sizes say nothing about this one's
    per_sweep: dict[str, list[float]] = {}
    for r in parents:
        m = r.data.metrics
        if m.get("sweep_projected_raw_seconds_trials", 0) > MIN_SECONDS and "sweep_seconds_trials" in m:
            per_sweep.setdefault(r.data.tags.get("dme.sweep", ""), []).append(
                m["sweep_seconds_trials"] / m["sweep_projected_raw_seconds_trials"])
    harness = [r.data.metrics["seconds_harness"] for r in trials if "seconds_harness" in r.data.metrics]
    if harness:
        sweep["harness_per_trial"] = statistics.median(harness)
    return Corrections({k: _median_ratios(rows) for k, rows in by.items()}, len(trials), sweep,
                       {k: _clip(statistics.median(v)) for k, v in per_sweep.items()})
