"""Benchmarks (not tests): ``dme bench NAME`` measures speed, memory and quality side by side in one run, prints a
table with ratios, and writes ``bench-results/NAME.json`` (plus a PNG where results are compared)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import resource
import time
from pathlib import Path

import torch

from ..registry import Registry

log = logging.getLogger(__name__)

BENCHES: Registry = Registry("benchmark")
_MODULES = ("cost", "extraction", "mlflow_ui", "ownership", "scale", "selection", "serve", "serve_defenses", "sweep")


def load_benches() -> None:
    """Import every bench module, which registers its benches (idempotent)."""
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def run_bench(name: str, args: argparse.Namespace) -> dict:
    load_benches()
    fn = BENCHES.get(name)
    out = Path(args.out)
    # the .json file itself, or its folder; the bench's other files (plots, screenshots) go beside the .json
    path = out if out.suffix == ".json" else out / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    args.out = str(path.parent)
    t0 = time.perf_counter()
    result = fn(args)
    result["meta"] = environment() | {"wall_seconds": time.perf_counter() - t0}
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return result


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
