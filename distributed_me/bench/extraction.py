"""``dme bench extraction``: random-query extraction of a CIFAR-10 CNN32 victim from the 64×64 natural-image pool.

In one run: victim accuracy; fidelity / accuracy / adversarial fidelity at budgets 1k, 2k, 4k (Adam, the MEBench
default LR); the four optimizers of MEBench Table 3 (paper 004 §3.3.1) side by side at 2k; wall time split; and the
trainer's achieved images/s against the physical limit of this machine (a bare forward/backward loop of the same
net), as a ratio.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch

from ..data import load_dataset, load_pool
from ..errors import DataNotFound
from ..extraction import AttackSpec, Evaluator, run_extraction
from ..models import create_model
from ..oracle import LocalOracle
from ..train import TrainConfig
from ..victims import load_bundle, train_victim, victim_test_split
from ..victims.store import cache_dir
from . import BENCHES, peak_rss_mb, print_table

log = logging.getLogger(__name__)


def shared_data_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("DME_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
    if not (d / "cifar10_train_10k.npz").is_file():
        raise DataNotFound(f"the shared benchmark data is not in {d} (expected cifar10_train_10k.npz, "
                           "cifar10_test_2k.npz, pool_imagenet64_20k.npz); pass --data-dir or set DME_SHARED_DATA")
    return d


def raw_train_throughput(arch: str, shape: tuple[int, int, int], num_classes: int, batch: int = 64,
                         steps: int = 20) -> float:
    """Images/s of a bare forward/backward/step loop: the ceiling for the trainer on this machine."""
    net = create_model(arch, num_classes, shape[0], shape[1])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.rand(batch, *shape), torch.randint(0, num_classes, (batch,))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


@BENCHES.register("extraction")
def bench_extraction(args: argparse.Namespace) -> dict:
    data = shared_data_dir(args.data_dir)
    quick = getattr(args, "quick", False)
    epochs = args.epochs or (3 if quick else 30)
    budgets = [250, 500] if quick else [1000, 2000, 4000]
    opt_budget = budgets[1]
    train_file = str(data / "cifar10_train_10k.npz")
    bundle = cache_dir() / "victims" / ("bench-cifar10-cnn32-quick" if quick else "bench-cifar10-cnn32")
    t0 = time.perf_counter()
    if (bundle / "victim.json").is_file():
        victim = load_bundle(bundle)
        victim_seconds = 0.0
    else:
        cfg = TrainConfig(epochs=2 if quick else 30, batch_size=128, optimizer="adam", lr=1e-3, augment=True,
                          hflip=True, seed=0)
        victim, _ = train_victim(train_file, "cnn32", bundle, cfg, name="bench-cifar10-cnn32", progress=True)
        victim_seconds = time.perf_counter() - t0
    ds = load_dataset(train_file, seed=victim.meta.split_seed)
    x_test, y_test = victim_test_split(victim, dataset=ds)
    evaluator = Evaluator(victim.predict_labels, x_test, y_test)
    pool = load_pool(str(data / "pool_imagenet64_20k.npz"))
    limit = raw_train_throughput("cnn32", victim.input_shape, victim.meta.num_classes)
    print(f"victim: CNN32 on CIFAR-10 (10k train), test accuracy {evaluator.victim_accuracy:.4f}; "
          f"trained in {victim_seconds:.0f}s (0 = cached); raw train limit {limit:.0f} img/s")

    runs: list[dict] = []
    plan = [("adam", b) for b in budgets] + [(o, opt_budget) for o in ("sgd", "adamw", "lion")]
    for optimizer, budget in plan:
        spec = AttackSpec(budget=budget, arch="cnn32", optimizer=optimizer, epochs=epochs, batch_size=64, seed=0,
                          adv_eval_samples=500 if not quick else 100)
        oracle = LocalOracle(victim, "probabilities", budget=budget)
        r = run_extraction(oracle, pool, spec, evaluator, progress=True)
        s = r.seconds
        achieved = budget * epochs / s["train"] if s["train"] else 0.0
        row = {"optimizer": optimizer, "budget": budget, **r.metrics(), "train_img_s": achieved,
               "vs_limit": achieved / limit, "peak_rss_mb": peak_rss_mb()}
        runs.append(row)
        print(f"  {optimizer:5s} budget {budget:5d}: fidelity {r.fidelity:.4f} accuracy {r.accuracy:.4f} "
              f"({s['total']:.0f}s)")
    cols = ["optimizer", "budget", "accuracy", "fidelity", "adversarial_fidelity", "queries_used", "seconds_selection",
            "seconds_query", "seconds_train", "seconds_eval", "seconds_total", "train_img_s", "vs_limit"]
    print_table([r for r in runs if r["optimizer"] == "adam"], cols, "fidelity vs budget (Adam)")
    print_table([r for r in runs if r["budget"] == opt_budget], cols, f"optimizers at budget {opt_budget}")
    plot = _plot(runs, budgets, opt_budget, Path(args.out) / "extraction.png")
    return {"victim_accuracy": evaluator.victim_accuracy, "victim_train_seconds": victim_seconds,
            "raw_train_img_s": limit, "epochs": epochs, "runs": runs, "plot": str(plot)}


def _plot(runs: list[dict], budgets: list[int], opt_budget: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    adam = [r for r in runs if r["optimizer"] == "adam"]
    for key in ("fidelity", "accuracy", "adversarial_fidelity"):
        a.plot([r["budget"] for r in adam], [r[key] for r in adam], marker="o", label=key)
    a.set(xlabel="query budget", ylabel="score", title="random queries, CNN32 piracy (Adam)", ylim=(0, 1))
    a.legend()
    opts = [r for r in runs if r["budget"] == opt_budget]
    b.bar([r["optimizer"] for r in opts], [r["fidelity"] for r in opts])
    b.set(ylabel="fidelity", title=f"optimizers at budget {opt_budget}", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
