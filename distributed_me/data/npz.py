"""Labeled datasets and query pools stored as ``.npz`` archives (the formats of ``/work/shared/data``).

Labeled format: ``images`` uint8 (N, H, W, 3) (or (N, H, W) grayscale), ``labels`` int (N,), optional
``class_names`` str (K,). Pool format: ``jpeg`` uint8 (total_bytes,) of concatenated JPEG files, ``offsets`` int64
(N+1,), optional ``labels``/``class_names``/``image_shape``. JPEG pools keep the compressed bytes in memory (27 MB for
20k images instead of 246 MB decoded) and decode only the images a request asks for.

Archives are opened without ``allow_pickle``: a data file must never be able to run code.
"""

from __future__ import annotations

import io
import logging
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ..errors import DataNotFound, DmeError
from .base import ArraySplit, LabeledDataset, Pool, adapt_images, split_indices
from .registry import log_loaded, normalization_from

log = logging.getLogger(__name__)
T = TypeVar("T")

UNSPLIT_TEST_FRACTION = 0.2
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npz(path: str | Path, read: Callable[[Any], T]) -> T:
    """Open ``path`` with ``np.load`` and apply ``read`` to it, turning any failure into a user-facing error.

    Missing → :class:`DataNotFound`; unreadable, truncated, pickled or missing a key → :class:`DmeError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFound(f"no such .npz file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return read(z)
    except DmeError:
        raise
    except _READ_ERRORS as exc:
        raise DmeError(
            f"cannot read {path} as a distributed_me .npz ({type(exc).__name__}: {exc}). Expected an np.savez archive "
            "with 'images' (uint8 N×H×W×3) and 'labels', or a JPEG pool with 'jpeg' and 'offsets'"
        ) from exc


def npz_keys(path: str | Path) -> list[str]:
    """The array names in an archive, without loading any of them."""
    return read_npz(path, lambda z: list(z.files))


def _require(z: Any, path: Path, *keys: str) -> None:
    missing = [k for k in keys if k not in z.files]
    if missing:
        raise DmeError(f"{path} lacks key(s) {missing}; it has {list(z.files)}")


def load_npz_split(path: str | Path) -> tuple[ArraySplit, list[str] | None]:
    """One labeled split and its class names (``None`` when the file stores none)."""
    path = Path(path)

    def read(z: Any) -> tuple[ArraySplit, list[str] | None]:
        _require(z, path, "images", "labels")
        images = np.asarray(z["images"])
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DmeError(f"{path}: 'images' must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
        names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
        return ArraySplit(images, np.asarray(z["labels"], dtype=np.int64)), names

    return read_npz(path, read)


def find_test_file(train_path: Path) -> Path | None:
    """The test file next to a ``*train*.npz``: ``train``→``test`` exactly, else ``<prefix>test*.npz`` via glob.

    ``cifar10_train_10k.npz`` finds ``cifar10_test_2k.npz``. ``None`` when the name has no ``train``. More than one
    glob match is ambiguous and an error (pass ``TRAIN.npz,TEST.npz``).
    """
    name = train_path.name
    if "train" not in name:
        return None
    exact = train_path.with_name(name.replace("train", "test"))
    if exact.is_file():
        return exact
    prefix = name[: name.rindex("train")]
    matches = sorted(p for p in train_path.parent.glob(f"{prefix}test*{train_path.suffix}") if p.is_file())
    if len(matches) > 1:
        raise DmeError(
            f"several test files match {train_path.parent / (prefix + 'test*' + train_path.suffix)}: "
            f"{[m.name for m in matches]}; give the pair explicitly as TRAIN.npz,TEST.npz"
        )
    if not matches:
        raise DataNotFound(
            f"no test file for {train_path}: looked for {exact.name} and {prefix}test*{train_path.suffix} in "
            f"{train_path.parent}; put it there or give the pair explicitly as TRAIN.npz,TEST.npz"
        )
    return matches[0]


def load_npz_dataset(
    train_path: str | Path, test_path: str | Path | None = None, seed: int = 0, name: str | None = None
) -> LabeledDataset:
    """A labeled dataset from a train ``.npz`` and its test ``.npz`` (found by :func:`find_test_file` if omitted).

    A file without ``train`` in its name and no explicit test file is split 80/20 deterministically from ``seed``.
    Normalization is computed from the train split (see :func:`~distributed_me.data.registry.normalization_from`).
    """
    train_path = Path(train_path).expanduser()
    train, names = load_npz_split(train_path)
    test_file = Path(test_path).expanduser() if test_path is not None else find_test_file(train_path)
    if test_file is None:
        tr, te = split_indices(len(train), UNSPLIT_TEST_FRACTION, seed)
        train, test = train.subset(tr), train.subset(te)
        split_note = f"seeded {1 - UNSPLIT_TEST_FRACTION:.0%}/{UNSPLIT_TEST_FRACTION:.0%} split (seed {seed})"
    else:
        test, test_names = load_npz_split(test_file)
        names = names or test_names
        if test.images.shape[1:] != train.images.shape[1:]:
            raise DmeError(
                f"{train_path} images are {train.images.shape[1:]} but {test_file} are {test.images.shape[1:]}"
            )
        split_note = "files"
    n_classes = int(max(train.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
    if names is None:
        names = [str(i) for i in range(n_classes)]
    elif n_classes > len(names):
        raise DmeError(f"{train_path}: labels go up to {n_classes - 1} but only {len(names)} class_names")
    if name is None:
        stem = train_path.stem
        name = stem[: stem.rindex("train")].strip("_-. ") if "train" in stem else stem
        name = name or stem
    ds = LabeledDataset(
        name=name,
        train=train,
        test=test,
        class_names=names,
        normalization=normalization_from(train.images),
        meta={
            "source": "npz",
            "train_file": str(train_path),
            "test_file": str(test_file or train_path),
            "split": split_note,
        },
    )
    log_loaded("dataset", name, train=len(train), test=len(test), classes=ds.num_classes, shape=ds.image_shape)
    return ds


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes → uint8 H×W×3 RGB (grayscale replicated, as ``.convert('RGB')`` does)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


class JpegNpzPool(Pool):
    """A pool of JPEG bytes (``jpeg`` + ``offsets``) decoded with Pillow only for the indices requested.

    The compressed bytes are read once at construction; :meth:`get` / :meth:`iter_batches` decode one request's worth
    of images at a time, so memory stays at one batch of decoded pixels however large the pool.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem

        def read(z: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[int, ...] | None, list[str] | None]:
            _require(z, self.path, "jpeg", "offsets")
            shape = tuple(int(v) for v in z["image_shape"]) if "image_shape" in z.files else None
            labels = np.asarray(z["labels"], dtype=np.int64) if "labels" in z.files else None
            names = [str(c) for c in z["class_names"]] if "class_names" in z.files else None
            return np.asarray(z["jpeg"], dtype=np.uint8), np.asarray(z["offsets"], dtype=np.int64), labels, shape, names

        self._buf, self._offsets, self.labels, shape, self.class_names = read_npz(self.path, read)
        if self._offsets.ndim != 1 or len(self._offsets) < 1 or self._offsets[-1] > len(self._buf):
            raise DmeError(f"{self.path}: 'offsets' must be N+1 increasing positions into 'jpeg'")
        if self.labels is not None and len(self.labels) != len(self):
            raise DmeError(f"{self.path}: {len(self.labels)} labels for {len(self)} images")
        self.image_shape = shape or (decode_image(self._bytes(0)).shape if len(self) else (0, 0, 3))
        log_loaded("pool", self.name, images=len(self), shape=self.image_shape, path=self.path)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _bytes(self, i: int) -> bytes:
        return self._buf[self._offsets[i] : self._offsets[i + 1]].tobytes()

    def _load(self, idx: np.ndarray) -> np.ndarray:
        h, w = self.image_shape[0], self.image_shape[1]
        out = np.empty((len(idx), h, w, 3), dtype=np.uint8)
        for j, i in enumerate(idx):
            try:
                img = decode_image(self._bytes(int(i)))
            except OSError as exc:  # Pillow's UnidentifiedImageError is an OSError
                raise DmeError(f"{self.path}: image {int(i)} is not a decodable JPEG ({exc})") from exc
            if img.shape[:2] != (h, w):  # odd one out: bring it to the pool's declared shape
                img = adapt_images(img[None], size=h)[0] if h == w else np.asarray(Image.fromarray(img).resize((w, h)))
            out[j] = img
        return out
