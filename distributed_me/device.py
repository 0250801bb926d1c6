"""The one place that decides where tensors live: a CUDA GPU when there is one, the CPU otherwise.

``DME_DEVICE`` overrides the choice (e.g. ``cpu`` to keep a GPU free, ``cuda:1`` to pick a card).
"""

from __future__ import annotations

import os

import torch


def get_device() -> torch.device:
    override = os.environ.get("DME_DEVICE")
    if override:
        return torch.device(override)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for data order. Deterministic on CPU."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
