"""``dme bench selection``: SwiftTheft's selection against ActiveThief's k-center greedy, and the feature pass.

In one run, side by side:

(A) Selection time and memory vs pool size N (10k, 50k, 200k, 1.28M) at budgets 4k and 10k, for
:func:`~distributed_me.attacks.selection.swifttheft_select` (500 seeds, 500 per iteration, the paper's setting) and
:func:`~distributed_me.attacks.selection.kcenter_greedy` (the same 500 random seeds as ``already``, then
``budget - 500`` picks). The features are synthetic stand-ins for SwiftTheft's summed reference-model outputs: float32
(N, :data:`FEATURE_DIM`) rows ``m * softmax(2 * g)``, ``g`` standard Gaussian, ``m = 8`` models, seeded. Each
selection call is timed untraced; its memory is measured in a separate call under ``tracemalloc`` (every Python and
NumPy allocation made *during* the call, so the feature matrix, allocated before, is not in it: the figure is the
extra memory beyond the features, reported next to the feature matrix's size).

SwiftTheft always runs in full. k-center costs one O(N * D) min-distance update per pick after an O(N * 500 * D)
initialisation, so at large N it is capped (:data:`KCENTER_CAP_S`, 60 s; 15 s with ``--quick``): the first picks of
one real call are timed and the total is extrapolated linearly in the number of picks (rows marked
``kc_extrapolated`` with the picks measured). The first ``k`` picks of a call are exactly the first ``k`` of a longer
call (the greedy is deterministic), which is asserted on a small case, as is that continuing in steps with a growing
``already`` gives the same picks.

(B) Feature-extraction images/s over the same Parquet shards of the shared 20k ImageNet 64x64 pool: the plain
single-process loop (:func:`~distributed_me.attacks.reference.features_loop`, 2 torch threads) vs the Ray Data pass
(:func:`~distributed_me.pools.features.ray_feature_pass`, 2 actors on a private 2-CPU cluster), with a check that
both give the same feature matrix. The reference set (4 CNN32 models, 1 epoch, 2000 images, 32 px) is trained only to
have real networks to run: its accuracy is irrelevant to throughput. Ray runs last so that (A) is undisturbed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import BENCHES, peak_rss_mb, print_table

log = logging.getLogger(__name__)

#: Width of the synthetic feature rows. 10 by default; 200 reproduces the real setting of our pool (SwiftTheft's
#: feature is one score per reference class, and the shared ImageNet64 pool has 200 classes) at ~20x the time and a
#: 1 GB feature matrix at N = 1.28M.
FEATURE_DIM = 10
N_MODELS = 8  # m: the synthetic rows sum m softmax outputs (paper 003 eq. 3)
POOL_SIZES = (10_000, 50_000, 200_000, 1_280_000)
BUDGETS = (4000, 10000)
N_SEED = 500
K_PER_ITER = 500
KCENTER_CAP_S = 60.0
KCENTER_CAP_QUICK_S = 15.0
PROBE_PICKS = 32
GOAL_SPEEDUP = 100.0  # SwiftTheft >= 100x faster than k-center at N = 50k, budget 4k
GOAL_CELL = (50_000, 4000)
SLOPE_TOL = 0.15  # SwiftTheft's log-log slope of time vs N within 1 +- this


def synthetic_features(n: int, d: int = FEATURE_DIM, m: int = N_MODELS, seed: int = 0) -> np.ndarray:
    """float32 (n, d): ``m * softmax(2 g)`` per row with ``g ~ N(0, I)``, generated in chunks (seeded)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        z = rng.standard_normal((min(n, s + 65536) - s, d), dtype=np.float32)
        z *= 2.0
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z *= m / z.sum(axis=1, keepdims=True)
        out[s : s + len(z)] = z
    return out


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def _best_of(fn: Callable[[], Any], budget_s: float = 1.0, max_runs: int = 3) -> tuple[float, Any]:
    """Min time over up to ``max_runs`` calls, stopping once ``budget_s`` has been spent (big calls run once)."""
    best, spent, r = math.inf, 0.0, None
    for _ in range(max_runs):
        t, r = _timed(fn)
        best, spent = min(best, t), spent + t
        if spent >= budget_s:
            break
    return best, r


