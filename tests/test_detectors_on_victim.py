"""The detectors against the embedded digits victim and real query streams (no Ray): what each catches and what each
lets through, with the benign clients the issue names (the victim's own test images, in random order, several keys).

Measured here (x86_64, 2 cores) with these streams: PRADA (delta 0.9) flags the JBA-like stream at query 130 (the
first test, at 100 distances) and no benign key (Shapiro-Wilk W 0.94-0.97 over 450 queries); it does not flag a
random natural-pool stream (W about 0.98 over 3,000 queries of the 20k 64x64 pool; the known blind spot the OOD-rate
monitor covers). The OOD-rate monitor calibrated on held-out in-distribution images flags the pool stream at its
first test (query 100) and no benign key; calibrated on the victim's *training* images it flags benign keys (the
victim is more confident on what it was trained on), so its threshold must come from held-out data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import jba_like

from distributed_me.data import EMBEDDED_POOL, load_dataset, load_pool, to_tensor
from distributed_me.defenses.detectors import OodRate, parse_detector
from distributed_me.victims import load_victim, victim_test_split
from distributed_me.victims.train import dataset_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def victim():
    return load_victim(None)


@pytest.fixture(scope="module")
def test_images(victim) -> np.ndarray:
    return victim_test_split(victim)[0].numpy()


def _probs(victim, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return victim.predict_probs(torch.from_numpy(x)).numpy()


def _first_flag(detector, victim, batches: list[np.ndarray]) -> int | None:
    """The query count at which ``detector`` first flags a key sending ``batches`` (one request each), or None."""
    probs = np.split(_probs(victim, np.concatenate(batches)), np.cumsum([len(b) for b in batches])[:-1])
    state = detector.new_state()
    for b, p in zip(batches, probs):
        verdict = detector.observe(state, b, p)
        if verdict.flagged:
            return verdict.flagged_at
    return None


def _benign(images: np.ndarray, key: int, per_request: int = 20) -> list[np.ndarray]:
    order = np.random.default_rng(key).permutation(len(images))
    return [images[order[i:i + per_request]] for i in range(0, len(order), per_request)]


def _pool_stream(victim, n: int, seed: int) -> list[np.ndarray]:
    pool = load_pool(EMBEDDED_POOL)
    c, s, _ = victim.input_shape
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    x = to_tensor(pool.get(idx, size=s, channels=c)).numpy()
    return [x[i:i + 50] for i in range(0, len(x), 50)]


def test_prada_flags_a_jba_stream_and_no_benign_key(victim, test_images):
    prada = parse_detector("prada")
    for seed in range(3):
        at = _first_flag(prada, victim, jba_like(test_images[10 * seed:10 * seed + 10], rounds=7, seed=seed))
        assert at is not None and at <= 200, (seed, at)
    for key in range(5):
        assert _first_flag(prada, victim, _benign(test_images, key)) is None, key


def test_ood_rate_calibrated_on_held_out_images_flags_a_natural_pool_stream_and_no_benign_key(victim, test_images):
    held_out, benign = test_images[: len(test_images) // 2], test_images[len(test_images) // 2:]
    detector = OodRate.calibrated(_probs(victim, held_out), fpr=0.05)
    for key in range(5):
        assert _first_flag(detector, victim, _benign(benign, key, per_request=15)) is None, key
    for seed in range(2):
        at = _first_flag(detector, victim, _pool_stream(victim, 1000, seed))
        assert at is not None and at <= 200, (seed, at)


def test_ood_rate_calibrated_on_training_images_is_too_strict_for_benign_keys(victim, test_images):
    """Why the calibration must use held-out data: the victim's confidence on its own training images is higher
    than on fresh in-distribution ones, so a threshold set there counts far more than 5% of benign queries OOD."""
    ds = load_dataset("digits")
    c, s, _ = victim.input_shape
    train = dataset_tensors(ds, "train", s, c)[0].numpy()
    detector = OodRate.calibrated(_probs(victim, train), fpr=0.05)
    flagged = [_first_flag(detector, victim, _benign(test_images, key)) for key in range(5)]
    assert all(f is not None for f in flagged), flagged
