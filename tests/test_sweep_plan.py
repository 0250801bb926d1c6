"""A sweep's plan before it runs: trial count, sums of its parts, the schedule, corrections from recorded runs, and
the guard that refuses a sweep over the limit before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fixed_rates

from distributed_me.cost.history import DEVICE_TAG, learned_factors
from distributed_me.cost.plan import PROJECTED_RAW
from distributed_me.sweep.plan import (
    FIXED_DEFAULTS,
    ClusterResources,
    cost_key,
    format_plan,
    plan_sweep,
    stated_resources,
    trial_projections,
)
from distributed_me.sweep.spec import parse_sweep

ROOT = Path(__file__).resolve().parents[1]




def _spec(**over):
    doc = {"name": "plan", "pool": "photos", "victims": [{"name": "digits", "source": "embedded"}],
           "policies": ["probabilities", "label"],
           "attack": {"strategy": ["random", "activethief-kcenter"], "budget": [50, 100], "arch": "tiny_cnn",
                      "epochs": 2, "seed": [0, 1], "strategy_options": {"activethief-kcenter": {"n_seed": 20,
                                                                                               "per_round": 20}}},
           "adv_eval_samples": 20, "resources": {"cpus_per_trial": 1},
           "presets": {"cpu-small": {"attack": {"budget": 50}}}, **over}
    return parse_sweep(doc)


def test_the_plan_has_every_trial_and_sums_its_parts():
    spec = _spec()
    plan = plan_sweep(spec, ClusterResources(2, 0, "two CPUs"), rates=fixed_rates(), corrections=None)
    assert len(plan.trials) == len(spec.grid()) == 2 * 2 * 2 * 2
    assert plan.concurrency == 2
    for s in plan.trials:
        assert s.corrected.total == pytest.approx(sum(s.corrected.phases.values()))
        assert s.seconds == pytest.approx(s.corrected.total + s.extra_s)
    # the schedule by hand: each trial takes the first free of 2 slots, longest first
    slots = [0.0, 0.0]
    for s in sorted(plan.trials, key=lambda t: -t.corrected.total):
        slots.sort()
        slots[0] += s.seconds
    assert plan.trials_raw_s == pytest.approx(plan.fixed["deploy_background"] + max(slots))
    assert plan.wall_s == pytest.approx(plan.fixed_s + sum(s.seconds for s in plan.serial) + plan.trials_wall_s)
    assert plan.cpu_hours == pytest.approx(sum(s.seconds for s in plan.steps) / 3600)
    assert plan.gpu_hours == 0
    # more budget costs more; k-center costs more than random at the same budget (its rounds)
    by = {(s.factors["strategy"], s.factors["budget"], s.factors["policy"], s.factors["seed"]): s.seconds
          for s in plan.trials}
    assert by[("random", 100, "label", 0)] > by[("random", 50, "label", 0)]
    assert by[("activethief-kcenter", 100, "label", 0)] > by[("random", 100, "label", 0)]
    # trials differing only in seed cost the same, and share one projection key
    assert by[("random", 100, "label", 0)] == by[("random", 100, "label", 1)]
    assert len(trial_projections(plan)) == len({cost_key(s.factors) for s in plan.trials}) == 8


def test_concurrency_follows_resources_and_the_spec():
    spec = _spec(resources={"cpus_per_trial": 2, "max_concurrent_trials": 3})
    assert plan_sweep(spec, ClusterResources(16, 0, "x"), rates=fixed_rates()).concurrency == 3
    assert plan_sweep(spec, ClusterResources(5, 0, "x"), rates=fixed_rates()).concurrency == 2
    starved = plan_sweep(spec, ClusterResources(1, 0, "x"), rates=fixed_rates())
    assert any("no trial would ever start" in n for n in starved.notes)
    gpu = plan_sweep(_spec(resources={"cpus_per_trial": 1, "gpu_fraction": 0.25}),
                     stated_resources("a100", 2, 64))
    assert gpu.concurrency == 8 and gpu.device.profile == "a100" and gpu.gpu_hours > 0


def test_the_embedded_victim_is_priced_when_not_cached_yet(tmp_path, monkeypatch):
    monkeypatch.setenv("DME_HOME", str(tmp_path / "fresh-home"))  # a machine that never trained it
    plan = plan_sweep(_spec(), ClusterResources(2, 0, "x"), rates=fixed_rates())
    assert [s.name for s in plan.serial] == ["train victim digits"]
    assert plan.serial[0].seconds > 0


def test_recorded_runs_correct_the_projection(tmp_path, monkeypatch):
    """The calibration improves from recorded runs: runs of the same work (strategy, victim, piracy architecture) that
    took twice their raw projection in training double the next plan's training phase; other phases, other work and
    other devices are untouched, and a sweep's trials phase is corrected by that sweep's own earlier runs."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("recorded")
    work = {"strategy": "random", "victim": "digits", "arch": "tiny_cnn"}
    for raw, actual in [(10, 20), (5, 10), (4, 8.4), (1.0, 9.0)]:
        with mlflow.start_run(tags={DEVICE_TAG: "test"}):
            mlflow.log_params(work)
            mlflow.log_metrics({f"{PROJECTED_RAW}train": raw, "seconds_train": actual,
                                f"{PROJECTED_RAW}eval": 2.0, "seconds_eval": 2.0})
    for _ in range(3):  # other work: another architecture, three times slower than projected
        with mlflow.start_run(tags={DEVICE_TAG: "test"}):
            mlflow.log_params({**work, "arch": "cnn32"})
            mlflow.log_metrics({f"{PROJECTED_RAW}train": 1.0, "seconds_train": 3.0})
    with mlflow.start_run(tags={DEVICE_TAG: "another"}):
        mlflow.log_params(work)
        mlflow.log_metrics({f"{PROJECTED_RAW}train": 1.0, "seconds_train": 5.0})
    with mlflow.start_run(tags={DEVICE_TAG: "test", "dme.sweep": "plan"}):  # an earlier run of this sweep
        mlflow.log_metrics({"sweep_projected_raw_seconds_trials": 100.0, "sweep_seconds_trials": 130.0,
                            "sweep_seconds_ray": 4.0})
    corr = learned_factors("test")
    assert corr.runs == 7 and corr.trials_factor("plan") == pytest.approx(1.3) and corr.trials_factor("x") == 1.0
    assert corr.factors("random", "digits", "tiny_cnn") == {"train": pytest.approx(2.05),  # median of 2, 2, 2.1, 9
                                                            "eval": pytest.approx(1.0)}
    assert corr.factors("random", "digits", "cnn32") == {"train": pytest.approx(3.0)}
    assert corr.factors("random", "cifar10", "tiny_cnn") == {}  # never transferred to other work
    assert learned_factors("another").factors("random", "digits", "tiny_cnn") == {}  # one run is not enough
    spec = _spec()
    plain = plan_sweep(spec, ClusterResources(2, 0, "x"), rates=fixed_rates(), corrections=None)
    fixed = plan_sweep(spec, ClusterResources(2, 0, "x"), rates=fixed_rates(), corrections=corr)
    random_trial = lambda p: next(s for s in p.trials if s.factors["strategy"] == "random")  # noqa: E731
    kcenter = lambda p: next(s for s in p.trials if s.factors["strategy"] != "random")  # noqa: E731
    a, b = random_trial(plain), random_trial(fixed)
    assert b.corrected.phases["train"] == pytest.approx(2.05 * a.raw.phases["train"])
    assert b.corrected.phases["eval"] == pytest.approx(a.raw.phases["eval"])
    assert b.raw.total == pytest.approx(a.raw.total)  # the raw figure stays the cost model's alone
    assert kcenter(fixed).corrected.total == pytest.approx(kcenter(fixed).raw.total)
    assert fixed.trials_wall_s == pytest.approx(1.3 * fixed.trials_raw_s) and fixed.fixed["ray"] == 4.0


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path):
    import yaml

    spec = tmp_path / "s.yaml"
    doc = _spec().model_dump(mode="json", exclude={"paper"})
    spec.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "distributed_me.cli", "sweep", str(spec), "--dry-run"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "16 trials on this machine" in text and "2 at a time" in text
    assert sum(" · " in line and "s " in line for line in text.splitlines()) == 16
    assert "total:" in text and "CPU-hours" in text and "would finish at" in text
    assert "cost limit: 12.0 h (within)" in text
    assert "ray" not in out.stderr.lower()  # no cluster was started for a plan


