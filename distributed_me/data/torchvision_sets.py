"""CIFAR-10/100, SVHN, GTSRB and Caltech-256 through torchvision, converted to uint8 NHWC :class:`ArraySplit`.

Files live in torchvision's own layout under the data root (``--data-root`` / ``$DME_DATA`` /
``~/.cache/distributed_me/data``) so a copy made by any torchvision user can be dropped in as-is:

- ``cifar10``: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``cifar100``: ``ROOT/cifar-100-python/{train,test,meta}``
- ``svhn``: ``ROOT/svhn/{train_32x32.mat,test_32x32.mat}``
- ``gtsrb``: ``ROOT/gtsrb/GTSRB/Training/<00000..00042>/*.ppm``, ``ROOT/gtsrb/GTSRB/Final_Test/Images/*.ppm``,
  ``ROOT/gtsrb/GT-final_test.csv``
- ``caltech256``: ``ROOT/caltech256/256_ObjectCategories/<NNN.name>/*.jpg`` (loaded by the image-folder loader)

The machines this runs on are often offline, so a missing file never turns into a silent download: without
``download=True`` it is a :class:`DataNotFound` naming the expected path; with it, a failed download is reported
quickly (socket timeout) with the local alternatives.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import DataNotFound, DmeError
from .base import ArraySplit, LabeledDataset, adapt_images
from .registry import DATASETS, log_loaded, normalization_from, resolve_root

log = logging.getLogger(__name__)
T = TypeVar("T")

DOWNLOAD_TIMEOUT_S = 30.0
"""Per-socket-operation timeout while torchvision downloads: offline machines fail fast instead of hanging."""

LOCAL_ALTERNATIVES = {
    "cifar10": "../shared/data/cifar10_train_10k.npz",
    "gtsrb": "../shared/data/gtsrb_train_1290.npz",
}

GTSRB_SIZE = 32

GTSRB_CLASS_NAMES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)  # fmt: skip


def _alternatives(name: str) -> str:
    local = LOCAL_ALTERNATIVES.get(name)
    npz = f"a local labeled .npz such as {local}" if local else "a local labeled .npz (images/labels/class_names)"
    return f"or use {npz}, an image-folder directory, or the embedded dataset 'digits'"


def missing_message(name: str, root: Path, missing: Sequence[Path]) -> str:
    """The one wording for 'files not there': where they were expected, and the ways out."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return (
        f"dataset {name!r} not found: expected {missing[0]}{more} under data root {root}. "
        f"Place the files there (or point --data-root / $DME_DATA elsewhere), pass --download to fetch them, "
        f"{_alternatives(name)}"
    )


@contextmanager
def _socket_timeout(seconds: float | None) -> Iterator[None]:
    """Temporarily bound blocking socket operations (torchvision's urllib calls take no timeout argument)."""
    previous = socket.getdefaulttimeout()
    if seconds is not None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(name: str, root: Path, download: bool, expected: Sequence[Path], make: Callable[[bool], T]) -> T:
    """Run a torchvision constructor ``make(download)``, turning every failure into a :class:`DataNotFound`.

    ``expected`` are the paths whose absence means "not there yet": missing and no ``download`` → error naming them
    without calling torchvision; present → torchvision is called with ``download=False`` (no network at all).
    """
    missing = [p for p in expected if not p.exists()]
    if missing and not download:
        raise DataNotFound(missing_message(name, root, missing))
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S if missing else None):
            return make(bool(missing))
    except DmeError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, tarfile errors...
        if missing:
            raise DataNotFound(
                f"could not download dataset {name!r} into {root} ({type(exc).__name__}: {exc}). "
                f"If this machine is offline, place the files under {root} yourself, {_alternatives(name)}"
            ) from exc
        raise DataNotFound(
            f"dataset {name!r} under {root} is unreadable or corrupted ({type(exc).__name__}: {exc}). "
            f"Delete it and pass --download, or replace the files; {_alternatives(name)}"
        ) from exc


def _finish(name: str, train: ArraySplit, test: ArraySplit, classes: Sequence[str], **meta: Any) -> LabeledDataset:
    ds = LabeledDataset(
        name=name,
        train=train,
        test=test,
        class_names=[str(c) for c in classes],
        normalization=normalization_from(train.images),
        meta={"source": "torchvision", **meta},
    )
    log_loaded("dataset", name, train=len(train), test=len(test), classes=ds.num_classes, shape=ds.image_shape)
    return ds


