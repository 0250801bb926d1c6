"""Labeled datasets (victim tasks) and unlabeled query pools behind one interface.

``load_dataset(spec)`` and ``load_pool(spec)`` accept a registered name or a path, so a sweep YAML or a CLI flag can
name either. Registered names: see ``DATASETS.names()`` / ``POOLS.names()``. The embedded ``digits`` dataset and
``photos`` pool need no files at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import DataNotFound, DmeError
from . import embedded, folder, imagenet64, npz, torchvision_sets  # noqa: F401  (import = registration)
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArrayPool,
    ArraySplit,
    LabeledDataset,
    Normalization,
    Pool,
    adapt_images,
    split_indices,
    to_tensor,
)
from .embedded import EMBEDDED_DATASET, EMBEDDED_POOL
from .folder import ImageFolderPool, is_image_folder, load_image_folder
from .imagenet64 import ImageNet64Pool, find_batch_files, is_imagenet64_dir
from .npz import JpegNpzPool, load_npz_dataset, load_npz_split, npz_keys
from .parquet import ParquetPool, is_parquet_pool, write_pool_shards
from .registry import DATASETS, POOLS, default_root, log_loaded, normalization_from, stratified_split, unknown_spec

__all__ = [
    "ArrayPool",
    "ArraySplit",
    "DATASETS",
    "EMBEDDED_DATASET",
    "EMBEDDED_POOL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderPool",
    "ImageNet64Pool",
    "JpegNpzPool",
    "LabeledDataset",
    "Normalization",
    "POOLS",
    "ParquetPool",
    "Pool",
    "adapt_images",
    "default_root",
    "load_dataset",
    "load_image_folder",
    "load_npz_dataset",
    "load_pool",
    "normalization_from",
    "split_indices",
    "stratified_split",
    "to_tensor",
    "write_pool_shards",
]

log = logging.getLogger(__name__)

_DATASET_PATHS = (
    "or a path: a labeled TRAIN.npz (test file found by name), TRAIN.npz,TEST.npz, or an image-folder directory"
)
_POOL_PATHS = (
    "or a labeled dataset name ({datasets}; its train split, unlabeled), or a path: a JPEG-pool or labeled .npz, "
    "a Parquet pool directory (`dme pool build`), a directory of ImageNet64 batches, or a directory of images"
)


def _looks_like_path(spec: str) -> bool:
    return any(ch in spec for ch in "/\\,") or spec.startswith((".", "~")) or spec.lower().endswith(".npz")


def _missing_path(spec: str, path: Path) -> DataNotFound:
    return DataNotFound(
        f"no such file or directory: {path.absolute()} (from {spec!r}); check the path, or use a registered name"
    )


def load_dataset(
    spec: str, root: str | None = None, download: bool = False, seed: int = 0, **kw: Any
) -> LabeledDataset:
    """A labeled dataset from a registered name, a ``.npz`` (pair) path or an image-folder directory.

    ``root`` / ``download`` apply to registered datasets; ``seed`` fixes any split that is not given by the files;
    ``kw`` go to the loader (e.g. ``size=`` for image folders).
    """
    if spec in DATASETS:
        return DATASETS.get(spec)(root, download, seed, **kw)
    if "," in spec:
        train, test = (Path(p.strip()).expanduser() for p in spec.split(",", 1))
        for p in (train, test):
            if not p.is_file():
                raise _missing_path(spec, p)
        return _from(load_npz_dataset(train, test, seed=seed, **kw), train, test)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from(load_npz_dataset(path, seed=seed, **kw), path)
    if path.is_dir():
        if not (is_image_folder(path) or (path / "train").is_dir()):
            raise DataNotFound(f"{path} is not an image-folder dataset: expected {path}/<class>/*.jpg")
        return _from(load_image_folder(path, seed=seed, **kw), path)
    if _looks_like_path(spec):
        raise _missing_path(spec, path)
    raise unknown_spec("dataset", spec, DATASETS.names(), _DATASET_PATHS)


def _from(ds: LabeledDataset, *paths: Path) -> LabeledDataset:
    """Record in ``ds.meta["source"]`` the spec that loads ``ds`` again from any directory (absolute paths): a victim
    trained on it stores that, not the dataset's name, so its test split can be found later."""
    ds.meta["source"] = ",".join(str(p.resolve()) for p in paths)
    return ds


def open_npz_pool(path: str | Path, name: str | None = None) -> Pool:
    """A pool from any supported ``.npz``: JPEG-bytes pool, labeled uint8 arrays (used unlabeled), or an ImageNet64
    batch (``data``/``labels``)."""
    path = Path(path).expanduser()
    keys = npz_keys(path)
    if "jpeg" in keys and "offsets" in keys:
        return JpegNpzPool(path, name=name)
    if "images" in keys:
        split, _ = load_npz_split(path)
        pool = ArrayPool(split.images, name=name or path.stem, labels=split.labels)
        log_loaded("pool", pool.name, images=len(pool), shape=split.images.shape[1:], path=path)
        return pool
    if "data" in keys:
        return ImageNet64Pool([path], name=name or path.stem)
    raise DmeError(f"{path} is neither a JPEG pool ('jpeg', 'offsets') nor an image array ('images'); keys: {keys}")


def load_pool(spec: str, root: str | None = None, download: bool = False, seed: int = 0, **kw: Any) -> Pool:
    """A query pool from a registered pool name, a labeled dataset name (train split, labels kept for analysis), a
    ``.npz`` path, a directory of ImageNet64 batches or a directory of images. ``kw`` go to the pool loader."""
    if spec in POOLS:
        return POOLS.get(spec)(root, download, seed, **kw)
    if spec in DATASETS:
        ds = DATASETS.get(spec)(root, download, seed, **kw)
        return ArrayPool(ds.train.images, name=f"{ds.name}:train", labels=ds.train.labels)
    path = Path(spec).expanduser()
    if path.is_file():
        return open_npz_pool(path, **kw)
    if path.is_dir():
        if is_parquet_pool(path):
            return ParquetPool(path, **kw)
        if is_imagenet64_dir(path):
            files = find_batch_files(path, "train") or find_batch_files(path, "val")
            return ImageNet64Pool(files, name=path.name, **kw)
        return ImageFolderPool(path, **kw)
    if _looks_like_path(spec):
        raise _missing_path(spec, path)
    raise unknown_spec("pool", spec, POOLS.names(), _POOL_PATHS.format(datasets=", ".join(DATASETS.names())))
