"""The embedded default victim: scikit-learn's handwritten digits, a small CNN, trained once and cached.

It needs no download, trains in well under a minute on a laptop CPU, and scores ≥ 0.90 test accuracy, so that
``dme attack`` alone is a complete first experience.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import BundleError
from ..train import TrainConfig
from .bundle import Victim, load_bundle
from .store import cache_dir
from .train import train_victim

log = logging.getLogger(__name__)

EMBEDDED_VICTIM = "embedded"
EMBEDDED_DATASET = "digits"
EMBEDDED_ARCH = "cnn32"
EMBEDDED_IMG_SIZE = 16
#: bumped whenever what the victim is trained on changes, so a stale cached bundle is never served (2: trained on
#: half of the digits, the attacker's held-out quarter kept apart for the digits-unseen pool)
EMBEDDED_VERSION = 2
EMBEDDED_TRAIN = TrainConfig(epochs=30, batch_size=64, optimizer="adam", lr=1e-3, augment=True, seed=0)


def embedded_bundle_path() -> Path:
    name = f"{EMBEDDED_DATASET}-{EMBEDDED_ARCH}-{EMBEDDED_IMG_SIZE}px-seed0-v{EMBEDDED_VERSION}"
    return cache_dir() / "victims" / name


def embedded_victim(progress: bool = True) -> tuple[Victim, Path]:
    """Load the cached embedded victim, training it first if needed (or if the cache is corrupt)."""
    path = embedded_bundle_path()
    if path.exists():
        try:
            return load_bundle(path), path
        except BundleError as e:
            log.warning("cached embedded victim is unusable (%s); retraining", e)
    log.info("training the embedded victim (%s on %s) into %s", EMBEDDED_ARCH, EMBEDDED_DATASET, path)
    # train into a private folder and rename: concurrent first uses (tests, trials) never see a half-written bundle
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    victim, _ = train_victim(EMBEDDED_DATASET, EMBEDDED_ARCH, tmp, EMBEDDED_TRAIN, img_size=EMBEDDED_IMG_SIZE,
                             name="embedded-digits", progress=progress)
    try:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError:  # another process won the race: use its bundle
        shutil.rmtree(tmp, ignore_errors=True)
        return load_bundle(path), path
    return victim, path
