"""DAWN, dynamic adversarial watermarking: Szyller, Atli, Marchal, Asokan, "DAWN: Dynamic Adversarial Watermarking
of Neural Networks" (ACM MM 2021, arXiv 1906.00830). The paper's text was not available here; what follows is
checked against the authors' code (ssg-research/dawn-dynamic-adversarial-watermarking-of-neural-networks,
``filter.py`` ``WatermarkFilter``, ``environment.py`` ``another_label``, ``noisy_verification.py``).

Threat model: the attacker trains a clone on the API's answers. The API answers a small, keyed, deterministic
fraction of queries with a wrong label and keeps those (query, wrong label) pairs per client: its *watermark set*.
A clone trained on the answers learns some of the wrong labels; a model trained without them agrees with them only
by chance. Every answer counts as usual: a watermarked query is a paid query like any other.

Per answered image, with the deployment's secret ``s`` (the ``dawn`` kit, ``dme defense train --defense dawn``) and
the client's stream ``c`` (behind Serve, the API key's salted fingerprint): ``h = HMAC-SHA256(s, c ‖ image bytes)``.

- **Selection**: watermarked iff ``int(h[0:8]) < r · 2⁶⁴`` (``rate`` r, default 0.005: ``filter.py``
  ``probability = 5 / 1000``). The code compares the first 16 bits with ``floor(2¹⁶ r)`` using ``<=``, which makes
  the rate ``(floor(2¹⁶ r) + 1) / 2¹⁶`` (0.50 % for r = 0.005); 64 bits make it r. The code hashes the image only
  under one key per model; the stream in the message makes the selection, and so the watermark set, per client,
  as the paper's per-client sets are.
- **Wrong label**: ``(t + 1 + int(h[8:16]) mod (K − 1)) mod K`` for the victim's top class ``t``: uniform over the
  other K − 1 classes and deterministic, so a repeated query gets the same answer (the code draws a random label
  other than the true one, once per watermark sample, ``another_label``; the API does not know the true label, so the
  victim's own top class is the one excluded).
- **Answer**: the probability vector with the victim's top class and the wrong class swapped (our choice: the answer
  stays a probability vector the victim could have given, with the wrong class on top; label-only APIs see the
  wrong label).
- **Evidence**: each watermarked (image, wrong label) goes to the chain's *watermark sink*; behind Serve, files under
  ``<query_log>/watermarks/<victim>/<stream>/``, which ``dme verify`` reads.

**Verification** (:func:`binomial_pvalue`): the code measures the suspect's agreement with the watermark labels and
gives no test. Ours: the wrong label is uniform over the K − 1 classes other than the victim's top class and,
through the HMAC, independent of any model that never saw the answers; whatever such a model predicts, it matches a
watermark label with probability at most ``1 / (K − 1)``. So under H0 "the suspect was not trained on these
answers", the matches over ``n`` watermark samples are stochastically below ``Binomial(n, 1/(K − 1))``, and
``P(Binomial(n, 1/(K − 1)) ≥ matches)`` is a valid p-value, with no calibration set.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import uuid
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from pydantic import Field

from .kits import KitInputs, register_kit
from .policies import OutputPolicy, PolicyContext, RowStreams, register_policy

log = logging.getLogger(__name__)

#: share of answers watermarked (``filter.py``: ``probability = 5 / 1000``)
DAWN_RATE = 0.005
SECRET_FILE = "secret.bin"
#: the sink's folder under a deployment's query log
WATERMARK_DIR = "watermarks"


def dawn_digests(secret: bytes, stream: str, images: np.ndarray) -> list[bytes]:
    """``HMAC-SHA256(secret, stream ‖ image bytes)`` per image (float32 C-order bytes, as served)."""
    prefix = stream.encode() + b"\0"
    rows = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return [hmac.new(secret, prefix + r.tobytes(), hashlib.sha256).digest() for r in rows]


def dawn_marks(secret: bytes, stream: str, images: np.ndarray, top: np.ndarray, num_classes: int,
               rate: float = DAWN_RATE) -> tuple[np.ndarray, np.ndarray]:
    """``(selected, wrong_label)`` per image (module docstring); ``wrong_label`` is meaningful where selected."""
    bound = int(rate * 2**64)
    digests = dawn_digests(secret, stream, images)
    selected = np.array([int.from_bytes(d[:8], "big") < bound for d in digests], dtype=bool)
    offsets = np.array([1 + int.from_bytes(d[8:16], "big") % (num_classes - 1) for d in digests], dtype=np.int64)
    return selected, (np.asarray(top, dtype=np.int64) + offsets) % num_classes


class WatermarkSink(Protocol):
    """Where a watermarking policy records what it marked: the owner's evidence, per client stream."""

    def record(self, stream: str, images: np.ndarray, labels: np.ndarray) -> None: ...


