"""A feature pass over a whole pool with Ray Data: the ``map_pool`` of a strategy's preparation step in a sweep.

``ray.data.read_parquet`` streams the pool's shards (``dme pool build``); ``map_batches`` runs a
:class:`~distributed_me.attacks.base.Featurizer` in an actor pool (each actor builds its own from a picklable factory,
once, on a GPU fraction when the cluster has GPUs — e.g. SwiftTheft's m reference models, paper 003 §III.2 "Feature
mapping process"); the driver streams the ``(id, feature)`` batches into one Parquet file keyed by sample id. Pools
that are not Parquet are fed as index ranges that each actor loads itself.

Actors ask for half a CPU each: with whole CPUs an actor pool as large as a small cluster left no CPU for Ray Data's
own read tasks and stalled silently (see STACK-NOTES); with fractions reads and actors share the cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..attacks import Featurizer
from ..data.base import Pool
from ..data.parquet import ParquetPool, decode_images

log = logging.getLogger(__name__)


class _FeatureActor:
    """Builds the featurizer once per actor; maps ``{id, image}`` (or ``{id}`` for non-Parquet pools) batches."""

    def __init__(self, factory: Callable[[], Featurizer], encoding: str | None, shape: list[int] | None,
                 pool: Pool | None, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.featurizer = factory()
        self.encoding, self.shape, self.pool = encoding, tuple(shape) if shape else None, pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.pool is None:
            images = decode_images(list(batch["image"]), self.encoding, self.shape)  # type: ignore[arg-type]
        else:
            images = self.pool.get(batch["id"])
        return {"id": batch["id"].astype(np.int64), "feature": self.featurizer.features(images)}


def ray_map_pool(actors: int | None = None, batch_size: int = 256,
                 progress: bool = False) -> Callable[[Callable[[], Featurizer], Pool, Path], dict]:
    """The ``map_pool`` of a :class:`~distributed_me.attacks.PrepareContext` on the running Ray cluster; ``actors``
    defaults to the cluster's CPUs (1 to 8)."""
    import ray

    def map_pool(factory: Callable[[], Featurizer], pool: Pool, out: Path) -> dict:
        n = actors or max(1, min(8, int(ray.cluster_resources().get("CPU", 1))))
        return ray_feature_pass(factory, pool, out, actors=n, batch_size=batch_size, progress=progress)

    return map_pool


def ray_feature_pass(factory: Callable[[], Featurizer], pool: Pool, out: str | Path, actors: int = 2,
                     batch_size: int = 256, progress: bool = False) -> dict:
    """Map every pool sample through ``factory()`` with Ray Data and write ``out``.
    Returns ``{"path", "images", "seconds", "images_per_s"}``. Needs ``ray.init`` done."""
    import ray

    t0 = time.perf_counter()
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    out = Path(out)
    if isinstance(pool, ParquetPool):
        ds = ray.data.read_parquet([str(f) for f in pool.files], columns=["id", "image"])
        ctor = (factory, pool.encoding, list(pool.image_shape), None)
    else:
        ids = pool.sample_ids()
        if not np.array_equal(ids, np.arange(len(pool))):
            raise ValueError("non-Parquet pools are addressed by index; their ids must be 0..N-1")
        ds = ray.data.range(len(pool)).map_batches(lambda b: {"id": b["id"]}, batch_format="numpy")
        ctor = (factory, None, None, pool)
    # small shards are read as one block, and one block feeds one actor: cut the stream into row-count blocks
    # (a streaming repartition, no shuffle) so that every actor of the pool gets work
    ds = ds.repartition(target_num_rows_per_block=max(batch_size, min(4096, -(-len(pool) // (4 * actors)))))
    res: dict[str, Any] = {"num_gpus": 1.0 / max(1, actors)} if gpus else {"num_cpus": 0.5}
    mapped = ds.map_batches(
        _FeatureActor, fn_constructor_args=(*ctor, 1), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), **res,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    writer: pq.ParquetWriter | None = None
    n = 0
    try:
        for batch in mapped.iter_batches(batch_size=4096, batch_format="numpy"):
            feats = np.ascontiguousarray(batch["feature"], dtype=np.float32)
            col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
            table = pa.table({"id": batch["id"].astype(np.int64), "feature": col})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            n += len(feats)
            if progress:
                log.info("features: %d / %d images", n, len(pool))
        if writer is not None:
            writer.close()
            writer = None
        if n != len(pool):
            raise RuntimeError(f"the Ray Data feature pass returned {n} rows for a pool of {len(pool)}")
        tmp.replace(out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    secs = time.perf_counter() - t0
    log.info("Ray Data feature pass: %d images in %.1f s (%.0f img/s, %d actors%s) -> %s", n, secs, n / secs,
             actors, ", GPU" if gpus else "", out)
    return {"path": str(out), "images": n, "seconds": secs, "images_per_s": n / secs}
