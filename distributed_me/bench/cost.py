"""``dme bench cost``: how close the cost model's projections come to the clock, against a FLOPs-only baseline.

In one run, on the embedded victim (digits, CNN32 at 16 px) from its in-distribution pool: in-process extractions of
the default strategy at three budgets and of every other registered strategy without a preparation step at one, each
projected before it runs (throughput measured here, :mod:`distributed_me.cost`)
and then timed, phase by phase. The baseline is what a FLOPs count alone would say: every net's work at this
machine's measured float64 matmul rate (3x forward FLOPs per trained sample), no per-step cost, no measurement of
the net. Reported: actual / projected per run and phase, for ours and for the baseline (1.0 is perfect; within 0.5-2
is the issue's bar), the calibration's own cost (first measurement of a net vs a cached read), a table and a PNG
(projected vs actual, log-log).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from ..attacks import ATTACKS
from ..cost.plan import PROJECTED_RAW
from ..cost.rates import Device, NetRate, Rates
from ..cost.work import Net
from ..data import load_pool
from ..extraction import AttackSpec
from ..runner import attack_in_process, evaluator_for
from ..victims import load_victim
from . import BENCHES, print_table

#: budgets of the first strategy (the default one, AttackSpec's); every other registered strategy runs at the middle
#: budget with its default options (those with a preparation step are left out: their cost is a reference set's)
BUDGETS = (300, 1000, 3000)
PHASES = ("selection", "query", "train", "eval", "total")


class FlopsOnlyRates(Rates):
    """The baseline: FLOPs at the matmul rate, nothing measured per net, no per-step cost."""

    def net(self, net: Net) -> NetRate:
        from ..cost.rates import forward_flops

        f = forward_flops(net)
        rate = self.matmul_flops_per_s
        return NetRate(f, 0.0, 3 * f / rate, 0.0, f / rate, 0.0, measured=False)


def _calibration_cost(tmp: Path) -> dict:
    net = Net("cnn32", 32, 3, 10)
    t0 = time.perf_counter()
    Rates(Device.here(), path=tmp / "rates.json").net(net)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    Rates(Device.here(), path=tmp / "rates.json").net(net)
    return {"first_measurement_s": first, "cached_read_s": time.perf_counter() - t0}


@BENCHES.register("cost")
def bench_cost(args: argparse.Namespace) -> dict:
    import tempfile

    from ..cost.plan import cost_job, extraction_work, project

    quick = getattr(args, "quick", False)
    victim = load_victim(None)
    pool = load_pool("digits-unseen")
    epochs = args.epochs or (4 if quick else 10)
    default = AttackSpec().strategy
    cases = [(default, b) for b in BUDGETS] + [(n, BUDGETS[1]) for n in ATTACKS.names()
                                                if n != default and not ATTACKS.get(n).prepares()]
    cases = cases[:3] if quick else cases
    attack_in_process(AttackSpec(budget=50, arch="cnn32", epochs=1), victim=victim, pool=pool, log_mlflow=False)
    baseline_rates = FlopsOnlyRates(Device.here(), calibrate=False)
    net = Net(victim.meta.arch, victim.meta.img_size, victim.meta.in_chans, victim.meta.num_classes)
    test_size = len(evaluator_for(victim).images)
    rows, points = [], []
    for strategy, budget in cases:
        spec = AttackSpec(strategy=strategy, budget=budget, arch="cnn32", epochs=epochs, adv_eval_samples=200)
        result = attack_in_process(spec, victim=victim, pool=pool, log_mlflow=False, cost_limit=False)
        m = result.metrics()
        job = cost_job(spec, victim.input_shape, 10, pool, net)
        base = project(extraction_work(spec, job, test_size, policy="probabilities"), baseline_rates)
        base_phases = {**base.phases, "total": base.total}
        for phase in PHASES:
            projected = m.get(f"{PROJECTED_RAW}{phase}", 0.0)
            actual = m.get(f"seconds_{phase}", 0.0)
            if projected < 0.05 and actual < 0.05:
                continue
            row = {"strategy": strategy, "budget": budget, "phase": phase, "actual_s": actual,
                   "projected_s": projected, "ours_ratio": actual / max(projected, 1e-9),
                   "baseline_s": base_phases.get(phase, 0.0),
                   "baseline_ratio": actual / max(base_phases.get(phase, 0.0), 1e-9)}
            rows.append(row)
            if phase == "total":
                points.append(row)
    print_table(rows, ["strategy", "budget", "phase", "actual_s", "projected_s", "ours_ratio", "baseline_s",
                       "baseline_ratio"], "actual / projected (1.0 = exact), ours vs a FLOPs-only baseline")

    def spread(key: str) -> dict:
        r = [p[key] for p in points]
        logs = [abs(math.log(x)) for x in r]
        return {"median_ratio": statistics.median(r), "worst_factor": math.exp(max(logs)),
                "within_2x": sum(x <= math.log(2) for x in logs) / len(logs)}

    summary = {"ours": spread("ours_ratio"), "baseline": spread("baseline_ratio")}
    with tempfile.TemporaryDirectory() as tmp:
        summary["calibration"] = _calibration_cost(Path(tmp))
    print_table([{"model": k, **v} for k, v in summary.items() if k != "calibration"],
                ["model", "median_ratio", "worst_factor", "within_2x"], "totals over the runs")
    print(f"calibration of one net: {summary['calibration']['first_measurement_s']:.2f} s the first time, "
          f"{summary['calibration']['cached_read_s'] * 1000:.1f} ms from the cache")
    plot = _plot(points, Path(args.out) / "cost.png")
    print(f"plot: {plot}")
    return {"rows": rows, "summary": summary, "epochs": epochs, "plot": str(plot)}


def _plot(points: list[dict], path: Path) -> Path:
    from ..report.projection import plot_projected_vs_actual

    path.parent.mkdir(parents=True, exist_ok=True)
    actual = [p["actual_s"] for p in points]
    return plot_projected_vs_actual({"ours (measured rates)": ([p["projected_s"] for p in points], actual),
                                     "baseline (FLOPs at the matmul rate)": ([p["baseline_s"] for p in points],
                                                                             actual)},
                                    path, "projection vs the clock, per run", "projected seconds (total per run)",
                                    None)
