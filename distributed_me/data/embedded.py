"""The embedded default: a dataset and a pool that need no file and no network, so every command works out of the box.

- dataset ``digits``: scikit-learn's 1,797 8×8 handwritten digits (shipped inside the sklearn wheel), split three
  ways: the victim's training split (half), the attacker's held-out share (a quarter), and the test split (a quarter);
- pool ``digits-unseen``: the attacker's held-out quarter, unlabeled, each digit in a few small random affine
  variants: an *in-distribution* pool the victim was never trained on (MEBench's same-distribution setting);
- pool ``photos``: random square crops of the natural photos shipped inside scikit-learn and scikit-image: a
  *natural-image* pool far from the digits (the domain gap).

Both are tiny and far from a real benchmark; they exist so quickstarts, tests and CI exercise the real code path.
The photos pool is an honest *natural-image* pool (the role ImageNet plays for KnockoffNets), not noise, so an
attack run against it behaves like one against a small real pool. Everything is a pure function of the seed.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import tempfile
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
#: of the remaining three quarters, the share held out from the victim for the attacker's in-distribution pool
DIGITS_ATTACKER_FRACTION = 1 / 3
DIGITS_UNSEEN_VARIANTS = 9  # images per held-out digit in the digits-unseen pool (the original, then jittered ones)
DIGITS_UNSEEN_SIZE = 16  # the pool's side: the embedded victim's input size, so jitter is not lost to a resize
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


#: bump when :func:`make_photo_crops` changes what it draws: crops cached on disk by an older version are not read
PHOTO_CROPS_VERSION = 1


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (images (1797, 8, 8) float64 in 0..16, labels): read from the CSV inside the sklearn wheel,
    as ``sklearn.datasets.load_digits`` reads it, but without importing sklearn (1 s in a fresh process, paid by
    every trial worker and test process that scores against the embedded victim). Falls back to ``load_digits`` where
    the file is not where this sklearn keeps it."""
    path = _source_path("sklearn/datasets/data", "digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@lru_cache(maxsize=2)
def _digit_splits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, victim's train indices, attacker's held-out indices, test indices), stratified per class:
    the test quarter first (as it always was), then a third of the rest held out from the victim."""
    raw, labels = _digits_raw()
    scaled = np.rint(raw * (255.0 / 16.0))
    images = scaled.clip(0, 255).astype(np.uint8)[..., None]
    rest, te = stratified_split(labels, DIGITS_TEST_FRACTION, seed)
    tr, held = stratified_split(labels[rest], DIGITS_ATTACKER_FRACTION, seed + 1)
    for a in (images, labels):
        a.setflags(write=False)
    return images, labels, rest[tr], rest[held], te


@DATASETS.register("digits")
def digits(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """sklearn digits as uint8 8×8×1 (0..16 scaled by 255/16): the victim's train split (half of the digits), the
    test split (a quarter), stratified from ``seed``. The last quarter is the attacker's, in ``digits-unseen``."""
    images, labels, tr, _, te = _digit_splits(int(seed))
    train, test = ArraySplit(images[tr], labels[tr]), ArraySplit(images[te], labels[te])
    ds = LabeledDataset(
        name="digits",
        train=train,
        test=test,
        class_names=[str(i) for i in range(10)],
        normalization=normalization_from(train.images),
        meta={"source": "sklearn.datasets.load_digits",
              "split": f"stratified: train 1/2, attacker's held-out 1/4 (not here), test 1/4 (seed {seed})"},
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


def crops_cache_path(n: int, size: int, seed: int) -> Path | None:
    """Where :func:`make_photo_crops`'s output for these arguments is kept on disk (``$DME_HOME/cache/photos``): the
    name hashes the arguments, the crop code's version, the Pillow and numpy versions (Pillow decodes and resizes,
    numpy draws the crops) and every source photo's path, size and mtime, so an upgraded package or a changed crop
    rule is a new file, not a stale read. ``None`` when a source is missing (the pool then differs from full
    installs: it is built, not cached)."""
    import PIL

    from ..tracking import dme_home

    parts = [f"v{PHOTO_CROPS_VERSION}", str(n), str(size), str(seed), str(PHOTOS_MIN_CROP), f"PIL {PIL.__version__}",
             f"numpy {np.__version__}"]
    for package, filename in PHOTO_SOURCES:
        path = _source_path(package, filename)
        if path is None:
            return None
        st = path.stat()
        parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return dme_home() / "cache" / "photos" / f"{n}x{size}-seed{seed}-{digest}.npy"


def _write_whole(path: Path, array: np.ndarray) -> None:
    """Save ``array`` to ``path`` whole: written and synced under a temporary name, then renamed over it, so a reader
    (another process loading the pool at the same time) sees the old file, the new one or none, never half of one.
    A failure leaves no temporary file behind and costs only the cache (logged)."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # the temporary file's 0600 would hide the cache from other users of a shared DME_HOME
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        log.warning("could not cache the photo crops in %s (%s): they are built again next time", path, e)
    finally:
        if tmp is not None:  # an error (or an interrupt) before the rename
            tmp.unlink(missing_ok=True)


@lru_cache(maxsize=2)
def _cached_crops(n: int, size: int, seed: int) -> np.ndarray:
    """The crops, once per process and once per machine: built on a first use (about 1 s for the default pool: every
    source photo decoded, then 20,000 resizes), read from disk after that (a few ms), by every trial worker, test and
    command that loads the pool. An unreadable file (empty, cut short, not an array) is built again and replaced."""
    path = crops_cache_path(n, size, seed)
    crops = None
    if path is not None and path.is_file():
        try:
            # mapped, not read: trial workers on one machine share the pages instead of a copy each. Viewed as a
            # plain array, so that pickling it (Ray Data actors get the pool) takes numpy's out-of-band path
            crops = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        except Exception as e:  # EOFError for an empty file, ValueError for a short one: all mean "build again"
            log.warning("photo crops cache %s unreadable (%s: %s): building the crops again", path,
                        type(e).__name__, e)
        if crops is not None and (crops.shape != (n, size, size, 3) or crops.dtype != np.uint8):
            log.warning("photo crops cache %s holds %s %s, not (%d, %d, %d, 3) uint8: building the crops again",
                        path, crops.shape, crops.dtype, n, size, size)
            crops = None
    if crops is None:
        crops = make_photo_crops(n, size, seed)
        if path is not None:
            _write_whole(path, crops)
    crops.setflags(write=False)  # shared between pools built in this process
    return crops


@POOLS.register("photos")
def photos(
    root: str | None = None, download: bool = False, seed: int = 0, n: int = PHOTOS_N, size: int = PHOTOS_SIZE
) -> ArrayPool:
    """The embedded natural-image pool (no files, no network)."""
    images = _cached_crops(int(n), int(size), int(seed))
    pool = ArrayPool(images, name="photos")
    # counted, not loaded: decoding the photos is what the crops cache saves
    sources = sum(_source_path(package, filename) is not None for package, filename in PHOTO_SOURCES)
    log_loaded("pool", "photos", images=n, size=size, seed=seed, sources=sources)
    return pool


def jitter_digits(images: np.ndarray, variants: int, size: int, seed: int) -> np.ndarray:
    """Each uint8 (n, h, w, 1) digit as ``variants`` images of ``size``×``size``: the digit upscaled (bilinear), then
    ``variants - 1`` copies under a random affine map (rotation ±10°, scale 0.9–1.1, shift ±1 source pixel), the
    small changes of pose handwriting has. Output is image-major: row ``i * variants + j`` is variant ``j`` of digit
    ``i``. A pure function of the arguments (all draws up front from one generator)."""
    if variants < 1 or size < 1:
        raise DmeError(f"digits-unseen needs variants >= 1 and size >= 1, got {variants=}, {size=}")
    rng = np.random.default_rng(seed)
    n = len(images)
    angle = rng.uniform(-10, 10, (n, variants))
    scale = rng.uniform(0.9, 1.1, (n, variants))
    shift = rng.uniform(-1, 1, (n, variants, 2)) * (size / images.shape[1])
    out = np.empty((n * variants, size, size, 1), dtype=np.uint8)
    c = (size - 1) / 2
    for i in range(n):
        base = Image.fromarray(images[i, ..., 0]).resize((size, size), Image.Resampling.BILINEAR)
        out[i * variants] = np.asarray(base)[..., None]
        for j in range(1, variants):
            # inverse map (output → input) about the centre: PIL's affine takes the inverse transform
            t = np.deg2rad(angle[i, j])
            cos, sin = np.cos(t) / scale[i, j], np.sin(t) / scale[i, j]
            dx, dy = shift[i, j]
            coeffs = (cos, sin, c - cos * (c + dx) - sin * (c + dy), -sin, cos, c + sin * (c + dx) - cos * (c + dy))
            moved = base.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
            out[i * variants + j] = np.asarray(moved)[..., None]
    return out


@POOLS.register("digits-unseen")
def digits_unseen(
    root: str | None = None, download: bool = False, seed: int = 0, variants: int = DIGITS_UNSEEN_VARIANTS,
    size: int = DIGITS_UNSEEN_SIZE,
) -> ArrayPool:
    """The attacker's in-distribution pool: the quarter of the digits held out from the victim's training (and from
    the test split), unlabeled, each in ``variants`` jittered versions (:func:`jitter_digits`), 448 × 9 = 4,032
    images by default. Why jitter: 449 held-out digits alone cannot serve a 1,000-query budget, and an attacker with
    a few in-distribution samples does augment them (Papernot's JBA, MEBench §3.3); the originals come first in
    each digit's block, so a random pick is as likely to be an original as any variant."""
    images, _, _, held, _ = _digit_splits(int(seed))
    pool = ArrayPool(jitter_digits(images[held], int(variants), int(size), int(seed)), name="digits-unseen")
    log_loaded("pool", "digits-unseen", images=len(pool), held_out_digits=len(held), variants=variants, size=size)
    return pool
