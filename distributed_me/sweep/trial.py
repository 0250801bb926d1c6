"""One sweep trial, as a Ray Tune function trainable: an attacker with its own API key against a served victim.

The trial gets its factor combination and the sweep context in ``config``. It looks up MLflow for a FINISHED run of
the same combination (a resumed sweep, or a retry whose first attempt finished unseen: never run twice), opens its
child run (tagged with the node it runs on), loads the judge and the pool, waits for the sweep's Serve app (it may
still be deploying when the first trials start), registers a fresh API key with the accounting replica (budget = the
trial's budget, only for its victim × policy deployment), then runs the very
:func:`~distributed_me.extraction.run_extraction` that ``dme attack`` runs — through a
:class:`~distributed_me.serving.clients.HandleOracle`, never the victim's weights. The victim bundle is loaded here
only as the benchmark's judge (test split and unmetered top-1 for fidelity), as in ``dme attack``.

Every epoch is reported to Tune (ASHA stops on it) and to the trial's MLflow child run; the final report carries the
result schema (:data:`~distributed_me.extraction.METRIC_NAMES`) plus the harness's own steps (``harness_*``,
``seconds_harness``), and the piracy model is logged as an artifact. A retried trial is a new attempt with a new key
and a new child run; the failed attempt's run stays FAILED (or KILLED, when its worker died).

Harness cost per trial is kept small: the driver validated the spec once, so a trial reads the validated dump as it
is; judge, pool and the app's readiness are cached per worker process, and Tune reuses workers between trials.
MLflow is the sweep's recorder's job (:mod:`.recorder`): the worker never imports it, an epoch's metrics are a call
the trial does not wait for, and the run ends only once they are recorded.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..attacks import Timer
from ..cost.history import DEVICE_TAG
from ..data import load_pool
from ..extraction import CHOICES, FACTORS, AttackSpec, DefenseCost, Evaluator, run_extraction
from ..ownership import save_piracy_model
from ..plugins import load_plugins
from ..runner import evaluator_for
from ..victims import Victim, load_victim
from .plan import cost_key
from .recorder import RecordedRun, find_recorder
from .spec import options_for_pool
from .tracking import TrialRun, finished_trial, trial_key, trial_run_name

log = logging.getLogger(__name__)

#: the harness's own seconds in a trial (outside the extraction), reported beside the result schema
HARNESS_METRIC = "seconds_harness"

#: intermediate results go to Tune at most once per this many seconds, unless a scheduler that stops trials on them
#: (ASHA) needs every epoch: without one they only feed the status line's epoch bars, and each is a round trip to the
#: driver that the trial waits for (about 9 ms on 2 cores: 0.7 s of ``dme bench sweep``'s 8 trials of 10 epochs). The
#: curves themselves go to MLflow every epoch.
TUNE_REPORT_EVERY_S = 1.0

#: the sweep apps this worker process has seen running (Tune reuses workers across a sweep's trials)
_READY_APPS: set[str] = set()


class TrialContext:
    """The driver's context for every trial (spec, deployments, prepared artifacts, MLflow ids), carried in Tune's
    ``param_space`` as one opaque value.

    Why opaque: Tune flattens nested dicts of a ``param_space`` and, on ``Tuner.restore``, refuses any whose
    flattened keys differ from the original's. As a plain dict, every field added to a sweep spec or to this context
    in a later release would make sweeps started before it unresumable. Restored trials keep the context they were
    created with, so the trial reads new fields with ``.get`` and a default.
    """

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __repr__(self) -> str:  # Tune prints configs: the context is too long to be useful there
        return f"TrialContext(sweep={self.data.get('spec', {}).get('name')!r})"


def trial_context(config: dict[str, Any]) -> dict[str, Any]:
    """The context of a trial config; sweeps started before :class:`TrialContext` carry a plain dict."""
    ctx = config["ctx"]
    return ctx.data if isinstance(ctx, TrialContext) else ctx


@lru_cache(maxsize=4)
def _judge(bundle: str) -> tuple[Victim, Evaluator]:
    """Victim and evaluator, cached per worker process: consecutive trials on one worker share them."""
    victim = load_victim(bundle)
    return victim, evaluator_for(victim)


@lru_cache(maxsize=2)
def _pool(name: str, options: tuple):
    return load_pool(name, **dict(options))


@lru_cache(maxsize=8)
def _accountant(app_name: str):
    from ray import serve

    return serve.get_deployment_handle("Accountant", app_name)


def key_detection(app: str, deployment: str, key: str) -> dict[str, float]:
    """What the deployment's detectors concluded about this trial's key once its attack ended: per detector,
    ``detection.NAME.flagged`` (0/1) and, when flagged, ``detection.NAME.queries`` (the query count at the flag)."""
    from ray import serve

    _, _, fingerprint = _accountant(app).authorize.remote(key, deployment).result()
    out: dict[str, float] = {}
    for v in serve.get_deployment_handle("Watchman", app).verdicts.remote(deployment, fingerprint).result():
        out[f"detection.{v['detector']}.flagged"] = float(v["flagged"])
        if v["flagged_at"] is not None:
            out[f"detection.{v['detector']}.queries"] = float(v["flagged_at"])
    return out


def attack_spec(ctx: dict[str, Any], f: dict[str, Any]) -> AttackSpec:
    """The trial's AttackSpec from its factors; anything the sweep did not set is AttackSpec's default."""
    attack = ctx["spec"]["attack"]
    # the sweep's once-per-pool preparation products (e.g. a features file) join the strategy's own options
    prepared = ctx.get("prepared", {}).get(f["pool"], {}).get(f["strategy"], {})
    return AttackSpec.from_given(
        strategy=f["strategy"], strategy_options={**attack["strategy_options"].get(f["strategy"], {}), **prepared},
        budget=int(f["budget"]), arch=f["arch"], pretrained=f["pretrained"], optimizer=f["optimizer"], lr=f["lr"],
        epochs=int(f["epochs"]), batch_size=attack["batch_size"], augment=bool(f["augment"]), seed=int(f["seed"]),
        targets=attack.get("targets"), adv_eval_samples=ctx["spec"]["adv_eval_samples"])


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable. ``config = {"factors": {...}, "ctx": {...}}`` (see :mod:`distributed_me.sweep.runner`)."""
    import ray
    from ray import tune

    from ..serving.clients import HandleOracle
    from ..serving.runtime import wait_until_ready

    h = Timer(phases=())  # the harness's own steps, outside the extraction's phases
    ctx = trial_context(config)
    spec = ctx["spec"]  # validated by the driver: not validated again per trial
    load_plugins(spec.get("plugins", []))
    f = {k: config["factors"][k] for k in FACTORS}
    torch.set_num_threads(max(1, int(round(ctx["cpus_per_trial"]))))
    os.environ["MLFLOW_TRACKING_URI"] = ctx["tracking_uri"]
    trial_id = tune.get_context().get_trial_id() or uuid.uuid4().hex[:8]
    # the sweep's recorder makes the MLflow calls (sweeps started before it existed: this process does)
    recorder = find_recorder(ctx["parent_run_id"]) if ctx.get("recorder") else None
    with h.phase("lookup"):
        if recorder is not None:
            done = ray.get(recorder.finished.remote(ctx["experiment_id"], ctx["parent_run_id"], trial_key(f)))
        else:
            run_ = finished_trial(ctx["experiment_id"], ctx["parent_run_id"], trial_key(f))
            done = None if run_ is None else (run_.info.run_id, dict(run_.data.metrics))
    if done is not None:
        log.info("trial %s already finished as MLflow run %s: not run again", trial_id, done[0])
        tune.report({**done[1], "epoch": int(f["epochs"]), "completed": True, "mlflow_run_id": done[0],
                     "reused": True})
        return
    deployment = ctx["deployments"][f"{f['victim']}|{f['policy']}"]
    key = f"trial-{trial_id}-{uuid.uuid4().hex}"
    name = trial_run_name(f)
    with h.phase("mlflow_start"):
        attack = attack_spec(ctx, f)
        args = (ctx["experiment_id"], ctx["parent_run_id"], spec["name"], name, f,
                {"dme.trial_id": trial_id, "dme.deployment": deployment,
                 "dme.node": ray.get_runtime_context().get_node_id(), DEVICE_TAG: ctx["cost_device"]},
                # what the strategy was given, prepared products included (e.g. a features file)
                {"strategy_options": attack.strategy_options, **{k: getattr(attack, k) for k in CHOICES}})
        run = RecordedRun(recorder, *args) if recorder is not None else TrialRun(*args)
    with run:
        with h.phase("judge_pool"):
            victim, evaluator = _judge(ctx["bundles"][f["victim"]])
            known = ctx.get("defense_costs", {}).get(f"{f['victim']}|{f['policy']}")
            if known is not None:  # the driver measured the defender's side once for the sweep
                evaluator.know_cost(f["policy"], DefenseCost(**known))
            options = options_for_pool(spec["pool_options"], spec["pool"], f["pool"])
            pool = _pool(f["pool"], tuple(sorted(options.items())))
        with h.phase("wait_app"):  # the first trials start while the sweep's Serve app is still deploying
            if ctx["app_name"] not in _READY_APPS:  # once per worker: a running app stays up for the sweep
                wait_until_ready(ctx["app_name"], ctx["deploy_timeout_s"])
                _READY_APPS.add(ctx["app_name"])
        # a fresh key per attempt: a retried trial starts with its full budget, and budgets never mix between trials
        with h.phase("key"):
            _accountant(ctx["app_name"]).add_client.remote({"key": key, "budget": int(f["budget"]),
                                                         "victims": [deployment]}).result()
        with h.phase("handle"):
            oracle = HandleOracle(deployment, key, ctx["app_name"])

        # the driver's interval (0: every epoch, for ASHA); sweeps started before the throttle report as they did
        every_s = float(ctx.get("tune_report_every_s", 0.0))
        last_report = [time.monotonic()]

        def on_epoch(epoch: int, row: dict) -> None:
            with h.phase("epoch_reports"):  # inside the extraction's train phase: subtracted from it below
                metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
                run.metrics(metrics, step=epoch)
                if time.monotonic() - last_report[0] >= every_s:
                    tune.report({**metrics, "epoch": epoch, "completed": False})
                    last_report[0] = time.monotonic()

        # the plan's projection of this trial (by its cost-relevant factors), logged beside what it takes
        result = run_extraction(oracle, pool, attack, evaluator, on_epoch=on_epoch,
                                eval_every_epoch=spec["eval_every_epoch"], policy=f["policy"],
                                projected=ctx["projected"].get(cost_key(f)))
        if spec.get("detectors"):
            with h.phase("detection"):
                result.detection = key_detection(ctx["app_name"], deployment, key)
        result.seconds["train"] -= h.seconds.get("epoch_reports", 0.0)
        result.seconds["total"] -= h.seconds.get("epoch_reports", 0.0)
        final = result.metrics()
        with h.phase("artifact"), tempfile.TemporaryDirectory() as d:
            path = save_piracy_model(result.model, f["arch"], len(victim.class_names),  # type: ignore[arg-type]
                                     victim.input_shape, Path(d) / "piracy_model.pt")
            run.artifact(path)
        final.update({f"harness_{k}": v for k, v in h.seconds.items()})
        final[HARNESS_METRIC] = sum(h.seconds.values())
        run.metrics(final, step=int(f["epochs"]))
    # after the run is closed: Tune may end the trial inside this call (`done` would too, hence `completed`)
    tune.report({**final, "epoch": int(f["epochs"]), "completed": True, "mlflow_run_id": run.run_id})

