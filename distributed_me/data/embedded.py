"""The embedded default: a dataset and a pool that need no file and no network, so every command works out of the box.

- dataset ``digits``: scikit-learn's 1,797 8×8 handwritten digits (shipped inside the sklearn wheel);
- pool ``photos``: random square crops of the natural photos shipped inside scikit-learn and scikit-image.

Both are tiny and far from a real benchmark; they exist so quickstarts, tests and CI exercise the real code path.
The photos pool is an honest *natural-image* pool (the role ImageNet plays for KnockoffNets), not noise, so an
attack run against it behaves like one against a small real pool. Everything is a pure function of the seed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DmeError
from .base import ArrayPool, ArraySplit, LabeledDataset
from .registry import DATASETS, POOLS, log_loaded, normalization_from, stratified_split

log = logging.getLogger(__name__)

EMBEDDED_DATASET = "digits"
EMBEDDED_POOL = "photos"

DIGITS_TEST_FRACTION = 0.25
PHOTOS_N = 20_000
PHOTOS_SIZE = 32
PHOTOS_MIN_CROP = 8

# (package directory, file) of the bundled photos used as crop sources. Files are read directly from the installed
# packages, never through skimage.data's fetchers (which may try to download) nor by importing sklearn.datasets (1-2 s).
# Synthetic, document, silhouette and stereo-twin images are left out.
PHOTO_SOURCES: tuple[tuple[str, str], ...] = (
    ("sklearn/datasets/images", "china.jpg"),
    ("sklearn/datasets/images", "flower.jpg"),
    ("skimage/data", "astronaut.png"),
    ("skimage/data", "brick.png"),
    ("skimage/data", "camera.png"),
    ("skimage/data", "chelsea.png"),
    ("skimage/data", "coffee.png"),
    ("skimage/data", "coins.png"),
    ("skimage/data", "grass.png"),
    ("skimage/data", "gravel.png"),
    ("skimage/data", "hubble_deep_field.jpg"),
    ("skimage/data", "ihc.png"),
    ("skimage/data", "moon.png"),
    ("skimage/data", "motorcycle_left.png"),
    ("skimage/data", "retina.jpg"),
    ("skimage/data", "rocket.jpg"),
)


@DATASETS.register("digits")
def digits(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """sklearn digits as uint8 8×8×1 (0..16 scaled by 255/16), stratified 75/25 split from ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scaled = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = scaled.clip(0, 255).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    tr, te = stratified_split(labels, DIGITS_TEST_FRACTION, seed)
    train, test = ArraySplit(images[tr], labels[tr]), ArraySplit(images[te], labels[te])
    ds = LabeledDataset(
        name="digits",
        train=train,
        test=test,
        class_names=[str(i) for i in range(10)],
        normalization=normalization_from(train.images),
        meta={"source": "sklearn.datasets.load_digits", "split": f"stratified 75/25 (seed {seed})"},
    )
    log_loaded("dataset", "digits", train=len(train), test=len(test), classes=10, shape=ds.image_shape)
    return ds


def _source_path(package_dir: str, filename: str) -> Path | None:
    """``<site-packages>/<package_dir>/<filename>`` if installed, located without importing the package."""
    top, _, sub = package_dir.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / sub / filename
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def photo_sources() -> tuple[tuple[str, Image.Image], ...]:
    """The bundled photos that exist in this install, as loaded RGB images (gray sources replicated to 3 channels)."""
    found: list[tuple[str, Image.Image]] = []
    for package, filename in PHOTO_SOURCES:
        path = _source_path(package, filename)
        if path is None:
            log.warning("photo %s/%s not installed: the photos pool differs from full installs", package, filename)
            continue
        with Image.open(path) as img:
            found.append((filename, img.convert("RGB")))
    if not found:
        raise DmeError("none of the photos bundled with scikit-learn/scikit-image were found; reinstall them")
    return tuple(found)


def make_photo_crops(
    n: int = PHOTOS_N, size: int = PHOTOS_SIZE, seed: int = 0, min_crop: int = PHOTOS_MIN_CROP
) -> np.ndarray:
    """``n`` random square crops (side uniform in [min_crop, min(w, h)/2]), flipped half the time, resized to
    ``size``×``size``: uint8 (n, size, size, 3), a pure function of the arguments and the installed photos.

    All random draws happen up front from one generator, so the bytes never depend on execution order or on the
    threads that do the resizing. Each crop is one Pillow resize with a source box (bilinear, antialiased when
    shrinking; ``reducing_gap`` lets big crops be box-reduced first, ~2x faster), with no intermediate crop copy.
    """
    if n < 0 or size < 1 or min_crop < 1:
        raise DmeError(f"photos pool needs n >= 0, size >= 1, min_crop >= 1; got {n=}, {size=}, {min_crop=}")
    sources = photo_sources()
    rng = np.random.default_rng(seed)
    src = rng.integers(len(sources), size=n)
    u_side, u_left, u_top = rng.random(n), rng.random(n), rng.random(n)
    flips = rng.random(n) < 0.5
    dims = np.array([img.size for _, img in sources], dtype=np.int64)  # (w, h) per source
    w, h = dims[src, 0], dims[src, 1]
    lo = np.minimum(min_crop, np.minimum(w, h))
    hi = np.maximum(lo, np.minimum(w, h) // 2)
    side = np.minimum(lo + (u_side * (hi - lo + 1)).astype(np.int64), hi)
    left = (u_left * (w - side + 1)).astype(np.int64)
    top = (u_top * (h - side + 1)).astype(np.int64)
    out = np.empty((n, size, size, 3), dtype=np.uint8)

    def work(chunk: range) -> None:
        for i in chunk:
            box = (int(left[i]), int(top[i]), int(left[i] + side[i]), int(top[i] + side[i]))
            img = sources[src[i]][1].resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
            crop = np.asarray(img)
            out[i] = crop[:, ::-1] if flips[i] else crop

    step = 2048
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:  # Pillow releases the GIL in resize
        list(ex.map(work, [range(a, min(a + step, n)) for a in range(0, n, step)]))
    return out


@lru_cache(maxsize=2)
def _cached_crops(n: int, size: int, seed: int) -> np.ndarray:
    crops = make_photo_crops(n, size, seed)
    crops.setflags(write=False)  # shared between pools built in this process
    return crops


@POOLS.register("photos")
def photos(
    root: str | None = None, download: bool = False, seed: int = 0, n: int = PHOTOS_N, size: int = PHOTOS_SIZE
) -> ArrayPool:
    """The embedded natural-image pool (no files, no network)."""
    images = _cached_crops(int(n), int(size), int(seed))
    pool = ArrayPool(images, name="photos")
    log_loaded("pool", "photos", images=n, size=size, seed=seed, sources=len(photo_sources()))
    return pool