def _cifar(
    name: str, cls_name: str, folder: str, files: Sequence[str], root: str | None, download: bool
) -> LabeledDataset:
    import torchvision.datasets as tvd

    base = resolve_root(root)
    cls = getattr(tvd, cls_name)

    def make(dl: bool) -> tuple[Any, Any]:
        return cls(str(base), train=True, download=dl), cls(str(base), train=False, download=False)

    tr, te = fetch(name, base, download, [base / folder / f for f in files], make)
    return _finish(
        name,
        ArraySplit(np.ascontiguousarray(tr.data, dtype=np.uint8), np.asarray(tr.targets)),
        ArraySplit(np.ascontiguousarray(te.data, dtype=np.uint8), np.asarray(te.targets)),
        tr.classes,
        root=str(base),
    )


@DATASETS.register("cifar10")
def cifar10(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """CIFAR-10, official python batches (50k train / 10k test, 32×32 RGB). ``seed`` unused: official split."""
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    return _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", files, root, download)


@DATASETS.register("cifar100")
def cifar100(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """CIFAR-100 with its 100 fine labels (50k train / 10k test). ``seed`` unused: official split."""
    return _cifar("cifar100", "CIFAR100", "cifar-100-python", ["train", "test", "meta"], root, download)


@DATASETS.register("svhn")
def svhn(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """SVHN cropped digits, ``train`` and ``test`` .mat files (label 10 → 0, as torchvision does)."""
    import torchvision.datasets as tvd

    base = resolve_root(root)
    folder = base / "svhn"
    expected = [folder / "train_32x32.mat", folder / "test_32x32.mat"]

    def make(dl: bool) -> tuple[Any, Any]:
        return tvd.SVHN(str(folder), split="train", download=dl), tvd.SVHN(str(folder), split="test", download=dl)

    tr, te = fetch("svhn", base, download, expected, make)

    def split(ds: Any) -> ArraySplit:  # torchvision keeps NCHW
        return ArraySplit(np.ascontiguousarray(ds.data.transpose(0, 2, 3, 1), dtype=np.uint8), ds.labels)

    return _finish("svhn", split(tr), split(te), [str(i) for i in range(10)], root=str(base))


def _pil_split(ds: Any, size: int) -> ArraySplit:
    """Read a torchvision PIL-backed dataset and resize every image to size×size with :func:`adapt_images`.

    Images are grouped by their original shape so each group is one batched resize.
    """
    n = len(ds)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for i in range(n):
        img, target = ds[i]
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        groups[arr.shape].append((i, arr))
        labels[i] = int(target)
        if (i + 1) % 5000 == 0:
            log.info("read %d/%d images", i + 1, n)
    for members in groups.values():
        idx = [i for i, _ in members]
        images[idx] = adapt_images(np.stack([a for _, a in members]), size=size)
    return ArraySplit(images, labels)


@DATASETS.register("gtsrb")
def gtsrb(root: str | None = None, download: bool = False, seed: int = 0) -> LabeledDataset:
    """GTSRB, 43 classes, variable-size PPMs resized to 32×32. ``seed`` unused: official split."""
    import torchvision.datasets as tvd

    base = resolve_root(root)
    gdir = base / "gtsrb"
    expected = [gdir / "GTSRB" / "Training", gdir / "GTSRB" / "Final_Test" / "Images", gdir / "GT-final_test.csv"]

    def make(dl: bool) -> tuple[Any, Any]:
        return tvd.GTSRB(str(base), split="train", download=dl), tvd.GTSRB(str(base), split="test", download=dl)

    tr, te = fetch("gtsrb", base, download, expected, make)
    return _finish(
        "gtsrb", _pil_split(tr, GTSRB_SIZE), _pil_split(te, GTSRB_SIZE), GTSRB_CLASS_NAMES, root=str(base)
    )


@DATASETS.register("caltech256")
def caltech256(root: str | None = None, download: bool = False, seed: int = 0, size: int = 64) -> LabeledDataset:
    """Caltech-256 (257 folders incl. clutter), seeded 80/20 split, images ``size``×``size`` (KnockoffNets pool)."""
    import torchvision.datasets as tvd

    from .folder import load_image_folder

    base = resolve_root(root)
    folder = base / "caltech256" / "256_ObjectCategories"
    fetch("caltech256", base, download, [folder], lambda dl: tvd.Caltech256(str(base), download=dl) if dl else None)
    return load_image_folder(folder, size=size, seed=seed, name="caltech256")
