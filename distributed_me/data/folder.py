"""Image-folder datasets (``root/<class>/*.jpg``: Indoor-67, Caltech-256, CUB, VGG-Flowers arranged by class).

Layouts accepted, checked in this order:

1. ``root/train/<class>/…`` and ``root/test/<class>/…`` (or ``val`` for test): the given split is used as-is;
2. ``root/<class>/…``: a deterministic per-class split from the seed (test fraction 0.2).

Images (any depth under the class folder) are decoded with Pillow, converted to RGB, center-cropped to a square and
resized to ``size``×``size`` with :func:`adapt_images` at load time, so a whole dataset fits in memory as one uint8
array. Cropping before resizing keeps object proportions, which matters for the tall/wide photos of these sets.

The same layouts can be used as a lazy query pool (:class:`ImageFolderPool`), decoding only the files requested.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataNotFound, DmeError
from .base import ArraySplit, LabeledDataset, Pool, adapt_images
from .registry import DATASETS, log_loaded, normalization_from, resolve_root, stratified_split

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_SIZE = 64
TEST_FRACTION = 0.2
_TEST_DIRS = ("test", "val")


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(directory: Path, classes: Sequence[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files, labels and class names of a ``directory/<class>/…`` tree (class order: sorted folder names).

    With ``classes`` given (the train split's), folders must be among them, so train and test share label ids.
    """
    dirs = _class_dirs(directory)
    names = list(classes) if classes is not None else [d.name for d in dirs]
    index = {n: i for i, n in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        if d.name not in index:
            raise DmeError(f"class folder {d} has no counterpart in the train split (classes: {', '.join(names)})")
        found = _images_under(d)
        files += found
        labels += [index[d.name]] * len(found)
    return files, np.asarray(labels, dtype=np.int64), names


def read_image(path: Path, size: int) -> np.ndarray:
    """One file → uint8 ``size``×``size``×3: RGB, center square crop, antialiased resize."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale (still ≥ size)
            rgb = img.convert("RGB")
    except OSError as exc:
        raise DmeError(f"cannot decode image {path} ({exc})") from exc
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    arr = np.array(rgb.crop((left, top, left + side, top + side)), dtype=np.uint8)  # writable: torch warns otherwise
    return adapt_images(arr[None], size=size)[0]


def read_images(files: Sequence[Path], size: int, progress_every: int = 5000) -> np.ndarray:
    """Decode many files into one uint8 (N, size, size, 3) array, a few threads wide (Pillow releases the GIL)."""
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        for i, arr in enumerate(ex.map(lambda p: read_image(p, size), files)):
            out[i] = arr
            if progress_every and (i + 1) % progress_every == 0:
                log.info("decoded %d/%d images", i + 1, len(files))
    return out


def _has_split_dirs(directory: Path) -> Path | None:
    if not (directory / "train").is_dir():
        return None
    return next((directory / t for t in _TEST_DIRS if (directory / t).is_dir()), None)


def is_image_folder(directory: str | Path) -> bool:
    """Whether ``directory`` looks like an image-folder dataset (class subfolders holding images)."""
    directory = Path(directory)
    return directory.is_dir() and any(_images_under(d) for d in _class_dirs(directory))


def load_image_folder(
    path: str | Path,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    name: str | None = None,
) -> LabeledDataset:
    """A labeled dataset from an image-folder tree (see the module docstring for the layouts)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataNotFound(f"no such image folder: {root} (expected {root}/<class>/*.jpg)")
    test_dir = _has_split_dirs(root)
    if test_dir is not None:
        tr_files, tr_labels, classes = scan_classes(root / "train")
        te_files, te_labels, _ = scan_classes(test_dir, classes)
        split_note = f"folders train/{test_dir.name}"
    else:
        files, labels, classes = scan_classes(root)
        tr, te = stratified_split(labels, test_fraction, seed)
        tr_files, te_files = [files[i] for i in tr], [files[i] for i in te]
        tr_labels, te_labels = labels[tr], labels[te]
        split_note = f"seeded per-class {1 - test_fraction:.0%}/{test_fraction:.0%} split (seed {seed})"
    if not tr_files:
        raise DataNotFound(
            f"no images found in {root}: expected {root}/<class>/*.jpg (extensions {sorted(IMAGE_EXTENSIONS)})"
        )
    log.info("reading %d images from %s at %dx%d", len(tr_files) + len(te_files), root, size, size)
    train = ArraySplit(read_images(tr_files, size), tr_labels)
    test = ArraySplit(read_images(te_files, size), te_labels)
    ds = LabeledDataset(
        name=name or root.name,
        train=train,
        test=test,
        class_names=classes,
        normalization=normalization_from(train.images),
        meta={"source": "folder", "path": str(root), "split": split_note, "size": size},
    )
    log_loaded("dataset", ds.name, train=len(train), test=len(test), classes=ds.num_classes, shape=ds.image_shape)
    return ds


class ImageFolderPool(Pool):
    """Every image under a directory as a lazy pool (labels from class folders when there are any, for analysis)."""

    def __init__(self, path: str | Path, size: int = DEFAULT_SIZE, name: str | None = None):
        self.path = Path(path).expanduser()
        self.size = size
        self.name = name or self.path.name
        if is_image_folder(self.path):
            self.files, labels, self.class_names = scan_classes(self.path)
            self.labels = labels
        else:
            self.files, self.class_names = _images_under(self.path), []
            self.labels = None
        if not self.files:
            raise DataNotFound(f"no images found under {self.path} (extensions {sorted(IMAGE_EXTENSIONS)})")
        log_loaded("pool", self.name, images=len(self), size=size, path=self.path)

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, idx: np.ndarray) -> np.ndarray:
        return read_images([self.files[int(i)] for i in idx], self.size, progress_every=0)


def _named_folder(
    name: str, root: str | None, candidates: Sequence[str], size: int, seed: int, download: bool
) -> LabeledDataset:
    base = resolve_root(root) / name
    for sub in candidates:
        if is_image_folder(base / sub) or _has_split_dirs(base / sub) is not None:
            return load_image_folder(base / sub, size=size, seed=seed, name=name)
    how = " (no automatic download for it)" if download else ""
    raise DataNotFound(
        f"dataset {name!r} not found: put its class folders in {base}/<class>/*.jpg "
        f"(or {base}/train/<class>, {base}/test/<class>){how}; any image-folder directory path also works"
    )


@DATASETS.register("indoor67")
def indoor67(
    root: str | None = None, download: bool = False, seed: int = 0, size: int = DEFAULT_SIZE
) -> LabeledDataset:
    """MIT Indoor-67 from ``ROOT/indoor67/Images/<class>`` (the archive's layout) or ``ROOT/indoor67/<class>``."""
    return _named_folder("indoor67", root, ("Images", "."), size, seed, download)
