"""Query pools as Parquet shards with stable sample ids: the at-scale pool format (``dme pool build``).

A pool directory holds ``shard-00000.parquet`` … and a ``manifest.json``. Each shard has the columns

* ``id`` int64: the sample's stable id, its index in the source pool (so features, selections and query logs keyed
  by id stay valid across rebuilds, reshardings and readers that see shards in any order);
* ``image`` binary: either the raw uint8 H×W×C bytes (``encoding: raw``) or the source's JPEG bytes unchanged
  (``encoding: jpeg``, for JPEG pools: no re-encoding loss, ~9× smaller);
* ``label`` int64 (only when the source carries labels; kept for analysis and as SwiftTheft reference data).

Why Parquet: Ray Data (``ray.data.read_parquet``) streams it shard by shard and row group by row group, and plain
pyarrow reads one row group at a time, so a 1.28 M-image ImageNet64 pool (15.7 GB of pixels) is never in memory
whole: :func:`write_pool_shards` holds one batch of decoded images, :class:`ParquetPool` the ``id``/``label``
columns (16 bytes per image) and a few cached row groups.

Shards are written into a temporary directory renamed into place at the end, so an interrupted build leaves no
half-written pool behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataNotFound, DmeError
from .base import Pool
from .npz import JpegNpzPool, decode_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dme-pool/1"
Encoding = Literal["raw", "jpeg"]


def is_parquet_pool(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def decode_images(blobs: list[bytes] | np.ndarray, encoding: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The ``image`` column of a batch → uint8 NHWC. Shared by :class:`ParquetPool` and the Ray Data feature pass."""
    h, w, c = shape
    out = np.empty((len(blobs), h, w, c), dtype=np.uint8)
    for j, blob in enumerate(blobs):
        if encoding == "raw":
            out[j] = np.frombuffer(blob, dtype=np.uint8).reshape(h, w, c)
        elif encoding == "jpeg":
            img = decode_image(bytes(blob))
            out[j] = img if c == 3 else img.mean(axis=-1, keepdims=True).astype(np.uint8)
        else:
            raise DmeError(f"unknown pool image encoding {encoding!r}; expected raw or jpeg")
    return out


def _schema(with_labels: bool, meta: dict) -> pa.Schema:
    fields = [pa.field("id", pa.int64()), pa.field("image", pa.binary())]
    if with_labels:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields, metadata={b"dme.pool": json.dumps(meta).encode()})


