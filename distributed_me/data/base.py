"""One interface for labeled datasets (victim tasks) and unlabeled query pools.

Images travel as uint8 NHWC arrays (RGB or grayscale with C=1) until the last moment; :func:`to_tensor` turns them into
float NCHW in [0, 1], which is what every model and the Oracle take. Normalization is *inside* the models (see
``models.NormalizedModel``) so an API client sends plain pixels, as with a real MLaaS API.

Resizing and channel conversion happen in exactly one place, :func:`adapt_images`, so any pool can serve as the query
pool of any victim.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


@dataclass
class ArraySplit:
    """A labeled split held in memory: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[idx], self.labels[idx])


@dataclass
class LabeledDataset:
    """A victim task: train and test splits, class names and the normalization its models use."""

    name: str
    train: ArraySplit
    test: ArraySplit
    class_names: list[str]
    normalization: Normalization
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the stored images."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


class Pool:
    """An unlabeled query pool: ``len(pool)`` images addressed by index, decoded lazily and in batches.

    Subclasses implement :meth:`_load` (uint8 NHWC for a sorted-or-not index array) and ``__len__``. Pools may carry
    labels for analysis (``labels`` or ``None``); attacks never see them.
    """

    name: str = "pool"
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def get(self, idx: np.ndarray | list[int], size: int | None = None, channels: int | None = None) -> np.ndarray:
        """Images at ``idx`` (uint8 NHWC), adapted to ``size``×``size`` and ``channels`` if given."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"pool index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        return adapt_images(self._load(idx), size, channels)

    def sample_ids(self) -> np.ndarray:
        """Stable ids of the samples, in index order: the index itself, except for pools with stored ids (Parquet)."""
        return np.arange(len(self), dtype=np.int64)

    def content_key(self) -> str:
        """A short content hash (size and 64 images spread over the pool), cached: keys feature caches, so a cached
        feature file is reused only for the same pool content, whatever the pool is called or stored as."""
        key = getattr(self, "_content_key", None)
        if key is None:
            import hashlib

            n = len(self)
            probe = np.unique(np.linspace(0, n - 1, num=min(n, 64)).astype(np.int64))
            h = hashlib.sha256(f"{n}".encode())
            for i in probe:
                h.update(self._load(np.array([i]))[0].tobytes())
            key = self._content_key = h.hexdigest()[:16]
        return key

    def iter_batches(
        self, batch_size: int = 256, idx: np.ndarray | None = None, size: int | None = None, channels: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` batches without holding the whole pool in memory."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield chunk, self.get(chunk, size, channels)


class ArrayPool(Pool):
    """A pool over an in-memory uint8 NHWC array (tests, the embedded default, a labeled dataset used unlabeled)."""

    def __init__(self, images: np.ndarray, name: str = "array", labels: np.ndarray | None = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"pool images must be uint8 NHWC, got {images.dtype} {images.shape}")
        self.images, self.name, self.labels = images, name, labels

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, idx: np.ndarray) -> np.ndarray:
        return self.images[idx]


def adapt_images(images: np.ndarray, size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Resize (bilinear, antialiased) and convert channels (RGB↔gray) of a uint8 NHWC batch. The one place for it."""
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    out = images
    if channels is not None and out.shape[-1] != channels:
        if channels == 1 and out.shape[-1] == 3:
            gray = out.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            out = np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
        elif channels == 3 and out.shape[-1] == 1:
            out = np.repeat(out, 3, axis=-1)
        else:
            raise ValueError(f"cannot convert {out.shape[-1]}-channel images to {channels} channels")
    if size is not None and (out.shape[1] != size or out.shape[2] != size) and len(out):
        t = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(out)


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or float NCHW already in [0, 1]) → float32 NCHW in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.permute(0, 3, 1, 2).float().div_(255.0)
        return images.float()
    if images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test index split from a seed."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
