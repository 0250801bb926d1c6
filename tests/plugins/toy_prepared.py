"""A toy query strategy with a once-per-sweep preparation step, outside the package: the lifecycle test's plugin.

``prepare`` maps the whole pool (mean brightness per image) through the context's ``map_pool`` and counts its own
calls in ``marker_dir``; trials get ``features=PATH`` and refuse to run without it, so a trial that had to prepare
for itself fails instead of passing quietly. ``extract`` queries the ``budget`` brightest images.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from distributed_me.attacks import Extraction, PrepareContext, QueryStrategy, Workbench, register_attack
from distributed_me.data.base import Pool
from distributed_me.data.features import read_features
from distributed_me.errors import DmeError
from distributed_me.oracle import Oracle


class Brightness:
    def features(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32)


@register_attack
class ToyPrepared(QueryStrategy):
    name = "toy-prepared"
    path_options = ("marker_dir",)

    marker_dir: str
    features: str | None = None

    def prepare(self, pool: Pool, ctx: PrepareContext) -> dict[str, Any]:
        marker = Path(self.marker_dir)
        marker.mkdir(parents=True, exist_ok=True)
        (marker / f"prepare-{os.getpid()}-{len(list(marker.iterdir()))}").touch()
        out = marker / f"brightness-{pool.name}.parquet"  # one per pool: a sweep over two pools prepares twice
        info = ctx.map_pool(functools.partial(Brightness), pool, out)
        ctx.record({"images": float(info["images"])}, {"toy": "yes"})
        return {"features": str(out)}

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        if self.features is None:
            raise DmeError("toy-prepared was not prepared: the sweep should have passed features=PATH")
        with bench.timer.phase("setup"):
            feats = read_features(self.features, pool)[:, 0]
        with bench.timer.phase("selection"):
            idx = np.sort(np.argsort(-feats, kind="stable")[:budget])
            images = bench.load(pool, idx)
        answer = bench.query(oracle, images)
        return Extraction(bench.train(images, answer), idx, bench.history)
