"""``dme sweep``: a validated SweepSpec → victims on Serve → one Tune trial per factor combination → MLflow.

The driver
1. validates the spec (before Ray starts; plugins imported first) and keeps a copy in the sweep folder
   (``$DME_HOME/sweeps/NAME``);
2. joins or starts a Ray cluster (on 127.0.0.1 when private) and opens the MLflow parent run (spec artifact, git
   commit, package versions, cluster resources);
3. starts deploying one Serve application for the sweep — one victim deployment per victim × output policy, shared by
   every trial, plus the accounting replica — in the background: Tune starts the trials meanwhile, and each trial
   waits for the app only before its first query; or, with ``resources.keep_victims``, joins the running victim
   service that serves exactly these victims (:mod:`.service`), and drops Serve's start from its plan;
4. runs every grid strategy's once-per-sweep ``prepare`` step (:func:`prepare_strategies`), whose products the trials
   receive as options;
5. runs a Tune grid, longest trials first (or an Optuna search, optionally with ASHA) with per-trial resources — GPUs
   only when the cluster has them, custom resources to place them — and retries failed trials; ``--resume NAME``
   restores the Tune experiment instead, so finished trials are not run again;
6. ends the runs of attempts whose worker died, publishes the report (summary table, Markdown, CSV, plots) on the
   parent run, closes it with a summary (and the sweep's own phases, ``sweep_seconds_*``) and returns one row per
   trial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..attacks import ATTACKS, PrepareContext, Timer
from ..cost.guard import check_limit, limit_seconds
from ..cost.work import human
from ..data import load_pool
from ..errors import DmeError
from ..extraction import METRIC_NAMES
from ..plugins import load_plugin
from ..report import publish_report, warm_up
from ..tracking import dme_home, ensure_experiment, tracking_uri
from ..victims import is_embedded, victim_bundle_path
from ..victims.embedded import embedded_bundle_path
from . import service, trial
from .plan import cost_key, plan_sweep, ray_resources, smaller_preset, trial_projections
from .progress import TrialProgress
from .recorder import start_recorder, stop_recorder
from .spec import FACTORS, SweepSpec, parse_sweep
from .trial import HARNESS_METRIC, TrialContext

log = logging.getLogger(__name__)

SPEC_FILE = "dme-sweep.json"
#: what a trial reports: the result schema plus the harness's own time around the extraction
RESULT_KEYS = (*METRIC_NAMES, HARNESS_METRIC)


def sweeps_dir() -> Path:
    return Path(os.environ.get("DME_SWEEP_DIR") or dme_home() / "sweeps").expanduser().resolve()


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    errors: list[str]
    path: Path
    #: the sweep's own phases: ray, mlflow, deploy, prepare, trials (Tune, the trials included), teardown
    seconds: dict[str, float]
    #: Tune returned with trials neither finished nor failed (Ctrl-C / SIGINT): resume with `dme sweep --resume`
    interrupted: bool = False


def save_spec(spec: SweepSpec, preset: str | None, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps({"preset": preset, "spec": spec.model_dump(mode="json")}, indent=2))


def load_saved(name: str) -> tuple[SweepSpec, str | None, Path]:
    folder = sweeps_dir() / name
    f = folder / SPEC_FILE
    if not f.is_file():
        known = sorted(p.name for p in sweeps_dir().glob("*") if (p / SPEC_FILE).is_file()) if sweeps_dir().is_dir() \
            else []
        raise DmeError(f"no sweep named {name!r} to resume in {sweeps_dir()}; known: {', '.join(known) or 'none'}")
    doc = json.loads(f.read_text())
    return parse_sweep(doc["spec"]), doc.get("preset"), folder


def prepare_defenses(spec: SweepSpec, bundles: dict[str, str], parent_run_id: str,
                     on_progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """The defender's side of the grid, once per victim before the victims deploy:

    1. the defense kits the grid's output policies need (MAD's surrogate, AM's misinformation model, CIP's energies;
       a replica binds its kits when it starts): a kit found on disk or in MLflow is used as is, a missing one is
       built and logged by the code of ``dme defense train``; the parent run gets ``dme.kit.VICTIM.KIT`` tags;
    2. what each victim × policy costs the defender (:class:`~distributed_me.extraction.DefenseCost`: utility,
       agreement, KL_test, KL_train). It does not depend on the attack, so trials read it instead of recomputing it
       (for MAD a Jacobian per test image), and a later sweep on the same bundle, kits and code reads it from disk
       (:mod:`distributed_me.defenses.costs`); the parent run gets it as ``defense.VICTIM.POLICY_INDEX.NAME``.

    Returns ``{"VICTIM|POLICY": cost as a dict}`` for the trials."""
    from dataclasses import asdict

    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from ..defenses import find_kit, parse_policy, train_kit
    from ..defenses.costs import cost_key, load_cost, save_cost
    from ..runner import evaluator_for
    from ..victims import load_victim

    tags: dict[str, str] = {}
    metrics: list[Metric] = []
    costs: dict[str, dict] = {}
    now = int(time.time() * 1000)
    for v in spec.victims:
        policies = spec.policies_for(v.name)
        if not policies:
            continue
        kits_of = {p: sorted(parse_policy(p).kits_needed()) for p in policies}
        kit_paths: dict[str, str] = {}
        victim = None
        if any(kits_of.values()):  # kits are found (or built) per victim: the victim is needed to name them
            victim = load_victim(bundles[v.name])
            for name in sorted({k for ks in kits_of.values() for k in ks}):
                kit = find_kit(victim, name)
                if kit is None:
                    if on_progress:
                        on_progress(f"defense kit {name!r} for victim {v.name}: building it once "
                                    f"(`dme defense train --defense {name}`)")
                    kit = train_kit(victim, name, source=v.source)
                kit_paths[name] = str(kit.path)
                tags[f"dme.kit.{v.name}.{name}"] = str(kit.path)
        # measured by an earlier sweep on the same bundle, kits, data and code: read, not measured again
        keys = {p: cost_key(bundles[v.name], p, [kit_paths[k] for k in kits_of[p]]) for p in policies}
        known = {p: load_cost(keys[p]) for p in policies}
        evaluator = None
        for p in policies:
            i = spec.policies.index(p)
            cost = known[p]
            if cost is None:
                if evaluator is None:
                    if victim is None:
                        victim = load_victim(bundles[v.name])
                    evaluator = evaluator_for(victim)
                measured = evaluator.defense_cost(p)
                assert measured is not None
                cost = asdict(measured)
                save_cost(keys[p], cost, p)
            costs[f"{v.name}|{p}"] = cost
            tags[f"dme.defense.{v.name}.{i}"] = p
            metrics += [Metric(f"defense.{v.name}.{i}.{k}", float(val), now, 0)
                        for k, val in cost.items() if val is not None]
    MlflowClient(tracking_uri()).log_batch(parent_run_id, metrics=metrics,
                                           tags=[RunTag(k, val) for k, val in tags.items()])
    return costs


def benign_detection(spec: SweepSpec, bundles: dict[str, str], app: str, parent_run_id: str) -> dict[str, float]:
    """The detectors' false-positive rate: ``spec.benign_keys`` benign clients per victim deployment, each sending
    ``spec.benign_queries`` of the victim's test images in its own random order, 20 per request, through the same
    API the trials used; a key any detector flags is a false positive of that detector. Logged to the parent run as
    ``detection.VICTIM.POLICY_INDEX.DETECTOR.benign_fpr``; returned too."""
    import numpy as np
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from ray import serve

    from ..defenses import parse_detector
    from ..serving.clients import HandleOracle
    from ..victims import load_victim, victim_test_split

    if not spec.detectors or not spec.benign_keys:
        return {}
    accountant, watchman = serve.get_deployment_handle("Accountant", app), serve.get_deployment_handle("Watchman", app)
    names = [parse_detector(d).name for d in spec.detectors]
    out: dict[str, float] = {}
    for v in spec.victims:
        policies = spec.policies_for(v.name)
        if not policies:
            continue
        x = victim_test_split(load_victim(bundles[v.name]))[0].numpy()
        for p in policies:
            i = spec.policies.index(p)
            deployment = spec.deployment_name(v.name, p)
            flagged = dict.fromkeys(names, 0)
            for k in range(spec.benign_keys):
                key = f"benign-{k}-{os.urandom(8).hex()}"
                accountant.add_client.remote({"key": key, "budget": None, "victims": [deployment]}).result()
                oracle = HandleOracle(deployment, key, app)
                order = np.random.default_rng(k).permutation(len(x))[: spec.benign_queries]
                for j in range(0, len(order), 20):
                    oracle.query(x[order[j : j + 20]])
                _, _, fingerprint = accountant.authorize.remote(key, deployment).result()
                for verdict in watchman.verdicts.remote(deployment, fingerprint).result():
                    flagged[verdict["detector"]] += bool(verdict["flagged"])
            for name in names:
                out[f"detection.{v.name}.{i}.{name}.benign_fpr"] = flagged[name] / spec.benign_keys
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri()).log_batch(parent_run_id, metrics=[Metric(k, val, now, 0) for k, val in out.items()])
    log.info("detectors' benign false-positive rates: %s", out)
    return out


def prepare_strategies(spec: SweepSpec, parent_run_id: str, progress: bool = True,
                       projected: dict[str, Any] | None = None) -> dict[str, dict[str, dict]]:
    """The strategies' once-per-sweep preparation (see :class:`~distributed_me.attacks.QueryStrategy`), before any
    trial: every strategy of the grid that declares a ``prepare`` step runs it here, once per pool of the grid, with a
    Ray Data actor pool as its ``map_pool``; what it returns is added to that strategy's options in every trial on
    that pool, so trials read the product instead of each recomputing it. Figures it records, and its wall time, go
    to the parent run as ``prepare.STRATEGY.NAME`` (``prepare.STRATEGY.POOL.NAME`` when the grid has several pools,
    POOL being the pool's name), with the plan's ``projected_seconds`` / ``projected_raw_seconds`` (``projected``:
    the plan's preparation steps by (strategy, pool)). Returns ``{pool: {strategy: products}}`` for the trials."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from ..pools.features import ray_map_pool

    client = MlflowClient(tracking_uri())
    prepared: dict[str, dict[str, dict]] = {p: {} for p in spec.pool}
    for pool_ref in spec.pool:
        pool = None
        for name in spec.attack.strategy:
            cls = ATTACKS.get(name)
            if not cls.prepares():
                continue
            pool = pool or load_pool(pool_ref, **spec.options_for(pool_ref))
            prefix = name if len(spec.pool) == 1 else f"{name}.{pool.name}"

            def record(metrics: dict[str, float], tags: dict[str, str], prefix: str = prefix) -> None:
                now = int(time.time() * 1000)
                client.log_batch(parent_run_id, metrics=[Metric(f"prepare.{prefix}.{k}", float(v), now, 0)
                                                         for k, v in metrics.items()],
                                 tags=[RunTag(f"dme.prepare.{prefix}.{k}", str(v)) for k, v in tags.items()])

            t0 = time.perf_counter()
            log.info("preparing strategy %s on pool %s", name, pool.name)
            products = cls(**spec.attack.strategy_options.get(name, {})).prepare(
                pool, PrepareContext(progress=progress, record=record, map_pool=ray_map_pool(progress=progress)))
            step = (projected or {}).get((name, pool_ref))
            plan_figures = {} if step is None else {"projected_seconds": step.corrected.total,
                                                    "projected_raw_seconds": step.raw.total}
            record({"seconds": time.perf_counter() - t0, **plan_figures}, {k: str(v) for k, v in products.items()})
            prepared[pool_ref][name] = dict(products)
    return prepared


def ship_plugins(plugins: list[str]) -> None:
    """Plugin code travels by value: a featurizer or model class defined in a plugin file is pickled with its code,
    since Ray workers that never loaded the file (Ray Data actors, for one) cannot import it by name. Trials also
    load the plugins themselves, so the registries there know the plugin's names."""
    from ray import cloudpickle

    for ref in plugins:
        cloudpickle.register_pickle_by_value(sys.modules[load_plugin(ref)])


def _param_space(spec: SweepSpec, ctx: dict[str, Any]):
    from ray import tune

    if spec.search.kind == "grid":
        # longest first, by the plan's projection (queries x epochs where there is none): with trials side by side,
        # a long trial started last would run alone at the end while the other slots idle (LPT scheduling; the
        # plan's makespan assumes this order)
        projected = ctx.get("projected", {})

        def length(f: dict) -> float:
            p = projected.get(cost_key(f), {}).get("projected_seconds_total")
            return p if p is not None else float(int(f["budget"]) * int(f["epochs"]))

        order = sorted(spec.grid(), key=length, reverse=True)
        return {"factors": tune.grid_search(order), "ctx": TrialContext(ctx)}
    a = spec.attack
    axes = {"victim": [v.name for v in spec.victims], "policy": spec.policies, "pool": spec.pool,
            "strategy": a.strategy,
            "budget": a.budget, "arch": a.arch, "optimizer": a.optimizer, "lr": a.lr, "pretrained": a.pretrained,
            "augment": a.augment, "epochs": a.epochs, "seed": a.seed}
    factors: dict[str, Any] = {k: (v[0] if len(v) == 1 else tune.choice(v)) for k, v in axes.items()}
    for k, dist in spec.search.space.items():
        d = dist.model_dump()
        if d["loguniform"]:
            factors[k] = tune.loguniform(*d["loguniform"])
        elif d["uniform"]:
            factors[k] = tune.uniform(*d["uniform"])
        elif d["randint"]:
            factors[k] = tune.randint(d["randint"][0], d["randint"][1] + 1)
        else:
            factors[k] = tune.choice(d["choice"])
    return {"factors": factors, "ctx": TrialContext(ctx)}


def _legacy_layout(resume_path: Path) -> bool:
    """Whether a saved Tune experiment keeps the sweep context as a nested dict (releases before
    :class:`~distributed_me.sweep.trial.TrialContext`): its flattened ``param_space`` keys reach into ``ctx/``."""
    import pickle

    try:
        with open(resume_path / "tuner.pkl", "rb") as fh:
            keys = pickle.load(fh).get("__flattened_param_space_keys") or []
    except (OSError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        log.warning("could not read %s (%s); resuming with today's search space", resume_path / "tuner.pkl", e)
        return False
    return any(k.startswith("ctx/") for k in keys)


def _settled(res: Any, early_stopping: bool) -> bool:
    """Whether a Tune result is a trial that ended for good: it failed, it reported its completed result, or, under
    an early-stopping scheduler, the scheduler stopped it after a report. Without such a scheduler a trial Ctrl-C
    stopped is none of these. Under one (ASHA), a trial Ctrl-C stopped after its first report cannot be told from one
    the scheduler stopped: Tune records both TERMINATED without ``completed`` and keeps its interrupt flag inside
    ``tune.run``. So an ASHA sweep interrupted when every unfinished trial had reported reads as finished; its
    unfinished trials stay in the report as early-stopped."""
    if res.error is not None:
        return True
    metrics = res.metrics or {}
    return bool(metrics.get("completed")) or (early_stopping and bool(metrics))


def _tuner(spec: SweepSpec, ctx: dict[str, Any], storage: Path, gpus: bool, resume_path: Path | None,
           on_progress: Callable[[str], None] | None, on_status: Callable[[str], None] | None = None):
    from ray import tune

    from .trial import run_trial

    r = spec.resources
    bundle = {"CPU": r.cpus_per_trial, **({"GPU": r.gpu_fraction} if gpus else {}), **r.trial_resources}
    trainable = tune.with_resources(run_trial, tune.PlacementGroupFactory([bundle]))
    if resume_path is not None:
        space = _param_space(spec, ctx)
        if _legacy_layout(resume_path):
            # started before the context was one opaque value: Tune would refuse today's context (its flattened keys
            # differ). The saved space is kept; its trials run with the context they were created with.
            log.warning("sweep %r was started by an earlier distributed_me; its unfinished trials keep the "
                           "context they were started with", spec.name)
            space = None
        try:
            return tune.Tuner.restore(str(resume_path), trainable, resume_unfinished=True, resume_errored=False,
                                      restart_errored=True, param_space=space)
        except ValueError as e:
            if "param_space" not in str(e):
                raise
            raise DmeError(f"sweep {spec.name!r} cannot be resumed: its saved Tune state in {resume_path} has a "
                           "different search space than this spec gives (a factor was added or removed); run it "
                           "again from the start with `dme sweep SPEC --fresh`, or give it another `name:`") from None
    search_alg = scheduler = None
    if spec.search.kind == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=0)
    if spec.asha is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(spec.attack.epochs) + 1,
                                  grace_period=spec.asha.grace_period, reduction_factor=spec.asha.reduction_factor)
    needs_metric = search_alg is not None or scheduler is not None
    tune_config = tune.TuneConfig(
        num_samples=spec.search.num_samples if spec.search.kind == "optuna" else 1,
        search_alg=search_alg, scheduler=scheduler, max_concurrent_trials=r.max_concurrent_trials,
        # keep trial workers between trials: no re-import of torch & co, and the judge/pool caches in trial.py stay
        reuse_actors=True,
        metric=spec.search.metric if needs_metric else None, mode=spec.search.mode if needs_metric else None)
    # Tune's own status table (every factor as a column, reprinted at every update) is off: one line per trial
    # state change instead, and the full table once at the end (dme sweep prints it)
    total = len(spec.grid()) if spec.search.kind == "grid" else spec.search.num_samples
    callbacks = [TrialProgress(total, on_progress, on_status)] if on_progress else []
    run_config = tune.RunConfig(name=spec.name, storage_path=str(storage), verbose=0, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=spec.retries))
    return tune.Tuner(trainable, param_space=_param_space(spec, ctx), tune_config=tune_config, run_config=run_config)


