"""ModelGuard: Tang, Dai, DiValentin, Ding, Hassanzadeh, Li, Chen, "ModelGuard: Information-Theoretic Defense
Against Model Extraction Attacks" (USENIX Security 2024). The paper's text was not available here; both variants are
implemented from the authors' code, ``Yoruko-Tang/ModelGuard`` (``defenses/victim/mld.py`` for ModelGuard-W,
``defenses/victim/quantize.py`` for ModelGuard-S) and its README's commands, which give the defaults.

Threat model: as MAD's, the attacker sees the full probability vector and trains a clone on it. ModelGuard bounds the
defender's utility loss per answer (``||y' − y||₁ ≤ ε``, top-1 class kept) and spends that budget on making the
answers as little informative as possible to the clone. Neither variant needs a trained artifact (MAD needs a
surrogate; ModelGuard does not).

**ModelGuard-W** (``mld.py``, class ``MLD``; README "g. ModelGuard-W": ``strat=mld``, ``eps=1.0``): for each answer, the
linear program ::

    minimize    Σ_j log(y_j + 1e-6) · y'_j
    subject to  y' ∈ Δ (0 ≤ y'_j ≤ 1, Σ_j y'_j = 1),   Σ_j |y'_j − y_j| ≤ ε,   y'_t − y'_j ≥ 1e-4  ∀ j ≠ t = argmax y

i.e. the answer within the ε-ball that maximizes the cross-entropy against the victim's own posterior: probability
mass moves from the likely classes to the unlikely ones until the budget or the top-1 margin binds. The authors solve
it one row at a time with PuLP/CBC; we solve a whole batch as one block-diagonal LP with SciPy's HiGHS (the same
constraints, so the same optimum; a row HiGHS cannot solve is answered unperturbed and logged). The argmax margin is
always on in the code (no switch), so it is always on here. ``batch_constraint`` (one budget for a batch) is not
offered: an MLaaS batch is an accident of request merging, so a per-answer budget is the only one a client can rely on.

**ModelGuard-S** (``quantize.py``, class ``incremental_kmeans``; README "h. ModelGuard-S": ``quantize=1``,
``quantize_epsilon=1.0``, ``ordered_quantization=1``, ``optim=0``): online vector quantization, so that the answers
carry few distinct values (the paper frames it as limiting the mutual information of query and answer; a deterministic
map's mutual information is its output's entropy). One codebook per top-1 class; each answer, in arrival order, is the
*first* codeword of its class within ``ε`` in L1 (first, not nearest: a repeated query gets the same answer), or, when
none is, becomes a new codeword itself. Because a class's codebook holds only vectors with that top class, the top-1
label is kept.

Our choices where the code is silent, all visible:

- ModelGuard-S's codebook is the state of one policy instance: one per Serve replica (a deployment with several
  replicas keeps several codebooks; each answer still lies within ε of the victim's) and it starts empty after a
  restart, as the authors' quantizer does on each start (``trainingset_name`` pre-seeding is not offered). It is
  shared by all clients of the replica, as in the code (a per-key codebook would hand each Sybil key a fresh one).
- The codebook is bounded (``max_codewords`` per class, default 4096; the code is unbounded): once a class's book is
  full, a row with no codeword within ε is answered unquantized (its utility bound kept) and a warning is logged once.
- ``optim=1`` (new codewords sampled from a Dirichlet) and the non-ordered / k-means modes are not offered.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

import numpy as np
from pydantic import Field, PrivateAttr

from .policies import OutputPolicy, RowStreams, register_policy

log = logging.getLogger(__name__)

#: per-answer L1 utility budget of both variants (authors' README: ``eps=1.0``, ``quantize_epsilon=1.0``)
MODELGUARD_EPSILON = 1.0
#: the top class must beat every other by this much (``mld.py``: ``ys[i][max_idx] - ys[i][j] >= 1e-4``)
ARGMAX_MARGIN = 1e-4
#: added inside the objective's log (``mld.py``: ``torch.log(y + 1e-6)``)
LOG_OFFSET = 1e-6
#: ModelGuard-S codewords per top-1 class (ours: the code keeps every one)
MAX_CODEWORDS = 4096


def modelguard_w(y: np.ndarray, eps: float = MODELGUARD_EPSILON, margin: float = ARGMAX_MARGIN) -> np.ndarray:
    """ModelGuard-W's answers for probability rows ``y`` (N, K): the LP of the module docstring, one block per row.

    Variables per row: ``y'`` (K) then the slacks ``z`` (K) with ``z_j ≥ |y'_j − y_j|``.
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    y = np.asarray(y, dtype=np.float64)
    n, k = y.shape
    if n == 0 or k < 2 or eps <= 0:
        return y.copy()
    top = y.argmax(axis=1)
    v = 2 * k  # variables per row
    rows, cols, vals, b_ub = [], [], [], []
    r = 0
    for i in range(n):  # the constraint pattern is the same for every row but the top class's column
        o = i * v
        j = np.arange(k)
        rows += [r + j, r + j, r + k + j, r + k + j]  # y'_j − z_j ≤ y_j ;  −y'_j − z_j ≤ −y_j
        cols += [o + j, o + k + j, o + j, o + k + j]
        vals += [np.ones(k), -np.ones(k), -np.ones(k), -np.ones(k)]
        b_ub += [y[i], -y[i]]
        r += 2 * k
        rows.append(np.full(k, r))  # Σ z_j ≤ ε
        cols.append(o + k + j)
        vals.append(np.ones(k))
        b_ub.append([eps])
        r += 1
        others = j[j != top[i]]  # y'_j − y'_t ≤ −margin
        rr = r + np.arange(k - 1)
        rows += [rr, rr]
        cols += [o + others, np.full(k - 1, o + top[i])]
        vals += [np.ones(k - 1), -np.ones(k - 1)]
        b_ub.append(np.full(k - 1, -margin))
        r += k - 1
    a_ub = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n * v))
    y_cols = (np.arange(n)[:, None] * v + np.arange(k)).ravel()  # Σ_j y'_j = 1, one row per answer
    a_eq = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), y_cols)), shape=(n, n * v))
    c = np.concatenate([np.concatenate([np.log(y[i] + LOG_OFFSET), np.zeros(k)]) for i in range(n)])
    bounds = np.tile(np.r_[np.ones(k), np.full(k, np.inf)], n)
    res = linprog(c, A_ub=a_ub.tocsr(), b_ub=np.concatenate(b_ub), A_eq=a_eq.tocsr(), b_eq=np.ones(n),
                  bounds=np.stack([np.zeros(n * v), bounds], axis=1), method="highs")
    if res.status == 0:
        out = res.x.reshape(n, v)[:, :k]
        return np.clip(out, 0.0, 1.0)
    if n == 1:
        log.warning("ModelGuard-W: no solution for a row (%s); answered unperturbed", res.message)
        return y.copy()
    # one unsolvable row (a top-1 tie wider than ε can repair) fails the batch: solve row by row
    return np.concatenate([modelguard_w(y[i : i + 1], eps, margin) for i in range(n)])


