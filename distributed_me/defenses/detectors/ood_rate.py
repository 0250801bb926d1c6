"""A per-key out-of-distribution rate monitor: flags a client that sends the victim's model far more unfamiliar inputs
than its own users do.

Why: PRADA (:mod:`.prada`) looks at how close a client's queries are to each other, which separates synthetic query
streams from natural ones; an attacker who queries natural images from a public pool (KnockoffNets, Orekondy et al.
CVPR 2019; random/Copycat) sends a stream that looks natural by that measure. Atli et al. ("Extraction of Complex DNN
Models: Real Threat or Boogeyman?", 2020, arXiv 1910.05429) build a separate defense that tells Knockoff queries from
benign ones. What such a pool attacker cannot easily hide is that its images mostly lie outside the victim's task
distribution — the same observation B4B (Dubiński et al., "Bucks for Buckets", NeurIPS 2023) uses for encoders, where
a stealing client's answers cover far more of the embedding space than a legitimate client's. Here the cheapest
per-query OOD signal stands in for coverage: the maximum-softmax-probability baseline of Hendrycks & Gimpel (ICLR 2017,
"A Baseline for Detecting Misclassified and Out-of-Distribution Examples"), an input's OOD score being
``1 - max_k p_k`` of the victim's undefended probabilities.

Test: a query counts as OOD when its score exceeds ``threshold``. A benign client's queries are assumed to be
in-distribution, of which a fraction ``expected_rate`` is (wrongly) counted OOD. Over the key's last ``window``
queries (``n`` of them, ``k`` OOD), the key is flagged once ``n >= min_queries`` and the one-sided binomial tail
``P(X >= k | n, expected_rate)`` drops below ``alpha``. The score is that tail probability (NaN before
``min_queries``).

Threat model: black box, any response format (the detector reads the undefended probabilities on the server side);
per API key, so sybils that spread a pool over many keys each look benign; an attacker who filters its pool down to
images the victim is sure about evades it (and learns less about the decision boundaries).

Defaults and why: ``threshold`` 0.5 is a placeholder (a query the model gives less than even odds to its top class) —
calibrate it with :meth:`OodRate.calibrate` on the victim's held-out in-distribution probabilities, or build the
detector with :meth:`OodRate.calibrated`; ``expected_rate`` 0.05, the calibration's false-positive rate, i.e. the usual
operating point of OOD detectors (95% of in-distribution inputs accepted); ``window`` 1000 queries, so the test follows
a key's recent behaviour in 1 KB; ``min_queries`` 100, so a short burst of odd images is not enough; ``alpha`` 1e-4,
because the test is repeated after every query: by the union bound, a client exactly at ``expected_rate`` is flagged
with probability at most 10% per 1000 queries, and far less often when below it.

Edge cases: the tail is computed exactly (``scipy.stats.binom.sf``). A key whose in-distribution traffic is itself
unusual (a user of hard, ambiguous inputs) is flagged too: ``expected_rate`` must come from traffic like your users'.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from ...errors import DmeError
from .base import Detector, DetectorState, Ring, register_detector


def msp_ood_scores(probs: np.ndarray) -> np.ndarray:
    """Hendrycks & Gimpel's OOD score, ``1 - max softmax probability``, per row of ``probs`` (N, K)."""
    probs = np.asarray(probs, dtype=np.float64)
    return 1.0 - probs.max(axis=1) if len(probs) else np.zeros(0)


class OodRateState(DetectorState):
    kind: ClassVar[str] = "ood-rate"

    def __init__(self, window: int = 1000):
        super().__init__()
        self.bits = Ring(window, np.uint8)  # 1 = the query was counted OOD; newest last

    @property
    def window_counts(self) -> tuple[int, int]:
        """``(n, k)``: queries in the window and how many of them were OOD."""
        bits = self.bits.values()
        return len(bits), int(bits.sum())

    def _payload(self) -> dict[str, np.ndarray]:
        return {"bits": self.bits.values()}

    def _restore(self, arrays: dict[str, np.ndarray], detector: Any) -> None:
        self.bits = Ring.of(arrays["bits"], detector.window, np.uint8)

    def _owned_nbytes(self) -> int:
        return self.bits.nbytes


