"""A sweep's plan before it runs: every step priced, the total, and when it would finish on the resources at hand.

``dme sweep SPEC --dry-run`` prints it; ``dme sweep SPEC`` checks it against the cost limit before starting anything
(:mod:`distributed_me.cost.guard`) and logs each step's projection beside its actual time.

The steps are those the sweep runs, in its order: training a victim that is not cached yet (the embedded one), each
strategy's once-per-pool preparation (:meth:`QueryStrategy.prepare_cost`), then one trial per factor combination
(:func:`distributed_me.cost.plan.extraction_work` plus the harness's per-trial cost). Trials run
``concurrency`` at a time, first come first served in grid order as Tune starts them, so the trials' wall time is
that list schedule's makespan; the sweep's fixed costs (Ray start, MLflow, the Serve app's deployment that the first
trials wait for, the report) come from recorded sweeps when there are some (medians of ``sweep_seconds_*``), else from
:data:`FIXED_DEFAULTS`, measured on the project's 2-core machine.

Resources: a private cluster is this machine (its CPUs, its GPUs); ``--address`` joins a cluster and reads its
resources; ``--gpu NAME --gpus N --cpus M`` plans for a cluster one does not have (a ``full`` preset on a GPU cluster,
priced from FLOPs, :mod:`distributed_me.cost.rates`).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..attacks import ATTACKS
from ..cost import work
from ..cost.history import Corrections, learned_factors
from ..cost.plan import cost_job, extraction_work, project
from ..cost.rates import SERVE_REQUEST_S, Device, Rates
from ..cost.work import Net, Projection, human
from ..data import load_pool
from ..errors import DmeError
from ..extraction import AttackSpec
from .spec import SweepSpec

log = logging.getLogger(__name__)

#: a sweep's fixed costs when no sweep was recorded on this device: seconds, measured on the project's machine
#: (x86_64, 2 cores) over 8 recorded sweeps: Ray start, MLflow parent run, the Serve app the first trials wait for,
#: the report; ``per_trial`` is Tune's own cost per trial (scheduling, the trial actor, reports) plus the harness's
FIXED_DEFAULTS: dict[str, float] = {"ray": 3.0, "mlflow": 1.5, "deploy_background": 12.0, "report": 1.0,
                                    "per_trial": 1.0}
#: test-split size assumed for a victim the plan cannot resolve (not trained yet): stated in the plan
UNKNOWN_TEST_SIZE = 1000


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    label: str
    gpu_profile: str | None = None  # a GPU the plan prices from FLOPs (not this machine's)


@dataclass
class PlannedStep:
    name: str
    kind: str  # victim | prepare | trial
    raw: Projection
    corrected: Projection
    factors: dict = field(default_factory=dict)  # a trial's factors; a preparation's strategy and pool
    extra_s: float = 0.0  # harness per trial, not in the projection's phases

    @property
    def seconds(self) -> float:
        return self.corrected.total + self.extra_s


@dataclass
class SweepPlan:
    name: str
    device: Device
    calibration: str  # the trials' Rates.key: what the sweep's runs are tagged with
    cluster: ClusterResources
    concurrency: int
    cpus_per_trial: float
    gpus_per_trial: float
    steps: list[PlannedStep]
    fixed: dict[str, float]
    corrections_runs: int
    notes: list[str] = field(default_factory=list)
    trials_factor: float = 1.0

    @property
    def trials(self) -> list[PlannedStep]:
        return [s for s in self.steps if s.kind == "trial"]

    @property
    def serial(self) -> list[PlannedStep]:
        return [s for s in self.steps if s.kind != "trial"]

    @property
    def trials_raw_s(self) -> float:
        """The trials phase by the cost model alone: the Serve app's deployment the first trials wait for, then the
        list schedule's makespan: each trial starts on the first free slot, longest projected first (the order the
        sweep gives Tune; ties in grid order)."""
        slots = [0.0] * max(1, self.concurrency)
        for s in sorted(self.trials, key=lambda t: t.corrected.total, reverse=True):
            heapq.heapreplace(slots, slots[0] + s.seconds)
        return self.fixed["deploy_background"] + max(slots)

    @property
    def trials_wall_s(self) -> float:
        """:attr:`trials_raw_s` times the factor learned from recorded sweeps (Tune's scheduling, contention between
        concurrent trials on shared cores)."""
        return self.trials_raw_s * self.trials_factor

    @property
    def fixed_s(self) -> float:
        return sum(v for k, v in self.fixed.items() if k not in ("per_trial", "deploy_background"))

    @property
    def wall_s(self) -> float:
        return self.fixed_s + sum(s.seconds for s in self.serial) + self.trials_wall_s

    @property
    def cpu_hours(self) -> float:
        trial = sum(s.seconds for s in self.trials) * self.trials_factor * self.cpus_per_trial
        return (trial + sum(s.seconds for s in self.serial)) / 3600

    @property
    def gpu_hours(self) -> float:
        serial = sum(s.seconds for s in self.serial) if self.device.gpu else 0.0
        return (sum(s.seconds for s in self.trials) * self.trials_factor * self.gpus_per_trial + serial) / 3600

    def finish(self, start: datetime | None = None) -> datetime:
        return (start or datetime.now()) + timedelta(seconds=self.wall_s)

    def metrics(self) -> dict[str, float]:
        """The plan's figures for the sweep's parent run, beside the actual ``sweep_seconds_*``."""
        return {"sweep_projected_seconds_total": self.wall_s, "sweep_projected_seconds_trials": self.trials_wall_s,
                "sweep_projected_raw_seconds_trials": self.trials_raw_s,
                "sweep_projected_cpu_hours": self.cpu_hours, "sweep_projected_gpu_hours": self.gpu_hours}


def local_resources(num_cpus: int | None = None) -> ClusterResources:
    """A private cluster: this machine's CPUs (or ``num_cpus``) and GPUs."""
    import torch

    cpus = float(num_cpus or os.cpu_count() or 1)
    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    return ClusterResources(cpus, gpus, f"this machine ({cpus:g} CPUs{f', {gpus:g} GPUs' if gpus else ''})")


