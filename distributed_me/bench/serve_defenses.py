"""``dme bench serve-defenses``: what each serving-path defense costs the API, measured in one run against the plain
``probabilities`` API of the same victim.

One Serve application hosts the victim once per defense (each its own deployment of one replica running one torch
thread, the same batching): the stateless output policies (DP, quantization, noise, ModelGuard-W's linear program,
ModelGuard-S's codebook), the model-carrying ones (MAD, MAD-argmax, AM, CIP, DAWN with its evidence written per client;
their kits built first if missing) and the per-key detectors (PRADA, the OOD-rate monitor) on the undefended policy.
Every deployment gets the same load, round-robin so that drift on a shared machine hits all alike:
HTTP clients sending batches of 64 images at concurrency 1 (latency) and 4 (throughput). The table gives images/s,
p50 and p99 latency per request, and for each the ratio to plain probabilities, plus the latency the defense adds.

Load is bounded: loopback only (127.0.0.1), a private 2-CPU Ray cluster, every cell capped in requests and seconds.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import BENCHES, peak_rss_mb, print_table
from .serve import BATCH, KEY, _free_port, run_cell

log = logging.getLogger(__name__)

APP = "bench-defenses"
#: deployment name → (output policy, detectors); the first is the baseline every ratio is taken against
DEFENSES: dict[str, tuple[str, list[str]]] = {
    "plain": ("probabilities", []),
    "dp": ("dp", []),
    "quantize": ("quantize:5", []),
    "noise": ("noise:0.05", []),
    "mad": ("mad", []),
    "mad-argmax": ("mad-argmax", []),
    "am": ("am", []),
    "cip": ("cip", []),
    "modelguard-w": ("modelguard-w", []),
    "modelguard-s": ("modelguard-s", []),
    "dawn": ("dawn", []),
    "prada": ("probabilities", ["prada"]),
    "ood-rate": ("probabilities", ["ood-rate"]),
}


def _spec(source: str, query_log: str) -> dict:
    # thirteen deployments on a 2-CPU cluster: each asks for 0.08 CPU (a replica runs one torch thread whatever it asks
    # for); the load goes to one deployment at a time, so they do not compete
    victims = [{"name": name, "source": source, "output_policy": policy, "num_replicas": 1, "num_cpus": 0.08,
                "max_batch_size": 256, "batch_wait_timeout_s": 0.005, "max_ongoing_requests": 256,
                "detectors": [{"detector": d, "action": "flag"} for d in detectors]}
               for name, (policy, detectors) in DEFENSES.items()]
    return {"query_log": query_log, "clients": [{"key": KEY, "budget": None}], "victims": victims}


def _ensure_kits(source: str) -> dict[str, float]:
    from ..defenses import find_kit, parse_policy, train_kit
    from ..victims import load_victim

    victim = load_victim(source)
    built = {}
    for kit in sorted({k for p, _ in DEFENSES.values() for k in parse_policy(p).kits_needed()}):
        if find_kit(victim, kit) is None:
            log.info("building the %s kit for %s (once)", kit, source)
            built[kit] = train_kit(victim, kit, source=source).meta["build_seconds"]
    return built


@BENCHES.register("serve-defenses")
def bench_serve_defenses(args: argparse.Namespace) -> dict:
    from ..http_oracle import HttpOracle
    from ..serving.runtime import deploy, init_ray, shutdown
    from ..victims import load_victim

    quick = getattr(args, "quick", False)
    source = getattr(args, "victim", None) or "embedded"
    seconds, max_requests, rounds = (1.0, 100, 1) if quick else (3.0, 600, 3)
    victim = load_victim(source)
    x = np.random.default_rng(0).random((BATCH, *victim.input_shape), dtype=np.float32)
    built = _ensure_kits(source)
    log_dir = tempfile.mkdtemp(prefix="dme-bench-defenses-")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1/victims"
    cells: dict[tuple[str, int], list[dict]] = {}
    try:
        t0 = time.perf_counter()
        init_ray(num_cpus=2)
        deploy(_spec(source, str(Path(log_dir) / "querylog")), port=port, app_name=APP)
        startup = time.perf_counter() - t0
        for _ in range(rounds):  # round-robin over the defenses, so drift on the machine hits all of them alike
            for name in DEFENSES:
                for c in (1, 4):
                    r = run_cell(lambda name=name: HttpOracle(f"{url}/{name}", KEY), x, c, seconds, max_requests)
                    cells.setdefault((name, c), []).append(r)
    finally:
        shutdown()
        shutil.rmtree(log_dir, ignore_errors=True)

    rows = []
    for (name, c), runs in cells.items():
        lat = np.concatenate([r["latencies_ms"] for r in runs])
        done = sum(r["requests"] for r in runs)
        rows.append({"defense": name, "policy": DEFENSES[name][0], "detectors": ",".join(DEFENSES[name][1]) or "-",
                     "concurrency": c, "requests": done,
                     "images_per_s": done * BATCH / sum(r["seconds"] for r in runs),
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))})
    base = {r["concurrency"]: r for r in rows if r["defense"] == "plain"}
    for r in rows:
        b = base[r["concurrency"]]
        r["throughput_ratio"] = r["images_per_s"] / b["images_per_s"]
        r["added_p50_ms"] = r["p50_ms"] - b["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - b["p99_ms"]
    cols = ["defense", "concurrency", "requests", "images_per_s", "throughput_ratio", "p50_ms", "added_p50_ms",
            "p99_ms", "added_p99_ms"]
    print_table(rows, cols, f"each defense against plain probabilities, HTTP, batches of {BATCH}, one replica (one "
                            f"torch thread) each, {rounds} round(s) of {seconds:.0f} s per cell")
    plot = _plot(rows, Path(args.out) / "serve-defenses.png")
    return {"victim": source, "batch": BATCH, "cell_seconds": seconds, "cell_max_requests": max_requests,
            "rounds": rounds, "serve_startup_seconds": startup, "kits_built_seconds": built, "rows": rows,
            "peak_rss_mb": peak_rss_mb(), "plot": str(plot)}


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(dict.fromkeys(r["defense"] for r in rows))
    for ax, key, label in ((a1, "images_per_s", "images/s (concurrency 4)"), (a2, "p50_ms", "p50 ms (concurrency 1)")):
        c = 4 if key == "images_per_s" else 1
        vals = [next(r[key] for r in rows if r["defense"] == n and r["concurrency"] == c) for n in names]
        ax.bar(range(len(names)), vals, color=["tab:gray"] + ["tab:blue"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set(ylabel=label)
    fig.suptitle(f"serving-path defenses vs plain probabilities (batches of {BATCH})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