def run_sweep(spec: SweepSpec | None = None, *, preset: str | None = None, resume: str | None = None,
              address: str | None = None, num_cpus: int | None = None,
              on_progress: Callable[[str], None] | None = None, fresh: bool = False,
              on_status: Callable[[str], None] | None = None, max_hours: float | None = None,
              cost_limit: bool = True) -> SweepOutcome:
    """Run (or, with ``resume=NAME``, resume) a sweep; see the module docstring. ``fresh`` discards the Tune state
    of an earlier sweep of the same name (its MLflow runs stay; reports read the newest parent run).
    ``on_progress`` receives one line per trial state change (started, finished, failed); ``on_status`` (a terminal)
    the live status line: counts and each running trial's epoch.

    Once Ray is up (its resources known) and before anything else, the sweep is priced (:mod:`.plan`); a plan over
    the limit (``max_hours``, :mod:`distributed_me.cost.guard`) raises
    :class:`~distributed_me.cost.guard.CostLimitError` unless ``cost_limit`` is off. Each trial and preparation
    step then logs its projection beside its actual time, and the parent run the plan's totals."""
    import ray

    from ..serving.app import cluster_has_gpus
    from ..serving.runtime import init_ray
    from . import tracking

    storage = sweeps_dir()
    if resume:
        spec, preset, folder = load_saved(resume)
        if not (folder / spec.name).exists():
            raise DmeError(f"sweep {resume!r} never reached Tune (no experiment state in {folder}); start it again "
                           "without --resume")
    else:
        assert spec is not None
        folder = storage / spec.name
        if fresh and folder.exists():
            shutil.rmtree(folder)
        if (folder / spec.name).exists():
            raise DmeError(f"sweep {spec.name!r} already exists in {folder}: resume it with `dme sweep --resume "
                           f"{spec.name}`, start it again with --fresh, or give the sweep another name")
        save_spec(spec, preset, folder)

    spec = spec.with_absolute_paths()  # trials run in Tune's trial folders: relative paths must not leak
    clock = Timer(phases=())  # the sweep's own fixed costs, on the parent run as sweep_seconds_PHASE
    with clock.phase("ray"):
        init_ray(address, num_cpus=num_cpus)
        ship_plugins(spec.plugins)
        gpus = cluster_has_gpus()
    with clock.phase("plan"):
        resources = ray_resources()
        plan = plan_sweep(spec, resources)
        if on_progress:
            on_progress(f"plan: {len(plan.trials)} trials, {human(plan.wall_s)} projected on {resources.label} "
                        f"({plan.concurrency} at a time; `dme sweep ... --dry-run` shows every step)")
        if cost_limit and not resume:
            check_limit(f"sweep {spec.name!r}", plan.wall_s, resources.label, limit_seconds(max_hours),
                        lambda: smaller_preset(spec, preset, resources))
    with clock.phase("mlflow"):
        exp_id = ensure_experiment(spec.experiment)
        parent = tracking.find_parent(spec.experiment, spec.name) if resume else None
        if parent:
            tracking.reopen_parent(parent)
        else:
            parent = tracking.start_parent(spec.experiment, spec.name, spec.model_dump(mode="json"),
                                           ray.cluster_resources(), preset)
        tracking.log_plan(parent, plan.metrics(), plan.calibration)
        # the trials' MLflow calls go through one actor, which opens the store now, while the driver works on
        recorder = start_recorder(parent, tracking_uri())
    status, error, summary = "FAILED", None, None
    deployer, victims, warming = None, None, None
    try:
        with clock.phase("deploy"):  # started here, finished in the background while Tune starts the trials
            if on_progress and any(is_embedded(v.source) for v in spec.victims) and \
                    not embedded_bundle_path().exists():  # a first run is silent for a minute otherwise
                on_progress(f"training the embedded victim once (about a minute on 2 cores), cached in "
                            f"{embedded_bundle_path()}")
            bundles = {v.name: str(victim_bundle_path(v.source)) for v in spec.victims}
        with clock.phase("defenses"):  # kits before the deployment: its replicas load them when they start
            defense_costs = prepare_defenses(spec, bundles, parent, on_progress)
        with clock.phase("deploy"):
            # trials reach victims by handle; HTTP only when joining a cluster that may serve other apps too
            victims = service.victim_app(spec, bundles, folder)
            deployer = service.start(victims, http=bool(address or os.environ.get("RAY_ADDRESS")))
            if deployer is None:  # joined: the plan's wait for Serve's start does not happen (nor may it be learned)
                saved_s, plan.fixed["deploy_background"] = plan.fixed["deploy_background"], 0.0
                tracking.log_plan(parent, plan.metrics(), plan.calibration)
                if on_progress:
                    on_progress(f"joining the running victim service {victims.name} ({human(saved_s)} of Serve start "
                                "in the plan not spent)")
        with clock.phase("prepare"):
            steps = [s for s in plan.serial if s.kind == "prepare"]
            if on_progress:
                for s in steps:
                    if s.seconds > 0:
                        on_progress(f"{s.name}: {human(s.seconds)} projected, before any trial")
            # progress bars only on a terminal: in a log (a Ray job, a redirect) they are lines of carriage returns
            prepared = prepare_strategies(spec, parent, progress=on_progress is not None and sys.stderr.isatty(),
                                          projected={(s.factors["strategy"], s.factors["pool"]): s for s in steps})
        deployments = {f"{v}|{p}": spec.deployment_name(v, p) for v, p in spec.pairs()}
        ctx = {"spec": spec.model_dump(mode="json"), "prepared": prepared, "app_name": victims.name,
               "tracking_uri": tracking_uri(), "experiment_id": exp_id, "parent_run_id": parent, "bundles": bundles,
               "deployments": deployments, "defense_costs": defense_costs,
               "cpus_per_trial": spec.resources.cpus_per_trial,
               "deploy_timeout_s": spec.resources.deploy_timeout_s, "projected": trial_projections(plan),
               "cost_device": plan.calibration, "recorder": True,
               # a scheduler that stops trials (ASHA) decides on every epoch (interval 0); otherwise intermediate
               # results only feed the status line, and each is a round trip the trial waits for
               "tune_report_every_s": 0.0 if spec.asha is not None else trial.TUNE_REPORT_EVERY_S}
        with clock.phase("trials"):
            # the driver only waits for Tune from here on: its spare core gets the report's plotting stack ready
            warming = threading.Thread(target=warm_up, name="dme-report-warm-up", daemon=True)
            warming.start()
            tuner = _tuner(spec, ctx, folder, gpus, folder / spec.name if resume else None, on_progress, on_status)
            grid = tuner.fit()
        # on SIGINT Tune saves its state and returns instead of raising. Such a sweep is KILLED, not FINISHED (its
        # partial trials phase must not teach the cost model that the sweep is short), and skips the benign-client
        # pass and the report. Tune may record a trial it stopped as TERMINATED, so its counts cannot tell: a trial
        # settled only by failing, completing, or (with ASHA) being stopped by the scheduler after a report
        total = len(spec.grid()) if spec.search.kind == "grid" else spec.search.num_samples
        interrupted = sum(_settled(res, spec.asha is not None) for res in grid) < total
        if deployer is not None:
            deployer.result(timeout=spec.resources.deploy_timeout_s)  # a failed deployment is the sweep's error
        if not interrupted:
            with clock.phase("benign"):  # the detectors' false positives, on the deployments the trials used
                benign_detection(spec, bundles, victims.name, parent)
        if deployer is not None:  # a joined service has none: a 0 would teach later plans that Serve starts at once
            clock.seconds["deploy_background"] = deployer.seconds
        # attempts whose worker died (a lost node, an OOM kill) never closed their runs; Tune retried them
        tracking.end_stale_children(parent, "the trial's worker died (node lost or process killed) before the "
                                            "attempt ended; Tune retried the trial as a new attempt")
        # the phases so far, before the report reads them (its projection-vs-reality table); end_parent logs all
        tracking.log_plan(parent, {f"sweep_seconds_{k}": v for k, v in clock.seconds.items()})
        if not interrupted:
            with clock.phase("report"):  # summary table, report, CSV and plots onto the parent run (never raises)
                warming.join()  # matplotlib is not to be set up on two threads at once
                publish_report(spec.name, parent, spec.experiment)
        rows, errors = [], []
        for res in grid:
            if res.error is not None:
                errors.append(f"{res.path}: {res.error}")
                continue
            m = res.metrics or {}
            factors = (res.config or {}).get("factors", {})
            rows.append({**{k: factors.get(k) for k in FACTORS}, **{k: m.get(k) for k in RESULT_KEYS},
                         "harness": {k: v for k, v in m.items() if k.startswith("harness_")},
                         "trial_wall_seconds": m.get("time_total_s"), "tune_reports": m.get("training_iteration"),
                         "mlflow_run_id": m.get("mlflow_run_id"), "completed": bool(m.get("completed"))})
        done = [r for r in rows if r["completed"]]
        if interrupted:
            status = "KILLED"
            error = (f"interrupted with {len(done)} of {total} trials finished; resume with `dme sweep --resume "
                     f"{spec.name}`")
        else:
            status = "FINISHED" if not errors else "FAILED"
            error = "\n".join(errors) or None
        summary = {"trials": len(rows) + len(errors), "trials_failed": len(errors), "trials_finished": len(done),
                   **{f"sweep_seconds_{k}": v for k, v in clock.seconds.items()}}
        if done:
            summary["best_fidelity"] = max(r["fidelity"] for r in done)
        return SweepOutcome(spec.name, parent, rows, errors, folder, clock.seconds, interrupted)
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted; resume with `dme sweep --resume NAME`"
        raise
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        if warming is not None:  # an interrupted sweep skips the report: the warm-up is not left mid-import
            warming.join(timeout=30)
        with clock.phase("teardown"):
            if deployer is not None:
                deployer.wait(timeout=spec.resources.deploy_timeout_s)  # never delete an app mid-deployment
            if victims is not None:
                service.stop(victims)
            stop_recorder(recorder)  # Tune has returned: every trial that ended awaited its metrics
            tracking.end_parent(parent, status, summary, error)