def ray_resources() -> ClusterResources:
    """The connected Ray cluster's CPUs and GPUs; its GPU model from Ray's ``accelerator_type:*`` resources when
    this process has no GPU to measure on (priced from FLOPs then)."""
    import ray
    import torch

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    profile = None
    if gpus and not torch.cuda.is_available():
        kinds = [k.split(":", 1)[1].lower().replace("-", "") for k in res if k.startswith("accelerator_type:")]
        profile = next((k for k in kinds if k in _profiles()), "t4")
    label = f"the Ray cluster ({res.get('CPU', 0):g} CPUs{f', {gpus:g} GPUs' if gpus else ''})"
    return ClusterResources(float(res.get("CPU", 1)), gpus, label, profile)


def stated_resources(gpu: str | None, gpus: int | None, cpus: int | None) -> ClusterResources:
    """A cluster one does not have (``--gpu a100 --gpus 8 --cpus 64``): GPUs priced from FLOPs."""
    n = float(gpus if gpus is not None else (1 if gpu else 0))
    c = float(cpus if cpus is not None else (8 * n if n else (os.cpu_count() or 1)))
    if gpu is not None:
        Device.gpu_profile(gpu)  # validates the name
    return ClusterResources(c, n, f"a stated cluster ({c:g} CPUs{f', {n:g} x {gpu.upper()}' if gpu else ''})",
                            gpu.lower() if gpu else None)


def sweep_resources(address: str | None = None, num_cpus: int | None = None, gpu: str | None = None,
                    gpus: int | None = None, cpus: int | None = None) -> ClusterResources:
    """What a plan is for: a stated cluster (``gpu``/``gpus``/``cpus``), the cluster at ``address`` (joined for the
    question, then left), or this machine as a private cluster."""
    if gpu is not None or gpus is not None or cpus is not None:
        return stated_resources(gpu, gpus, cpus)
    if address or os.environ.get("RAY_ADDRESS"):
        import ray

        from ..serving.runtime import init_ray

        init_ray(address)
        try:
            return ray_resources()
        finally:
            ray.shutdown()
    return local_resources(num_cpus)


def _profiles() -> dict:
    from ..cost.rates import GPU_PEAK_FLOPS

    return GPU_PEAK_FLOPS


