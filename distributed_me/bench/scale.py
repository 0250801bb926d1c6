"""``dme bench sweep-scale``: what the sweep harness costs per trial as a sweep grows, with trials that do nothing.

N trials of a trivial extraction (random queries, budget 2, ``tiny_cnn``, 1 epoch, 10 images of adversarial
fidelity) run through the whole harness — the sweep's Serve victim, one API key registered per trial, an MLflow child
run with its metrics and artifact, Tune scheduling two at a time — for N = 100 and N = 1,000 (``--quick``: 10 and
30). Each size runs as its own driver process, so its peak memory is its own. Measured per size:

- trials per second (wall time of ``run_sweep`` after Ray has started) and the per-trial wall time Tune saw;
- the driver's peak resident memory (``ru_maxrss``);
- the MLflow store's size (SQLite file plus artifacts);
- the harness's own steps inside a trial (the ``harness_*`` metrics of :mod:`distributed_me.sweep.trial`).

Growth from the small to the large size is reported as ratios per trial: flat (about 1) is linear, below 1 better.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..tracking import dme_home
from . import BENCHES, print_table

EXPERIMENT = "dme-bench-scale"


def _doc(n: int) -> dict[str, Any]:
    return {"name": f"scale-{n}", "experiment": EXPERIMENT, "pool": "photos", "pool_options": {"n": 200},
            "victims": [{"name": "digits", "source": "embedded"}], "policies": ["probabilities"],
            "attack": {"strategy": "random", "budget": 2, "arch": "tiny_cnn", "epochs": 1, "seed": list(range(n))},
            "adv_eval_samples": 10, "eval_every_epoch": False, "retries": 0,
            "resources": {"cpus_per_trial": 1}}


def _artifacts() -> Path:
    return dme_home() / "mlartifacts" / EXPERIMENT


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.exists() else 0.0


def child(n: int, out: Path) -> None:
    """One size, in this process (the driver): Ray, then the timed sweep; writes the measurements to ``out``."""
    from ..serving.runtime import init_ray, shutdown
    from ..sweep.runner import run_sweep
    from ..sweep.spec import parse_sweep
    from ..victims import load_victim

    load_victim(None)  # trained (or read from the cache) before any timing
    spec = parse_sweep(_doc(n))
    init_ray(num_cpus=os.cpu_count() or 1)
    try:
        t0 = time.perf_counter()
        result = run_sweep(spec)
        wall = time.perf_counter() - t0
    finally:
        shutdown()
    rows = result.rows
    steps: dict[str, float] = {}
    for r in rows:
        for k, v in (r.get("harness") or {}).items():
            steps[k] = steps.get(k, 0.0) + v / len(rows)
    store = Path(os.environ["DME_BENCH_STORE"])
    db_mb, artifacts_mb = (store / "mlflow.db").stat().st_size / 1e6, _dir_mb(_artifacts())
    out.write_text(json.dumps({
        "trials": n, "finished": len(rows), "failed": len(result.errors), "wall_seconds": wall,
        "trials_per_second": len(rows) / wall,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mlflow_db_mb": db_mb, "mlflow_artifacts_mb": artifacts_mb, "mlflow_store_mb": db_mb + artifacts_mb,
        "trial_wall_mean_s": sum(r["trial_wall_seconds"] or 0 for r in rows) / max(1, len(rows)),
        "extraction_mean_s": sum(r["seconds_total"] or 0 for r in rows) / max(1, len(rows)),
        "harness_mean_s": sum(r["seconds_harness"] or 0 for r in rows) / max(1, len(rows)),
        "harness_steps_mean_s": steps}))


@BENCHES.register("sweep-scale")
def bench_sweep_scale(args: argparse.Namespace) -> dict:
    sizes = (10, 30) if getattr(args, "quick", False) else (100, 1000)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dme-bench-scale-") as tmp:
        for n in sizes:
            store = Path(tmp) / f"store-{n}"
            store.mkdir()
            out = Path(tmp) / f"scale-{n}.json"
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
                   "DME_SWEEP_DIR": str(Path(tmp) / f"sweeps-{n}"), "DME_BENCH_STORE": str(store)}
            print(f"sweep of {n} trivial trials ...", flush=True)
            shutil.rmtree(_artifacts(), ignore_errors=True)  # a local store keeps artifacts under DME_HOME
            subprocess.run([sys.executable, "-m", "distributed_me.bench.scale", str(n), str(out)], env=env, check=True)
            runs.append(json.loads(out.read_text()))
    small, large = runs
    growth = {k: (large[k] / large["trials"]) / (small[k] / small["trials"])
              for k in ("wall_seconds", "mlflow_store_mb")}
    growth["driver_peak_rss_mb"] = large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"]
    growth["trial_wall_mean_s"] = large["trial_wall_mean_s"] / small["trial_wall_mean_s"]
    print_table(runs, ["trials", "finished", "failed", "wall_seconds", "trials_per_second", "trial_wall_mean_s",
                       "extraction_mean_s", "harness_mean_s", "driver_peak_rss_mb", "mlflow_store_mb"],
                "the whole harness, trivial trials, 2 at a time")
    print(f"\ngrowth {sizes[0]} -> {sizes[1]} trials (per trial; 1 = linear): wall {growth['wall_seconds']:.2f}x, "
          f"store {growth['mlflow_store_mb']:.2f}x, trial wall {growth['trial_wall_mean_s']:.2f}x; driver peak "
          f"memory {growth['driver_peak_rss_mb']:.2f}x for {sizes[1] // sizes[0]}x the trials")
    print("harness steps per trial (s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                      runs[-1]["harness_steps_mean_s"].items()))
    return {"runs": runs, "growth": growth}


if __name__ == "__main__":
    child(int(sys.argv[1]), Path(sys.argv[2]))
