"""The dataset and pool registries, and the small helpers every loader shares.

Loaders register themselves with ``@DATASETS.register("name")`` / ``@POOLS.register("name")`` at import; the package
``__init__`` imports every loader module, so ``distributed_me.data.DATASETS`` is complete once the package is imported.

Shared here (rather than in each loader) so that every dataset gets the *same* root resolution, the same
normalization rule and the same missing-file message shape.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UnknownNameError
from ..registry import Registry
from .base import LabeledDataset, Normalization, Pool, split_indices

log = logging.getLogger(__name__)

DatasetLoader = Callable[..., LabeledDataset]
"""``loader(root: str | None, download: bool, seed: int) -> LabeledDataset``."""
PoolLoader = Callable[..., Pool]
"""``loader(root: str | None, download: bool, seed: int, **kw) -> Pool``."""

DATASETS: Registry[DatasetLoader] = Registry("dataset")
POOLS: Registry[PoolLoader] = Registry("pool")

DATA_ENV = "DME_DATA"


def default_root() -> Path:
    """Where downloaded / user-placed datasets live: ``$DME_DATA`` or ``~/.cache/distributed_me/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "distributed_me" / "data"


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """``root`` as a Path, or :func:`default_root` when ``None``/empty."""
    return Path(root).expanduser() if root else default_root()


def normalization_from(images: np.ndarray, chunk: int = 1024) -> Normalization:
    """Per-channel mean/std (in [0, 1] pixel units) of a uint8 NHWC array, computed in chunks.

    Why from the *train split at hand* rather than published constants: the victim's models standardize their input
    with these numbers, and the train split is the only data a model owner legitimately has. Computing them keeps them
    right for subsets, JPEG re-encodings, grayscale sets and any user-supplied ``.npz``/folder, and never leaks the test
    split. On the full official CIFAR-10 train set it reproduces the usual constants.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"need a non-empty NHWC array to compute normalization, got shape {images.shape}")
    c = images.shape[-1]
    total = np.zeros(c, dtype=np.float64)
    total_sq = np.zeros(c, dtype=np.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = np.asarray(images[start : start + chunk], dtype=np.float64).reshape(-1, c) / 255.0
        total += x.sum(axis=0)
        total_sq += np.square(x).sum(axis=0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel: leave it unscaled rather than divide by ~0
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class train/test split (sorted index arrays), built on :func:`split_indices`.

    Per class so that small classes keep their share in both splits; each class gets its own seed derived from
    ``(seed, class)`` so classes do not share a permutation stream.
    """
    labels = np.asarray(labels)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        class_seed = int(np.random.SeedSequence([int(seed), int(c)]).generate_state(1)[0])
        tr, te = split_indices(len(members), test_fraction, class_seed)
        train.append(members[tr])
        test.append(members[te])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
    )


def unknown_spec(kind: str, spec: str, valid: list[str], hint: str) -> UnknownNameError:
    """An :class:`UnknownNameError` whose message also says which paths are accepted."""
    err = UnknownNameError(kind, spec, valid)
    err.args = (f"{err.args[0]}; {hint}",)
    return err


def log_loaded(what: str, name: str, **info: Any) -> None:
    """One uniform log line per loaded dataset/pool."""
    log.info("loaded %s %s (%s)", what, name, ", ".join(f"{k}={v}" for k, v in info.items()))