def _victim_info(source: str, notes: list[str]) -> tuple[Net, int, bool]:
    """(the victim's net, its test-split size, whether it is cached) without training or downloading anything."""
    from ..data import load_dataset
    from ..victims import is_embedded, load_victim
    from ..victims.embedded import EMBEDDED_ARCH, EMBEDDED_DATASET, EMBEDDED_IMG_SIZE, embedded_bundle_path

    if is_embedded(source) and not embedded_bundle_path().exists():
        ds = load_dataset(EMBEDDED_DATASET)
        return Net(EMBEDDED_ARCH, EMBEDDED_IMG_SIZE, 1, ds.num_classes), len(ds.test), False
    try:
        victim = load_victim(source)
    except DmeError as e:
        notes.append(f"victim {source!r} cannot be resolved yet ({e}); priced as a CNN32 on 32 px CIFAR-10 "
                     f"({UNKNOWN_TEST_SIZE} test images)")
        return Net("cnn32", 32, 3, 10), UNKNOWN_TEST_SIZE, True
    from ..victims import victim_test_split

    m = victim.meta
    return Net(m.arch, m.img_size, m.in_chans, m.num_classes), len(victim_test_split(victim)[1]), True


def _embedded_training(net: Net) -> list[work.Work]:
    from ..data import load_dataset
    from ..victims.embedded import EMBEDDED_DATASET, EMBEDDED_TRAIN

    n = len(load_dataset(EMBEDDED_DATASET).train)
    t = EMBEDDED_TRAIN
    return [work.train(net, n, t.epochs, t.batch_size, phase="victim", what="the embedded victim"),
            work.infer(net, n, phase="victim", what="its evaluation")]