@register_policy
class ModelGuardW(OutputPolicy):
    """ModelGuard-W (Tang et al., USENIX Security 2024): the most uninformative answer within ``eps`` of the victim's in
    L1, top-1 kept; a linear program per answer (see :mod:`distributed_me.defenses.modelguard`).

    Because the top-1 is kept, an attacker who trains on each answer's label (``targets: labels``) gets exactly what a
    label-only API gives: measured on the embedded digits victim (random queries from the photo pool, 1000 queries,
    CNN32, 20 epochs, seed 0), fidelity 0.151 for the soft-label attacker, 0.447 for the label attacker, 0.447 under
    the ``label`` policy and 0.484 undefended. Its protection against an adaptive attacker is the label-only API's."""

    name: ClassVar[str] = "modelguard-w"
    eps: float = Field(MODELGUARD_EPSILON, gt=0, le=2, description="utility budget ||y' - y||_1 per answer")

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        return modelguard_w(scores, self.eps).astype(np.float32)


@register_policy
class ModelGuardS(OutputPolicy):
    """ModelGuard-S (Tang et al., USENIX Security 2024): answers quantized online to a codebook per top-1 class, the
    first codeword within ``eps`` in L1 (see :mod:`distributed_me.defenses.modelguard`). Stateful: the codebook
    grows with the stream of answers this instance gives."""

    name: ClassVar[str] = "modelguard-s"
    eps: float = Field(MODELGUARD_EPSILON, gt=0, le=2, description="quantization radius in L1 (the utility budget)")
    max_codewords: int = Field(MAX_CODEWORDS, ge=1, description="codewords kept per top-1 class")
    #: one lock for every instance (an instance must stay picklable: Serve and Tune ship chains to workers)
    _LOCK: ClassVar[threading.Lock] = threading.Lock()
    _books: dict[int, np.ndarray] = PrivateAttr(default_factory=dict)
    _warned: bool = PrivateAttr(default=False)

    def codewords(self) -> dict[int, int]:
        """Codewords per top-1 class so far."""
        return {c: len(b) for c, b in self._books.items()}

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float32)
        out = scores.copy()
        with self._LOCK:  # rows in arrival order: the codebook is the stream's, not the batch's
            for i, row in enumerate(scores):
                c = int(row.argmax())
                book = self._books.get(c)
                if book is not None:
                    within = np.flatnonzero(np.abs(book - row).sum(axis=1) <= self.eps)
                    if len(within):
                        out[i] = book[within[0]]
                        continue
                if book is None:
                    self._books[c] = row[None].copy()
                elif len(book) < self.max_codewords:
                    self._books[c] = np.concatenate([book, row[None]])
                elif not self._warned:
                    self._warned = True
                    log.warning("ModelGuard-S: class %d's codebook is full (%d codewords); rows without a codeword "
                                "within eps=%s are answered unquantized", c, self.max_codewords, self.eps)
        return out
