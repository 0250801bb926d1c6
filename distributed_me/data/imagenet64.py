"""Downsampled ImageNet (Chrabaszcz et al. 2017) as a lazy query pool: batch files opened only when indexed.

Official npz layout (``Imagenet64_train_npz``): ``train_data_batch_1.npz`` … ``train_data_batch_10.npz`` and
``val_data.npz``, each with ``data`` uint8 (N, 3·S·S) in channel-planar order (reshape (N, 3, S, S) → NHWC) and
``labels`` 1..1000 (made 0-based here). S is inferred (64, also 32/16 for the smaller variants).

The train set is 1.28M images (15.7 GB of pixels), so the pool never loads it whole: at construction only the small
``labels`` arrays are read (for ``len`` and analysis); an index request reads pixel rows from the batch files it
touches. Uncompressed members (``np.savez``) are memory-mapped straight out of the zip, so only the requested rows are
read; compressed members (``np.savez_compressed``) must be inflated whole, and the most recent one(s) are cached.
"""

from __future__ import annotations

import logging
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataNotFound, DmeError
from .base import Pool
from .npz import read_npz
from .registry import POOLS, log_loaded, resolve_root

log = logging.getLogger(__name__)

_BATCH_RE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_VAL_RE = re.compile(r"^val_data(\.npz)?$")
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # zip local file header, 30 bytes
_LOCAL_HEADER_MAGIC = 0x04034B50


def find_batch_files(directory: str | Path, split: str = "train") -> list[Path]:
    """The official batch files of ``split`` ("train" → batches in numeric order, "val" → ``val_data``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    if split == "train":
        found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _BATCH_RE.match(p.name)) and p.is_file()]
        return [p for _, p in sorted(found)]
    if split == "val":
        return sorted(p for p in directory.iterdir() if _VAL_RE.match(p.name) and p.is_file())
    raise DmeError(f"unknown imagenet64 split {split!r}; valid: train, val")


def is_imagenet64_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds official ImageNet64 batch files."""
    return bool(find_batch_files(directory, "train") or find_batch_files(directory, "val"))


def _member_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map array ``key`` of an npz if it is stored uncompressed; ``None`` if compressed (must be inflated)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            header_len = fh.tell()
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_HEADER_MAGIC or dtype.hasobject:
        return None
    offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + header_len
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _open_data(path: Path) -> np.ndarray:
    """The ``data`` array of one batch file: a memmap when possible, else inflated. (Tests spy on this.)"""
    try:
        mapped = _member_memmap(path, "data")
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DmeError(f"cannot read 'data' from ImageNet64 batch {path} ({type(exc).__name__}: {exc})") from exc
    if mapped is not None:
        return mapped
    log.info("inflating compressed ImageNet64 batch %s", path)
    return read_npz(path, lambda z: np.asarray(z["data"]))


def _read_labels_and_shape(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    def read(z: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        if "data" not in z.files or "labels" not in z.files:
            raise DmeError(f"{path} is not an ImageNet64 batch: needs 'data' and 'labels', has {list(z.files)}")
        labels = np.asarray(z["labels"], dtype=np.int64).reshape(-1)
        return labels, _data_shape(path)

    return read_npz(path, read)


def _data_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``data`` from its .npy header, without reading the pixels."""
    with zipfile.ZipFile(path) as zf, zf.open("data.npy") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(reader(fh)[0])


class ImageNet64Pool(Pool):
    """A pool over ImageNet64-format batch files, loading pixel data per batch file and only on demand."""

    def __init__(self, files: Sequence[str | Path], name: str = "imagenet64", cache_batches: int = 1):
        if not files:
            raise DataNotFound("an ImageNet64 pool needs at least one batch file")
        self.files = [Path(f) for f in files]
        self.name = name
        self.cache_batches = max(1, cache_batches)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        labels: list[np.ndarray] = []
        side = None
        for path in self.files:
            lab, shape = _read_labels_and_shape(path)
            if len(shape) != 2 or shape[0] != len(lab) or shape[1] % 3:
                raise DmeError(f"{path}: 'data' must be (N, 3·S·S), N = len(labels); got {shape}, {len(lab)} labels")
            s = int(round((shape[1] // 3) ** 0.5))
            if 3 * s * s != shape[1] or (side is not None and s != side):
                raise DmeError(f"{path}: rows of {shape[1]} values are not 3×{side or 'S'}×{side or 'S'} images")
            side = s
            labels.append(lab)
        self.side = int(side or 0)
        self._starts = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])]).astype(np.int64)
        all_labels = np.concatenate(labels)
        # Official labels are 1..1000; keep already-0-based custom files as they are.
        self.labels = all_labels - 1 if all_labels.size and all_labels.min() >= 1 else all_labels
        log_loaded("pool", name, images=len(self), files=len(self.files), side=self.side)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (e.g. to a Ray worker) without the cached batch: a memmap would be pickled as its full 1.5 GB."""
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def _batch(self, f: int) -> np.ndarray:
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        data = _open_data(self.files[f])
        self._cache[f] = data
        while len(self._cache) > self.cache_batches:
            self._cache.popitem(last=False)
        return data

    def _load(self, idx: np.ndarray) -> np.ndarray:
        s = self.side
        out = np.empty((len(idx), s, s, 3), dtype=np.uint8)
        file_of = np.searchsorted(self._starts, idx, side="right") - 1
        for f in np.unique(file_of):
            pos = np.flatnonzero(file_of == f)
            local = idx[pos] - self._starts[f]
            order = np.argsort(local, kind="stable")  # sequential reads from a memmap
            rows = np.asarray(self._batch(int(f))[local[order]], dtype=np.uint8)
            out[pos[order]] = rows.reshape(-1, 3, s, s).transpose(0, 2, 3, 1)
        return out


def imagenet64_dir(root: str | None) -> Path:
    return resolve_root(root) / "imagenet64"


@POOLS.register("imagenet64")
def imagenet64_pool(
    root: str | None = None, download: bool = False, seed: int = 0, split: str = "train", cache_batches: int = 1
) -> ImageNet64Pool:
    """The official ImageNet64 train (or val) batches under ``ROOT/imagenet64``. ``seed`` unused (fixed order)."""
    directory = imagenet64_dir(root)
    files = find_batch_files(directory, split)
    if not files:
        expected = "train_data_batch_1.npz … train_data_batch_10.npz" if split == "train" else "val_data.npz"
        why = " (--download is not possible: image-net.org requires a login)" if download else ""
        raise DataNotFound(
            f"ImageNet64 {split} batches not found: put {expected} (the official Imagenet64 npz files from "
            f"image-net.org) in {directory}{why}; or use a JPEG pool .npz such as "
            "../shared/data/pool_imagenet64_20k.npz, or the embedded pool 'photos'"
        )
    name = "imagenet64" if split == "train" else "imagenet64_val"
    return ImageNet64Pool(files, name=name, cache_batches=cache_batches)
