"""Model-side defenses (AdvFT, EWE) produce a new *version* of a victim: a bundle whose metadata names its parent
and the defense's parameters, in a folder keyed by both so that the same defense of the same parent lands in the
same place."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from ..victims.bundle import Victim, save_bundle


def save_defended_bundle(parent: Victim, model: nn.Module, defense: str, params: dict[str, Any],
                         test_accuracy: float, out: str | Path | None = None) -> Path:
    """Save ``model`` as a version of ``parent`` (default folder ``$DME_HOME/victims/<defense>/<parent sha>-<params
    hash>``), its ``train_config`` recording the defense, its parameters and the parent's hash and recipe."""
    from ..tracking import dme_home

    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    sha = parent.meta.weights_sha256
    dst = Path(out) if out is not None else dme_home() / "victims" / defense / f"{sha[:16]}-{digest}"
    meta = parent.meta.model_copy(update={
        "test_accuracy": test_accuracy,
        "train_config": {"defense": defense, "parent_weights_sha256": sha,
                         "parent_train_config": parent.meta.train_config, **params}})
    return save_bundle(dst, model, meta)