def _traced_extra_mb(fn: Callable[[], Any]) -> float:
    """Peak MB allocated (Python + NumPy buffers) during ``fn()``; memory allocated before the call is not counted."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1e6


def check_kcenter_stepwise() -> dict:
    """The extrapolation times a prefix of one real call: assert (cheaply) that a short call's picks are the first
    picks of a longer one, and that continuing in steps with a growing ``already`` gives the same picks too."""
    from ..attacks.selection import kcenter_greedy

    x = synthetic_features(3000, seed=1)
    seeds = np.random.default_rng(1).choice(len(x), size=50, replace=False)
    full = kcenter_greedy(x, seeds, 90)
    prefix = kcenter_greedy(x, seeds, 25)
    assert np.array_equal(prefix, full[:25]), "k-center: a short call is not a prefix of a longer call"
    steps, already = [], seeds
    for k in (30, 30, 30):
        got = kcenter_greedy(x, already, k)
        steps.append(got)
        already = np.concatenate([already, got])
    stepwise = np.concatenate(steps)
    assert np.array_equal(stepwise, full), "k-center: stepwise calls with growing `already` differ from one call"
    return {"n": len(x), "seeds": len(seeds), "picks": len(full), "prefix_equal": True, "stepwise_equal": True}


def time_kcenter(x: np.ndarray, seeds: np.ndarray, k_total: int, cap_s: float) -> dict:
    """Seconds of ``kcenter_greedy(x, seeds, k_total)``: measured in full when it fits in ``cap_s``, else the first
    ``k`` picks of one real call are timed and the rest extrapolated at the measured cost per pick.

    Two probes first: ``k = 1`` (≈ the O(N·|seeds|·D) initialisation) and ``k = PROBE_PICKS`` (gives the cost per
    pick); then one call as long as the remaining cap allows. Cost per pick = difference of two calls / difference
    of their picks, so the initialisation is not spread over the picks."""
    from ..attacks.selection import kcenter_greedy

    def run(k: int) -> float:
        return _timed(lambda: kcenter_greedy(x, seeds, k))[0]

    t_init = run(1)
    spent = t_init
    if k_total == 1:
        return {"seconds": t_init, "extrapolated": False, "picks_measured": 1, "init_s": t_init,
                "per_pick_ms": float("nan"), "measure_s": spent}
    k_probe = min(k_total, PROBE_PICKS)
    t_probe = run(k_probe)
    spent += t_probe
    per_pick = max((t_probe - t_init) / (k_probe - 1), 1e-9)
    if k_probe == k_total:
        k_m, t_m = k_probe, t_probe
    else:
        predicted_full = t_init + (k_total - 1) * per_pick
        if spent + predicted_full <= cap_s:
            k_m = k_total
        else:
            k_m = int((cap_s - spent - t_init) / per_pick) + 1
            k_m = min(k_total, k_m)
        if k_m > k_probe:
            t_m = run(k_m)
            spent += t_m
        else:
            k_m, t_m = k_probe, t_probe
    if k_m == k_total:
        # small calls: best of a few (noise), big ones measured once
        if t_m < 0.5:
            t_m = min(t_m, *(run(k_total) for _ in range(2)))
        return {"seconds": t_m, "extrapolated": False, "picks_measured": k_m, "init_s": t_init,
                "per_pick_ms": 1e3 * (t_m - t_init) / (k_m - 1), "measure_s": spent}
    per_pick = (t_m - t_init) / (k_m - 1)
    return {"seconds": t_m + (k_total - k_m) * per_pick, "extrapolated": True, "picks_measured": k_m,
            "init_s": t_init, "per_pick_ms": 1e3 * per_pick, "measure_s": spent}


def loglog_slope(ns: list[int], secs: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(secs), 1)[0])


def bench_selection_scaling(quick: bool) -> tuple[list[dict], dict, dict]:
    from ..attacks.selection import kcenter_greedy, swifttheft_select

    cap = KCENTER_CAP_QUICK_S if quick else KCENTER_CAP_S
    check = check_kcenter_stepwise()
    print(f"k-center prefix/stepwise check on N={check['n']}: same picks (extrapolation times the real algorithm)")
    print(f"synthetic features: float32 (N, {FEATURE_DIM}), m={N_MODELS} summed softmax rows; k-center cap "
          f"{cap:.0f} s per cell")
    x_all = synthetic_features(max(POOL_SIZES))
    rows: list[dict] = []
    for n in POOL_SIZES:
        x = x_all[:n]  # a C-contiguous view: no copy
        seeds = np.random.default_rng(0).choice(n, size=N_SEED, replace=False)  # == SwiftTheft's seeds for rng=0
        for budget in BUDGETS:
            def swift(x: np.ndarray = x, budget: int = budget) -> np.ndarray:
                return swifttheft_select(x, budget, k_per_iter=K_PER_ITER, n_seed=N_SEED, rng=0)

            t_swift, picked = _best_of(swift)
            assert len(np.unique(picked)) == budget and np.array_equal(np.sort(picked[:N_SEED]), np.sort(seeds))
            swift_mb = _traced_extra_mb(swift)
            kc = time_kcenter(x, seeds, budget - N_SEED, cap)
            # init + one update: the peak
            kc_mb = _traced_extra_mb(lambda x=x, seeds=seeds: kcenter_greedy(x, seeds, 2))
            row = {
                "N": n, "budget": budget, "feat_mb": x.nbytes / 1e6,
                "swift_s": t_swift, "swift_s_per_Mrow": t_swift / (n / 1e6), "swift_extra_mb": swift_mb,
                "swift_extra_B_per_row": swift_mb * 1e6 / n,
                "kc_s": kc["seconds"], "kc_extrapolated": kc["extrapolated"],
                "kc_picks": f"{kc['picks_measured']}/{budget - N_SEED}", "kc_picks_measured": kc["picks_measured"],
                "kc_init_s": kc["init_s"], "kc_ms_per_pick": kc["per_pick_ms"], "kc_measure_s": kc["measure_s"],
                "kc_extra_mb": kc_mb, "kc_extra_B_per_row": kc_mb * 1e6 / n,
                "speedup": kc["seconds"] / t_swift,
            }
            rows.append(row)
            print(f"  N={n:>9,} budget={budget:>5}: swifttheft {t_swift:8.3f}s  k-center {kc['seconds']:9.2f}s"
                  f"{' (extrapolated from ' + str(kc['picks_measured']) + ' picks)' if kc['extrapolated'] else ''}"
                  f"  x{row['speedup']:.0f}", flush=True)
    del x_all

    slopes = []
    for budget in BUDGETS:
        sub = [r for r in rows if r["budget"] == budget]
        ns = [r["N"] for r in sub]
        sp = [r["swift_s_per_Mrow"] for r in sub]
        slopes.append({"method": "least_likely", "budget": budget,
                       "loglog_slope": loglog_slope(ns, [r["swift_s"] for r in sub]),
                       "s_per_Mrow_min": min(sp), "s_per_Mrow_max": max(sp), "max_over_min": max(sp) / min(sp)})
        slopes[-1]["loglog_slope_N>=50k"] = loglog_slope(ns[1:], [r["swift_s"] for r in sub[1:]])
        kp = [r["kc_s"] / (r["N"] / 1e6) for r in sub]
        slopes.append({"method": "kcenter", "budget": budget,
                       "loglog_slope": loglog_slope(ns, [r["kc_s"] for r in sub]),
                       "loglog_slope_N>=50k": loglog_slope(ns[1:], [r["kc_s"] for r in sub[1:]]),
                       "s_per_Mrow_min": min(kp), "s_per_Mrow_max": max(kp), "max_over_min": max(kp) / min(kp)})

    cell = next(r for r in rows if (r["N"], r["budget"]) == GOAL_CELL)
    sw_slopes = [s["loglog_slope"] for s in slopes if s["method"] == "least_likely"]
    big = [r for r in rows if r["N"] >= 200_000]
    mem_ratio = max(r["swift_extra_B_per_row"] for r in big) / min(r["swift_extra_B_per_row"] for r in big)
    goals = {
        "speedup_50k_4k": {"goal": f">= {GOAL_SPEEDUP:.0f}x faster than k-center at N=50k, budget 4k",
                           "value": cell["speedup"], "kcenter_extrapolated": cell["kc_extrapolated"],
                           "pass": cell["speedup"] >= GOAL_SPEEDUP},
        "swifttheft_linear": {"goal": f"SwiftTheft log-log slope of time vs N within 1 +- {SLOPE_TOL}",
                              "value": sw_slopes, "pass": all(abs(s - 1) <= SLOPE_TOL for s in sw_slopes)},
        "swifttheft_memory_per_row": {"goal": "SwiftTheft extra memory per pool row flat for N >= 200k "
                                              "(max/min <= 1.25)", "value": mem_ratio, "pass": mem_ratio <= 1.25},
    }
    return rows, {"slopes": slopes, "kcenter_check": check, "kcenter_cap_s": cap}, goals


def bench_features(data_dir: Path, quick: bool) -> dict:
    import torch

    from ..attacks.reference import ReferenceSpec, features_loop, read_features, train_reference_set
    from ..data import ArrayPool, ParquetPool, load_pool, write_pool_shards
    from ..pools.features import ray_feature_pass
    from ..serving.runtime import init_ray, shutdown

    torch.set_num_threads(2)
    pool = load_pool(str(data_dir / "pool_imagenet64_20k.npz"))
    if quick:
        n = 2000
        pool = ArrayPool(pool.get(np.arange(n)), name=f"{pool.name}[:{n}]",
                         labels=np.asarray(pool.labels)[:n])
    with tempfile.TemporaryDirectory(prefix="dme-bench-selection-") as tmp:
        tmp = Path(tmp)
        # 5000 rows per shard; fewer for --quick so that both Ray actors get shards (one block per file)
        rows_per_shard = min(5000, math.ceil(len(pool) / 4))
        t_build, manifest = _timed(lambda: write_pool_shards(pool, tmp / "pool", rows_per_shard=rows_per_shard))
        ppool = ParquetPool(tmp / "pool")
        spec = ReferenceSpec(n_models=4, arch="cnn32", epochs=1, size=32, max_images=2000)
        t_ref, ref = _timed(lambda: train_reference_set(spec, pool))
        ref.features(pool.get(np.arange(8)))  # models to device, first-call overhead out of the timing
        t_loop, f_loop = _timed(lambda: features_loop(ref, ppool, batch_size=512))
        try:
            init_ray(num_cpus=2)
            res = ray_feature_pass(ref.factory(), ppool, out=tmp / "f.parquet", actors=2)
            f_ray = read_features(res["path"], ppool)
        finally:
            shutdown()
        diff = float(np.abs(f_ray - f_loop).max())
        # Ray actors run 1 torch thread each, the loop 2: recompute a slice at 1 thread to separate float rounding
        # of the thread count (conv reductions split differently) from a real mismatch (wrong rows, ids, order)
        m = min(1024, len(ppool))
        torch.set_num_threads(1)
        try:
            f_one = ref.features(ppool.get(np.arange(m)))
        finally:
            torch.set_num_threads(2)
        diff_1t = float(np.abs(f_ray[:m] - f_one).max())
        row = {
            "images": len(ppool), "encoding": manifest["encoding"], "shards": len(manifest["shards"]),
            "feature_dim": int(f_loop.shape[1]), "ref_models": spec.n_models, "build_s": t_build,
            "ref_train_s": t_ref, "loop_s": t_loop, "loop_img_s": len(ppool) / t_loop, "ray_s": res["seconds"],
            "ray_img_s": res["images_per_s"], "ray_over_loop": res["images_per_s"] / (len(ppool) / t_loop),
            "equal": bool(np.allclose(f_ray, f_loop, rtol=1e-4, atol=1e-4)), "max_abs_diff": diff,
            "max_feature": float(np.abs(f_loop).max()),
            "argmax_agree": float((f_ray.argmax(axis=1) == f_loop.argmax(axis=1)).mean()),
            "same_threads_rows": m, "same_threads_max_abs_diff": diff_1t, "rows_per_shard": rows_per_shard,
            "peak_rss_mb": peak_rss_mb(),
        }
    return row


@BENCHES.register("selection")
def bench_selection(args: argparse.Namespace) -> dict:
    from .extraction import shared_data_dir

    quick = getattr(args, "quick", False)
    data = shared_data_dir(args.data_dir)

    rows, extra, goals = bench_selection_scaling(quick)
    cols = ["N", "budget", "feat_mb", "swift_s", "swift_s_per_Mrow", "swift_extra_mb", "swift_extra_B_per_row",
            "kc_s", "kc_extrapolated", "kc_picks", "kc_ms_per_pick", "kc_extra_mb", "kc_extra_B_per_row", "speedup"]
    print_table(rows, cols, f"(A) selection time / extra memory vs pool size (D={FEATURE_DIM}; extra = traced peak "
                            "beyond the features; speedup = k-center s / SwiftTheft s)")
    print_table(extra["slopes"], ["method", "budget", "loglog_slope", "loglog_slope_N>=50k", "s_per_Mrow_min",
                                  "s_per_Mrow_max", "max_over_min"],
                "scaling: fitted log-log slope of time vs N, seconds per million rows")

    plot = _plot(rows, Path(args.out) / "selection.png")

    feat = bench_features(data, quick)
    print_table([feat], ["images", "encoding", "shards", "feature_dim", "build_s", "ref_train_s", "loop_s",
                         "loop_img_s", "ray_s", "ray_img_s", "ray_over_loop", "equal", "max_abs_diff", "argmax_agree",
                         "same_threads_max_abs_diff"],
                "(B) feature pass over the Parquet shards: plain loop (2 torch threads) vs Ray Data (2 actors)")
    print("note: this machine has 2 cores, so Ray Data cannot beat a 2-thread loop here (its time also includes "
          "actor start-up); the point of the Ray pass is that it streams shard by shard and scales out on a cluster. "
          "The reference models are trained 1 epoch only: their quality is irrelevant to throughput.")
    goals["features_equal"] = {"goal": "Ray Data features == 2-thread loop features up to float32 summation order "
                                       "(atol=rtol=1e-4)",
                               "value": feat["max_abs_diff"], "pass": feat["equal"]}
    goals["features_equal_same_threads"] = {
        "goal": f"Ray Data features == a 1-thread loop (as in the actors) on the first {feat['same_threads_rows']} "
                "rows (max |diff| <= 1e-6)",
        "value": feat["same_threads_max_abs_diff"], "pass": feat["same_threads_max_abs_diff"] <= 1e-6}

    print("\ngoals:")
    for g in goals.values():
        v = g["value"]
        shown = ", ".join(f"{s:.3f}" for s in v) if isinstance(v, list) else f"{v:.4g}"
        print(f"  {'PASS' if g['pass'] else 'FAIL'}  {g['goal']}: {shown}")
    return {"feature_dim": FEATURE_DIM, "n_models": N_MODELS, "n_seed": N_SEED, "k_per_iter": K_PER_ITER,
            "quick": quick, "selection": rows, **extra, "features": feat, "goals": goals, "plot": str(plot)}


def _plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"least_likely": "tab:blue", "kcenter": "tab:red"}
    styles = {BUDGETS[0]: "-", BUDGETS[1]: "--"}
    for budget in BUDGETS:
        sub = [r for r in rows if r["budget"] == budget]
        ns = [r["N"] for r in sub]
        a.plot(ns, [r["swift_s"] for r in sub], styles[budget], marker="o", color=colors["least_likely"],
               label=f"SwiftTheft, budget {budget}")
        a.plot(ns, [r["kc_s"] for r in sub], styles[budget], color=colors["kcenter"],
               label=f"k-center greedy, budget {budget}")
        for r in sub:  # hollow marker = extrapolated from the first picks
            a.plot(r["N"], r["kc_s"], "s", color=colors["kcenter"],
                   markerfacecolor="none" if r["kc_extrapolated"] else colors["kcenter"])
        b.plot(ns, [r["swift_extra_mb"] for r in sub], styles[budget], marker="o", color=colors["least_likely"],
               label=f"SwiftTheft, budget {budget}")
        b.plot(ns, [r["kc_extra_mb"] for r in sub], styles[budget], marker="s", color=colors["kcenter"],
               label=f"k-center, budget {budget}")
    b.plot([r["N"] for r in rows if r["budget"] == BUDGETS[0]],
           [r["feat_mb"] for r in rows if r["budget"] == BUDGETS[0]], ":", color="gray", label="feature matrix")
    a.set(xscale="log", yscale="log", xlabel="pool size N", ylabel="selection time (s)",
          title=f"selection time (D={FEATURE_DIM}; hollow = extrapolated)")
    b.set(xscale="log", yscale="log", xlabel="pool size N", ylabel="MB",
          title="peak memory beyond the features (tracemalloc)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