@register_detector
class OodRate(Detector):
    """Flags a key whose share of low-confidence (MSP-OOD) queries is significantly above the expected rate."""

    name: ClassVar[str] = "ood-rate"
    state_class: ClassVar[type[DetectorState]] = OodRateState
    threshold: float = Field(0.5, ge=0, le=1, description="MSP-OOD score (1 - max prob) above which a query is OOD")
    expected_rate: float = Field(0.05, gt=0, lt=1, description="share of benign queries counted OOD")
    window: int = Field(1000, ge=1, description="the test looks at this many most recent queries of a key")
    min_queries: int = Field(100, ge=1, description="no test before this many queries are in the window")
    alpha: float = Field(1e-4, gt=0, lt=1, description="flag when the binomial tail probability drops below this")

    @staticmethod
    def calibrate(in_dist_probs: np.ndarray, fpr: float = 0.05) -> float:
        """The threshold that counts a fraction ``fpr`` of ``in_dist_probs`` (N, K) as OOD: the
        ``floor(fpr · N)``-th largest score is the first one *not* counted (so exactly that many are, without ties)."""
        scores = np.sort(msp_ood_scores(in_dist_probs))
        if not 0 < fpr < 1:
            raise DmeError(f"ood-rate calibration: fpr = {fpr!r} must be in (0, 1)")
        if len(scores) == 0:
            raise DmeError("ood-rate calibration needs at least one in-distribution probability row")
        m = int(math.floor(fpr * len(scores)))
        return float(scores[len(scores) - 1 - m])

    @classmethod
    def calibrated(cls, in_dist_probs: np.ndarray, fpr: float = 0.05, **params: Any) -> OodRate:
        """A detector whose ``threshold`` is calibrated on ``in_dist_probs`` and whose ``expected_rate`` is ``fpr``."""
        return cls(threshold=cls.calibrate(in_dist_probs, fpr), expected_rate=fpr, **params)

    def new_state(self) -> OodRateState:
        return OodRateState(self.window)

    def _observe(self, state: OodRateState, images: np.ndarray, probs: np.ndarray) -> None:
        new = (msp_ood_scores(probs) > self.threshold).astype(np.int64)
        old = state.bits.values().astype(np.int64)
        history = np.concatenate([old, new])
        csum = np.concatenate([[0], np.cumsum(history)])
        ends = len(old) + 1 + np.arange(len(new))  # history[:end] is the stream up to each new query
        n = np.minimum(ends, self.window)
        k = csum[ends] - csum[ends - n]
        from scipy import stats  # lazy: scipy.stats costs ~2 s of import, and every spec validation imports this

        tail = np.where(n >= self.min_queries, stats.binom.sf(k - 1, n, self.expected_rate), np.nan)
        first = state.queries_seen
        state.bits.push(new)
        state.queries_seen += len(new)
        state.score = float(tail[-1])
        hits = np.flatnonzero(tail < self.alpha)  # NaN compares False
        if len(hits) and not state.flagged:
            i = int(hits[0])
            state.flag(self._line(int(k[i]), int(n[i]), float(tail[i]), "<"), at=first + i + 1)

    def _line(self, k: int, n: int, tail: float, op: str) -> str:
        return (f"ood-rate: {k} of the last {n} queries OOD (MSP score > {self.threshold:.4g}), "
                f"P(X >= {k} | n={n}, p={self.expected_rate}) = {tail:.3g} {op} alpha={self.alpha}")

    def _status(self, state: OodRateState) -> str:
        n, k = state.window_counts
        if n < self.min_queries:
            return f"ood-rate: {n} queries in the window, {self.min_queries} needed for the test"
        return self._line(k, n, state.score, ">=")