def plan_sweep(spec: SweepSpec, resources: ClusterResources, *, rates: Rates | None = None,
               corrections: Corrections | None = None) -> SweepPlan:
    """Price every step of ``spec`` (see the module docstring) for ``resources``."""
    r = spec.resources
    threads = max(1, int(round(r.cpus_per_trial)))
    gpus = resources.gpus > 0
    driver = None  # preparation steps run on the driver, with its own threads
    if rates is not None:
        device = rates.device
    elif resources.gpu_profile:
        device = Device.gpu_profile(resources.gpu_profile)
    else:
        device, driver = Device.here(threads), Device.here()
        if gpus and not device.gpu:
            device = driver = Device.gpu_profile("t4")
    # a trial on a fraction of a GPU gets that fraction of its throughput (an assumption: a small model that cannot
    # fill the card loses less); the preparation steps run on the driver, priced with the whole device
    share = r.gpu_fraction if gpus else 1.0
    if rates is None:
        rates = Rates(driver or device)
        trial_rates = Rates(device, request_s=SERVE_REQUEST_S, share=share)
    else:
        trial_rates = rates.shared(share)
    corrections = corrections if corrections is not None else learned_factors(trial_rates.key)
    notes: list[str] = []
    if device.profile:
        notes.append(f"GPU work priced from FLOPs: {device.label}")
    fixed = {k: corrections.sweep.get(k, v) for k, v in FIXED_DEFAULTS.items()}
    per_trial = corrections.sweep.get("harness_per_trial", 0.0) + fixed["per_trial"]
    steps: list[PlannedStep] = []
    victims: dict[str, tuple[Net, int]] = {}
    for v in spec.victims:
        net, test_size, cached = _victim_info(v.source, notes)
        victims[v.name] = (net, test_size)
        if not cached:
            raw = project(_embedded_training(net), rates)
            steps.append(PlannedStep(f"train victim {v.name}", "victim", raw, raw))
    pools = {}
    for pool_ref in spec.pool:
        pool = load_pool(pool_ref, **spec.options_for(pool_ref))
        pools[pool_ref] = pool
        for name in spec.attack.strategy:
            cls = ATTACKS.get(name)
            if not cls.prepares():
                continue
            items = cls(**spec.attack.strategy_options.get(name, {})).prepare_cost(pool)
            raw = project(items, rates)
            corrected = raw  # preparation steps are not corrected yet (see cost/history.py)
            label = f"prepare {name} on {pool.name}" + ("" if items else " (cached)")
            steps.append(PlannedStep(label, "prepare", raw, corrected, {"strategy": name, "pool": pool_ref}))
    rows = spec.grid() if spec.search.kind == "grid" else _sampled(spec)
    varying = [k for k in COST_FACTORS + ("optimizer", "lr", "seed") if len({str(f[k]) for f in rows}) > 1]
    for f in rows:
        net, test_size = victims[f["victim"]]
        attack = AttackSpec.from_given(
            strategy=f["strategy"], strategy_options=spec.attack.strategy_options.get(f["strategy"], {}),
            budget=int(f["budget"]), arch=f["arch"], optimizer=f["optimizer"], lr=f["lr"], epochs=int(f["epochs"]),
            batch_size=spec.attack.batch_size, augment=bool(f["augment"]), seed=int(f["seed"]),
            adv_eval_samples=spec.adv_eval_samples)
        job = cost_job(attack, (net.in_chans, net.img_size, net.img_size), net.num_classes, pools[f["pool"]], net)
        raw = project(extraction_work(attack, job, test_size, eval_every_epoch=spec.eval_every_epoch,
                                      policy=f["policy"], prepared=True), trial_rates)
        corrected = raw.scaled(corrections.factors(f["strategy"], f["victim"], f["arch"]))
        steps.append(PlannedStep(_trial_name(f, varying), "trial", raw, corrected, f, per_trial))
    by_cpu = math.floor(resources.cpus / r.cpus_per_trial) if r.cpus_per_trial else len(rows)
    by_gpu = math.floor(resources.gpus / r.gpu_fraction) if gpus else by_cpu
    concurrency = max(1, min(by_cpu, by_gpu, r.max_concurrent_trials or len(rows) or 1, len(rows) or 1))
    if by_cpu < 1 or (gpus and by_gpu < 1):
        notes.append(f"a trial asks for {r.cpus_per_trial:g} CPUs{f' and {r.gpu_fraction:g} GPU' if gpus else ''} "
                     f"but {resources.label} has fewer: no trial would ever start there (priced one at a time); "
                     f"lower resources.cpus_per_trial or use a bigger cluster")
    for rr in {id(x.measured): x for x in (rates, trial_rates)}.values():  # a shared copy shares its list
        if rr.measured:
            notes.append(f"measured once on {rr.device.label} (cached): {', '.join(sorted(set(rr.measured)))}")
    if rates.device.profile and any(s.kind == "prepare" and s.seconds for s in steps):
        notes.append("preparation steps run in the sweep's driver process: priced on the GPU, which holds only if "
                     "the driver runs on a GPU node (a head node without one runs them on its CPU)")
    if gpus and r.gpu_fraction < 1:
        notes.append(f"each trial gets {r.gpu_fraction:g} of a GPU: its GPU work is priced at that share of the "
                     f"card's throughput")
    plan = SweepPlan(spec.name, device, trial_rates.key, resources, concurrency, r.cpus_per_trial,
                     r.gpu_fraction if gpus else 0.0, steps, fixed, corrections.runs, notes,
                     corrections.trials_factor(spec.name))
    used = sum(1 for s in plan.trials if s.corrected.total != s.raw.total)
    if used or plan.trials_factor != 1.0:
        notes.append(f"{used} of {len(plan.trials)} trials corrected by recorded runs of the same work on this "
                     f"device; trials phase x{plan.trials_factor:.2f} from this sweep's earlier runs")
    return plan


#: the factors a trial's cost depends on (learning rate, optimizer, seed and pretraining do not change the work)
COST_FACTORS = ("victim", "policy", "pool", "strategy", "budget", "arch", "epochs", "augment")


def cost_key(f: dict) -> str:
    """The key of a trial's projection in a plan: its cost-relevant factors."""
    return "|".join(str(f.get(k)) for k in COST_FACTORS)


def trial_projections(plan: SweepPlan) -> dict[str, dict[str, float]]:
    """``{cost_key: projection metrics}`` for the trials (what each trial logs beside its actual times)."""
    from ..cost.plan import projection_metrics

    return {cost_key(s.factors): projection_metrics(s.raw, s.corrected) for s in plan.trials}