def write_pool_shards(
    pool: Pool,
    out: str | Path,
    rows_per_shard: int = 50_000,
    row_group_size: int = 1024,
    encoding: Literal["auto", "raw", "jpeg"] = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Convert any :class:`Pool` into Parquet shards under ``out``; returns the manifest.

    ``encoding="auto"`` keeps a JPEG pool's bytes and stores every other pool raw. Images are read one row group at a
    time through :meth:`Pool.iter_batches`, so memory stays at one batch of pixels whatever the pool size.
    """
    out = Path(out).expanduser()
    if rows_per_shard < 1 or row_group_size < 1:
        raise DmeError(f"rows_per_shard and row_group_size must be >= 1, got {rows_per_shard}, {row_group_size}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DmeError(f"{out} exists and is not empty; choose another OUT or pass --overwrite")
    n = len(pool)
    if n == 0:
        raise DmeError(f"pool {pool.name!r} is empty: nothing to write")
    jpeg_source = isinstance(pool, JpegNpzPool)
    enc: Encoding = ("jpeg" if jpeg_source else "raw") if encoding == "auto" else encoding  # type: ignore[assignment]
    if enc == "jpeg" and not jpeg_source:
        raise DmeError(f"encoding 'jpeg' keeps a JPEG pool's bytes; {pool.name!r} is not a JPEG pool (use raw)")
    first = pool.get(np.array([0]))
    shape = tuple(int(v) for v in first.shape[1:])
    labels = pool.labels
    meta = {"format": FORMAT, "name": pool.name, "encoding": enc, "shape": list(shape), "num_images": n}
    schema = _schema(labels is not None, meta)

    tmp = out.parent / f".{out.name}.partial-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True)
    shards: list[dict] = []
    try:
        bar = _progress(n, f"pool {pool.name}", progress)
        for s, start in enumerate(range(0, n, rows_per_shard)):
            stop = min(n, start + rows_per_shard)
            path = tmp / f"shard-{s:05d}.parquet"
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                for g in range(start, stop, row_group_size):
                    idx = np.arange(g, min(stop, g + row_group_size), dtype=np.int64)
                    if enc == "jpeg":
                        blobs = [pool._bytes(int(i)) for i in idx]  # type: ignore[attr-defined]
                    else:
                        blobs = [img.tobytes() for img in pool.get(idx)]
                    cols: dict[str, Any] = {"id": idx, "image": pa.array(blobs, type=pa.binary())}
                    if labels is not None:
                        cols["label"] = np.asarray(labels[idx], dtype=np.int64)
                    writer.write_table(pa.table(cols, schema=schema), row_group_size=row_group_size)
                    bar.update(len(idx))
            shards.append({"file": path.name, "rows": stop - start, "first_id": start, "last_id": stop - 1})
        bar.close()
        manifest = {**meta, "shards": shards, "has_labels": labels is not None,
                    "class_names": getattr(pool, "class_names", None), "content_key": pool.content_key(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote pool %s: %d images in %d shard(s) under %s (%s)", pool.name, n, len(shards), out, enc)
    return manifest


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled)


class ParquetPool(Pool):
    """A pool over ``dme pool build`` shards, read one row group at a time (an LRU of ``cache_groups`` groups)."""

    def __init__(self, path: str | Path, name: str | None = None, cache_groups: int = 8):
        self.path = Path(path).expanduser()
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise DataNotFound(f"{self.path} is not a Parquet pool (no {MANIFEST}); build one with `dme pool build`")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise DmeError(f"{mf}: format {self.manifest.get('format')!r}, this version reads {FORMAT!r}")
        self.name = name or self.manifest["name"]
        self.encoding: str = self.manifest["encoding"]
        self.image_shape = tuple(self.manifest["shape"])
        self.class_names = self.manifest.get("class_names")
        self.files = [self.path / s["file"] for s in self.manifest["shards"]]
        ids, labels, self._groups = [], [], []  # per shard: cumulative row-group starts
        for f in self.files:
            if not f.is_file():
                raise DataNotFound(f"pool shard missing: {f} (listed in {mf}); rebuild with `dme pool build`")
            pf = pq.ParquetFile(f)
            cols = ["id", "label"] if self.manifest.get("has_labels") else ["id"]
            t = pf.read(columns=cols)
            ids.append(t.column("id").to_numpy())
            if "label" in cols:
                labels.append(t.column("label").to_numpy())
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._groups.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self.ids = np.concatenate(ids).astype(np.int64)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else None
        self._shard_starts = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        self.cache_groups = max(1, cache_groups)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._content_key = self.manifest.get("content_key")  # the source's: same images, same key
        log.info("opened Parquet pool %s: %d images in %d shard(s)", self.name, len(self), len(self.files))

    def __len__(self) -> int:
        return len(self.ids)

    def sample_ids(self) -> np.ndarray:
        return self.ids

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # ship to Ray workers without cached pixels
        return state

    def _group(self, shard: int, group: int) -> np.ndarray:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = pq.ParquetFile(self.files[shard]).read_row_group(group, columns=["image"])
        images = decode_images(table.column("image").to_pylist(), self.encoding, self.image_shape)  # type: ignore
        self._cache[key] = images
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return images

    def _load(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        shard = np.searchsorted(self._shard_starts, idx, side="right") - 1
        row = idx - self._shard_starts[shard]
        order = np.lexsort((row, shard))  # visit each row group once
        for j in order:
            s, r = int(shard[j]), int(row[j])
            g = int(np.searchsorted(self._groups[s], r, side="right") - 1)
            out[j] = self._group(s, g)[r - self._groups[s][g]]
        return out
