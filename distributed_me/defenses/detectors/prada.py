"""PRADA: Juuti, Szyller, Marchal, Asokan, "PRADA: Protecting against DNN Model Stealing Attacks" (IEEE EuroS&P 2019,
§IV and Algorithm 1; arXiv 1805.02628), as the authors' reference implementation does it
(SSGAalto/prada-protecting-against-dnn-model-stealing-attacks, ``src/growing_set.py``, ``src/modes.py``).

What it stops: extraction with *synthetic* queries (Papernot et al.'s Jacobian-based augmentation and the paper's
own synthetic-sample variants). Such queries are small steps away from earlier ones, so the distance from a
new query to the client's earlier queries is not distributed the way it is for a stream of natural images, which PRADA
expects to be roughly normal. Threat model: a black-box client, any response format (the detector reads the victim's
own top-1 class, whatever the API reveals); the state is per API key, so an attacker spreading queries over many keys
(sybils) is seen as many short streams.

Per key and per predicted class ``c`` (argmax of the undefended probabilities), a *growing set* ``G_c`` of earlier
queries and a threshold ``T_c``; one list ``D`` of distances. For each query ``x`` of class ``c``, in order:

1. ``G_c`` empty: ``x`` joins ``G_c`` and ``D_Gc = [0]`` (the reference implementation's seed value); no distance.
2. Otherwise ``d = min_{y in G_c} ||x - y||_2`` joins ``D``; if ``d > T_c``, ``x`` joins ``G_c``, ``d`` joins ``D_Gc``
   and ``T_c = max(T_c, mean(D_Gc) - std(D_Gc))`` (population std; ``T_c`` starts at 0 and never decreases).
3. Every ``check_every`` queries: the distances of classes with at least ``min_class_distances`` of them, minus those
   ``outlier_std`` standard deviations or further from their mean, are tested; if more than ``min_distances`` remain,
   Shapiro–Wilk's ``W`` is computed and the key is flagged when ``W < delta``.

Steps 1, 3 (every 10 queries, per-class minimum of 10, the 3-std outlier cut, more than 100 distances) and the monotone
threshold are the reference implementation's; its flag is recomputed at every check, ours is sticky (see
:mod:`.base`), and it tests before counting the query (queries 1, 11, 21, …) where we test after (10, 20, …).

Distance space: the flattened image as the API receives it, float32 in [0, 1]. The reference implementation uses the
raw decoded image (0–255); the two differ by a global scale, to which ``W`` (scale-invariant) and the thresholds
(scale-equivariant) are blind.

Parameters and defaults: ``delta`` 0.9 — the value the reference implementation serves with (``src/main.py``); the
right ``delta`` depends on the data, so calibrate it on benign traffic of your victim: a lower ``delta`` means fewer
false alarms and later detection. ``min_distances`` 100, ``min_class_distances`` 10, ``outlier_std`` 3.0,
``check_every`` 10: the reference implementation's.

Memory bound (ours; the paper's sets grow without bound). ``max_kept`` (default 1000) images in all growing sets of a
key together: about ``max_kept × C·H·W × 4`` bytes (12.3 MB for 3×32×32 inputs; lower it for large inputs). When full,
the oldest member of the largest ``G_c`` (ties: lowest class index) makes room, so one flooded class never evicts
another's members. A class whose set was emptied this way restarts at step 1 but keeps its ``T_c`` and ``D_Gc``
statistics, which are running sums (count, mean, squared deviations: three numbers per class) and so need no cap. ``D``
keeps the newest ``max_distances`` (default 5000, the size up to which scipy's Shapiro–Wilk is accurate); the test
then looks at the key's recent behaviour. Everything else is O(number of classes).

Edge cases: a query that repeats a member of ``G_c`` has ``d = 0``, which counts in ``D`` (as in the reference).
Distances that are all equal after the outlier cut (one image sent again and again) have no defined ``W``: no test,
score NaN. All requests of a key must have the same image size (a ``ValueError`` otherwise).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from .base import Detector, DetectorState, Ring, register_detector


class PradaState(DetectorState):
    kind: ClassVar[str] = "prada"

    def __init__(self, max_distances: int = 5000):
        super().__init__()
        self.g = np.zeros((0, 0), np.float32)  # growing-set buffer; rows [0, g_used) are in use
        self.g_class = np.zeros(0, np.int64)
        self.g_seq = np.zeros(0, np.int64)  # insertion order, for eviction
        self.g_used = 0
        self.next_seq = 0
        # per class: count, mean and sum of squared deviations of D_Gc (Welford), and the threshold T_c
        self.gd_n = np.zeros(0, np.int64)
        self.gd_mean = np.zeros(0, np.float64)
        self.gd_m2 = np.zeros(0, np.float64)
        self.thr = np.zeros(0, np.float64)
        self.d_val = Ring(max_distances, np.float64)
        self.d_class = Ring(max_distances, np.int64)
        self.tested = 0  # distances in the last Shapiro-Wilk test

    @property
    def n_features(self) -> int:
        return self.g.shape[1]

    def growing_set(self, c: int) -> np.ndarray:
        """``G_c``, oldest first (a copy)."""
        rows = np.flatnonzero(self.g_class[: self.g_used] == c)
        return self.g[rows[np.argsort(self.g_seq[rows])]].copy()

    def distances(self) -> np.ndarray:
        """``D``, oldest first."""
        return self.d_val.values()

    def _payload(self) -> dict[str, np.ndarray]:
        used = self.g_used
        return {"g": self.g[:used], "g_class": self.g_class[:used], "g_seq": self.g_seq[:used],
                "next_seq": np.array(self.next_seq, np.int64), "gd_n": self.gd_n, "gd_mean": self.gd_mean,
                "gd_m2": self.gd_m2, "thr": self.thr, "d_val": self.d_val.values(), "d_class": self.d_class.values(),
                "tested": np.array(self.tested, np.int64)}

    def _restore(self, arrays: dict[str, np.ndarray], detector: Any) -> None:
        keep = np.argsort(arrays["g_seq"], kind="stable")[-detector.max_kept:]  # a tighter bound keeps the newest
        keep.sort()
        self.g = np.ascontiguousarray(arrays["g"][keep], np.float32)
        self.g_class = arrays["g_class"][keep].astype(np.int64)
        self.g_seq = arrays["g_seq"][keep].astype(np.int64)
        self.g_used = len(keep)
        self.next_seq = int(arrays["next_seq"])
        for k in ("gd_n", "gd_mean", "gd_m2", "thr"):
            setattr(self, k, arrays[k].copy())
        self.d_val = Ring.of(arrays["d_val"], detector.max_distances, np.float64)
        self.d_class = Ring.of(arrays["d_class"], detector.max_distances, np.int64)
        self.tested = int(arrays["tested"])

    def _owned_nbytes(self) -> int:
        arrays = (self.g, self.g_class, self.g_seq, self.gd_n, self.gd_mean, self.gd_m2, self.thr)
        return sum(a.nbytes for a in arrays) + self.d_val.nbytes + self.d_class.nbytes


@register_detector
class Prada(Detector):
    """PRADA (Juuti et al., EuroS&P 2019): flags a key whose query-distance distribution is not normal."""

    name: ClassVar[str] = "prada"
    state_class: ClassVar[type[DetectorState]] = PradaState
    delta: float = Field(0.9, gt=0, le=1, description="flag when Shapiro-Wilk W falls below this")
    min_distances: int = Field(100, ge=2, description="W is computed once more than this many distances remain")
    min_class_distances: int = Field(10, ge=1, description="a class's distances are tested once it has this many")
    outlier_std: float = Field(3.0, gt=0, description="distances this many std from the mean are left out of the test")
    check_every: int = Field(10, ge=1, description="run the test every this many queries")
    max_kept: int = Field(1000, ge=1, description="growing-set images kept per key, all classes together")
    max_distances: int = Field(5000, ge=3, description="newest distances kept per key for the test")

    def new_state(self) -> PradaState:
        return PradaState(self.max_distances)

    def _observe(self, state: PradaState, images: np.ndarray, probs: np.ndarray) -> None:
        flat = np.ascontiguousarray(images.reshape(len(images), -1), np.float32)
        if state.g_used and flat.shape[1] != state.n_features:
            raise ValueError(f"prada: images of {flat.shape[1]} values, this key's earlier ones had {state.n_features}")
        self._grow_classes(state, probs.shape[1])
        for x, c in zip(flat, probs.argmax(axis=1)):
            self._one(state, x, int(c))
            state.queries_seen += 1
            if state.queries_seen % self.check_every == 0:
                self._check(state)

    @staticmethod
    def _grow_classes(state: PradaState, k: int) -> None:
        extra = k - len(state.thr)
        if extra > 0:
            state.gd_n = np.concatenate([state.gd_n, np.zeros(extra, np.int64)])
            for name in ("gd_mean", "gd_m2", "thr"):
                setattr(state, name, np.concatenate([getattr(state, name), np.zeros(extra)]))

    def _one(self, state: PradaState, x: np.ndarray, c: int) -> None:
        rows = np.flatnonzero(state.g_class[: state.g_used] == c)
        if len(rows) == 0:
            self._add(state, x, c)
            if state.gd_n[c] == 0:  # first member ever: D_Gc = [0], T_c = 0
                state.gd_n[c], state.gd_mean[c], state.gd_m2[c] = 1, 0.0, 0.0
            return
        diff = state.g[rows] - x
        d = float(np.sqrt(np.einsum("ij,ij->i", diff, diff).min()))
        state.d_val.push([d])
        state.d_class.push([c])
        if d > state.thr[c]:
            self._add(state, x, c)
            n = state.gd_n[c] + 1
            step = d - state.gd_mean[c]
            state.gd_mean[c] += step / n
            state.gd_m2[c] += step * (d - state.gd_mean[c])
            state.gd_n[c] = n
            std = math.sqrt(max(state.gd_m2[c], 0.0) / n)
            state.thr[c] = max(state.thr[c], state.gd_mean[c] - std)

    def _add(self, state: PradaState, x: np.ndarray, c: int) -> None:
        if state.g_used < self.max_kept:
            if state.g_used == len(state.g):
                cap = min(self.max_kept, max(16, 2 * len(state.g)))
                g = np.zeros((cap, len(x)), np.float32)
                if state.g_used:
                    g[: state.g_used] = state.g[: state.g_used]
                state.g = g
                state.g_class = np.concatenate([state.g_class, np.full(cap - len(state.g_class), -1, np.int64)])
                state.g_seq = np.concatenate([state.g_seq, np.zeros(cap - len(state.g_seq), np.int64)])
            slot = state.g_used
            state.g_used += 1
        else:  # full: the oldest member of the largest class makes room
            classes = state.g_class[: state.g_used]
            largest = int(np.bincount(classes).argmax())
            rows = np.flatnonzero(classes == largest)
            slot = int(rows[np.argmin(state.g_seq[rows])])
        state.g[slot], state.g_class[slot], state.g_seq[slot] = x, c, state.next_seq
        state.next_seq += 1

    def _check(self, state: PradaState) -> None:
        vals, classes = state.d_val.values(), state.d_class.values()
        if len(vals):
            vals = vals[np.bincount(classes)[classes] >= self.min_class_distances]
        if len(vals):
            vals = vals[np.abs(vals - vals.mean()) < self.outlier_std * vals.std()]
        state.tested = len(vals)
        if len(vals) <= self.min_distances or np.ptp(vals) == 0:
            state.score = math.nan
            return
        from scipy import stats  # lazy: scipy.stats costs ~2 s of import, and every spec validation imports this

        with warnings.catch_warnings():  # scipy warns that the p-value is approximate above 5000: W is what we use
            warnings.simplefilter("ignore")
            w = float(stats.shapiro(vals).statistic)
        state.score = w
        if w < self.delta:
            state.flag(f"PRADA: Shapiro-Wilk W={w:.3f} < delta={self.delta} over {len(vals)} distances")

    def _status(self, state: PradaState) -> str:
        if math.isnan(state.score):
            return (f"PRADA: {state.tested} distances tested, more than {self.min_distances} (with spread) needed for "
                    f"the Shapiro-Wilk test")
        return f"PRADA: Shapiro-Wilk W={state.score:.3f} >= delta={self.delta} over {state.tested} distances"