def smaller_preset(spec: SweepSpec, preset: str | None, resources: ClusterResources,
                   rates: Rates | None = None) -> str | None:
    """The alternative a refused sweep proposes: its ``cpu-small`` preset(s), with their projected wall time."""
    from .spec import parse_sweep

    out = []
    for name in spec.presets:
        if "small" not in name or name == preset:
            continue
        try:
            small = parse_sweep(spec.model_dump(mode="json", exclude={"presets"}) | {"presets": spec.presets}, name)
            out.append(f"--preset {name} (projected {human(plan_sweep(small, resources, rates=rates).wall_s)})")
        except DmeError as e:  # a preset that does not apply here (e.g. its data is missing) is not proposed
            log.info("preset %s not proposed: %s", name, e)
    return " or ".join(out) or None


def _sampled(spec: SweepSpec) -> list[dict]:
    """An Optuna search's trials, priced as its grid's first ``num_samples`` combinations (a sampled value of a
    continuous factor such as ``lr`` does not change the cost)."""
    grid = spec.grid()
    return [grid[i % len(grid)] for i in range(spec.search.num_samples)]


def _trial_name(f: dict, varying: list[str]) -> str:
    """The factors that tell this trial from the others of its grid, e.g. ``photos · label · random · 300``."""
    def short(k: str) -> str:
        v = f[k]
        return os.path.basename(str(v)) if k == "pool" else str(v)

    return " · ".join(short(k) for k in varying) or str(f["strategy"])


def format_plan(plan: SweepPlan, preset: str | None = None, limit_s: float | None = None) -> str:
    """The plan as ``dme sweep --dry-run`` prints it."""
    head = f"sweep {plan.name!r}" + (f" (preset {preset})" if preset else "")
    lines = [f"{head}: {len(plan.trials)} trials on {plan.cluster.label}, {plan.concurrency} at a time "
             f"({plan.cpus_per_trial:g} CPU{f' + {plan.gpus_per_trial:g} GPU' if plan.gpus_per_trial else ''} each); "
             f"priced on {plan.device.label}"]
    lines.append("")
    gpu = plan.gpus_per_trial > 0
    lines.append(f"  {'step':<58} {'projected':>10} {'CPU-h':>7}{' GPU-h' if gpu else ''}  phases")
    lines.append(f"  {'sweep fixed costs (Ray, MLflow, Serve app, report)':<58} {human(plan.fixed_s):>10}")

    def row(s: PlannedStep, cpus: float, gpus: float) -> str:
        hours = s.seconds * (plan.trials_factor if s.kind == "trial" else 1.0) / 3600
        g = f" {hours * gpus:>5.2f}" if gpu else ""
        return f"  {s.name[:58]:<58} {human(s.seconds):>10} {hours * cpus:>7.3f}{g}  {_phases(s.corrected)}"

    for s in plan.serial:
        lines.append(row(s, 1.0, 1.0 if plan.device.gpu else 0.0))
    trials = plan.trials
    shown = trials if len(trials) <= 40 else trials[:20] + trials[-5:]
    for i, s in enumerate(shown):
        if len(trials) > 40 and i == 20:
            lines.append(f"  ... {len(trials) - 25} more trials ...")
        lines.append(row(s, plan.cpus_per_trial, plan.gpus_per_trial))
    total_trials = sum(s.seconds for s in trials) * plan.trials_factor
    lines.append("")
    lines.append(f"  trials: {human(total_trials)} of work in sum, {human(plan.trials_wall_s)} of wall time "
                 f"{plan.concurrency} at a time")
    lines.append(f"  total: {human(plan.wall_s)} wall, {plan.cpu_hours:.2f} CPU-hours"
                 + (f", {plan.gpu_hours:.2f} GPU-hours" if plan.gpus_per_trial else "")
                 + f"; would finish at {plan.finish():%Y-%m-%d %H:%M} if started now")
    if limit_s is not None:
        lines.append(f"  cost limit: {human(limit_s)} ({'within' if plan.wall_s <= limit_s else 'OVER: refused'})")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _phases(p: Projection) -> str:
    return ", ".join(f"{k} {human(v)}" for k, v in sorted(p.phases.items(), key=lambda kv: -kv[1]) if v >= 0.05)