class FolderSink:
    """Watermark sets as files: ``ROOT/<stream or "_">/<time>-<uuid>.npz`` (``images`` float32 NCHW, ``labels``),
    each written whole (temporary name, then rename), so concurrent replicas and a crash leave no partial record."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def record(self, stream: str, images: np.ndarray, labels: np.ndarray) -> None:
        if not len(images):
            return
        folder = self.root / (stream or "_")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{int(np.datetime64('now', 'ms').astype(np.int64))}-{uuid.uuid4().hex}"
        tmp = folder / f".{name}.tmp.npz"
        np.savez(tmp, images=np.asarray(images, np.float32), labels=np.asarray(labels, np.int64))
        os.replace(tmp, folder / f"{name}.npz")


def load_watermarks(root: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every stream's watermark set under a :class:`FolderSink` root: ``stream → (images, labels)``, repeats of one
    image (a client that sent it twice) counted once."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    root = Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        parts = [np.load(f, allow_pickle=False) for f in sorted(folder.glob("*.npz")) if not f.name.startswith(".")]
        if not parts:
            continue
        images = np.concatenate([p["images"] for p in parts])
        labels = np.concatenate([p["labels"] for p in parts])
        _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
        keep = np.sort(first)
        out[folder.name] = (images[keep], labels[keep])
    return out


def binomial_tail(matches: int, n: int, p0: float) -> float:
    """``P(Binomial(n, p0) ≥ matches)``: the chance that a model unrelated to the owner's answers matches at least
    ``matches`` of ``n`` marks when each matches with probability ``p0`` (1.0 when there are no marks)."""
    from scipy.stats import binom

    return 1.0 if n == 0 else float(binom.sf(matches - 1, n, p0))


def binomial_pvalue(matches: int, n: int, num_classes: int) -> float:
    """``P(Binomial(n, 1/(K − 1)) ≥ matches)``: the p-value of ``matches`` agreements with ``n`` watermark labels
    under H0 (module docstring)."""
    return binomial_tail(matches, n, 1.0 / (num_classes - 1))


@register_policy
class Dawn(OutputPolicy):
    """DAWN (Szyller et al., ACM MM 2021): a keyed, deterministic ``rate`` of answers per client gets a wrong label,
    recorded as that client's watermark set (see :mod:`distributed_me.defenses.dawn`). Needs ``dme defense train
    --defense dawn`` (the secret); ``dme verify`` reads the records.

    The evidence is only as good as the clone's fit of its own queries. Measured on the embedded digits victim at
    rate 0.1: a CNN32 clone trained 30 epochs without augmentation on 800 queries matched 64 of its 84 marks
    (p = 9e-44; five CNN32s trained on the digits themselves: p = 0.33 to 0.999); at rate 0.05, with the attack's
    default augmentation, 20 epochs and 2,000 queries, the clone matched 7 of 107 (p = 0.96): augmentation keeps
    a clone from memorizing single answers, and DAWN then proves nothing."""

    name: ClassVar[str] = "dawn"
    preserves_argmax: ClassVar[bool] = False
    needs_kit: ClassVar[str | None] = "dawn"
    needs_sink: ClassVar[bool] = True
    rate: float = Field(DAWN_RATE, gt=0, le=1, description="share of answers watermarked")

    def apply(self, scores: np.ndarray, rng: RowStreams, ctx: PolicyContext) -> np.ndarray:
        if ctx.images is None:
            raise ValueError("dawn needs the queried images: they are both the hash input and the evidence")
        secret = ctx.kits["dawn"].blob(SECRET_FILE)
        top = scores.argmax(axis=1)
        selected, wrong = dawn_marks(secret, ctx.stream, ctx.images, top, scores.shape[1], self.rate)
        out = np.array(scores, dtype=np.float32, copy=True)
        rows = np.flatnonzero(selected)
        out[rows, top[rows]], out[rows, wrong[rows]] = scores[rows, wrong[rows]], scores[rows, top[rows]]
        if len(rows) and ctx.sink is not None:
            ctx.sink.record(ctx.stream, ctx.images[rows], wrong[rows])
        return out


@register_kit("dawn")
def build_dawn_kit(inputs: KitInputs, out: Path) -> dict:
    """DAWN's kit: the deployment's secret HMAC key (32 random bytes; ``filter.py`` uses a 256-character key). Not
    derived from the seed: a key that can be recomputed is not a secret."""
    (out / SECRET_FILE).write_bytes(os.urandom(32))
    os.chmod(out / SECRET_FILE, 0o600)
    return {"secret": SECRET_FILE, "metrics": {}}


__all__ = ["DAWN_RATE", "FolderSink", "WatermarkSink", "binomial_pvalue", "binomial_tail",
           "dawn_marks", "load_watermarks"]