def test_format_plan_names_the_device_and_the_limit():
    plan = plan_sweep(_spec(), ClusterResources(2, 0, "two CPUs"), rates=fixed_rates())
    text = format_plan(plan, "cpu-small", limit_s=1.0)
    assert "(preset cpu-small)" in text and "test device" in text and "OVER: refused" in text
    assert set(FIXED_DEFAULTS) >= {"ray", "mlflow", "deploy_background", "report"}


def test_the_limit_is_on_wall_time_where_the_sweep_runs():
    """The same sweep, refused on a 2-CPU machine and let through on a 32-CPU cluster: the limit is on the wall
    time the cluster's resources make of the work, never on the work's sum."""
    from distributed_me.cost.guard import CostLimitError, check_limit

    spec = _spec(resources={"cpus_per_trial": 1, "max_concurrent_trials": None})
    small = plan_sweep(spec, ClusterResources(2, 0, "two CPUs"), rates=fixed_rates())
    big = plan_sweep(spec, ClusterResources(32, 0, "a cluster"), rates=fixed_rates())
    assert big.concurrency == 16 and big.wall_s < small.wall_s
    limit = (big.wall_s + small.wall_s) / 2
    check_limit("sweep", big.wall_s, big.cluster.label, limit, None)
    with pytest.raises(CostLimitError):
        check_limit("sweep", small.wall_s, small.cluster.label, limit, None)
