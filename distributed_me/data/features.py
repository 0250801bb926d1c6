"""Per-sample features of a whole pool, as Parquet keyed by sample id (core; no Ray).

A strategy's preparation step (:meth:`~distributed_me.attacks.base.QueryStrategy.prepare`) maps a pool through some
featurizer once — SwiftTheft's summed reference-model outputs (paper 003 §III.2), say — and every trial reads the
file back in pool order. Keyed by id rather than by row position, so a pass that writes rows in any order (Ray Data's
actor pool does) reads back right, and a file computed for another pool is refused instead of silently misaligned.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DmeError
from .base import Pool

log = logging.getLogger(__name__)


def write_features(path: str | Path, ids: np.ndarray, features: np.ndarray) -> Path:
    """Features as Parquet keyed by sample id (``id`` int64, ``feature`` fixed-size list of float32), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = np.ascontiguousarray(features, dtype=np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    pq.write_table(pa.table({"id": np.asarray(ids, dtype=np.int64), "feature": col}), tmp)
    os.replace(tmp, path)
    return path


def features_table_to_numpy(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids = table.column("id").to_numpy()
    col = table.column("feature").combine_chunks()
    width = col.type.list_size
    return ids, col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def read_features(path: str | Path, pool: Pool) -> np.ndarray:
    """The feature matrix of ``pool`` in pool order, from a features file keyed by id (rows in any order)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DmeError(f"no features file {path}; compute it with `dme pool features POOL --strategy NAME`")
    ids, feats = features_table_to_numpy(pq.read_table(path))
    want = pool.sample_ids()
    order = np.argsort(ids)
    pos = np.searchsorted(ids, want, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    found = ids[order[pos]] == want
    if not found.all():
        missing = want[~found]
        raise DmeError(f"{path} has no features for {len(missing)} of the pool's {len(want)} samples (e.g. id "
                       f"{int(missing[0])}): it was computed for another pool; recompute it")
    return feats[order[pos]]


def features_loop(featurizer: Any, pool: Pool, batch_size: int = 512, progress: bool = False) -> np.ndarray:
    """The plain single-process pass: ``featurizer.features(images)`` over every batch of the pool, in pool order
    (the baseline of ``dme bench selection``, and the default ``map_pool`` of a preparation step)."""
    from tqdm.auto import tqdm

    out: np.ndarray | None = None
    bar = tqdm(total=len(pool), desc="features", unit="img", disable=not progress)
    for idx, images in pool.iter_batches(batch_size):
        feats = np.asarray(featurizer.features(images), dtype=np.float32)
        if out is None:
            out = np.empty((len(pool), feats.shape[1]), dtype=np.float32)
        out[idx] = feats
        bar.update(len(idx))
    bar.close()
    if out is None:
        raise DmeError(f"pool {pool.name!r} is empty: nothing to map")
    return out
