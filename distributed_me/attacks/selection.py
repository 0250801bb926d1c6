"""Pure-NumPy selection cores of two pool-based query strategies: SwiftTheft and ActiveThief's k-center greedy.

Both functions work on a precomputed feature matrix (one row per pool sample) and return pool indices in pick
order; they never see images, models or the victim, and import nothing but NumPy (no torch, no Ray). The
registered query strategies that compute the features, query the victim and train the substitute live elsewhere.

Memory: neither function builds an N x N (or N x |selected|) matrix. Every temporary that grows with N is either
an N-vector or a row chunk of at most ``_CHUNK_ELEMS`` float64 values (``chunk_rows`` overrides the row count).

Papers (under ``/work/shared/papers/``):

* 003 -- Yang, Gong, Chen, Wang, "SwiftTheft: a time-efficient model extraction attack framework against
  cloud-based deep neural networks", Chinese Journal of Electronics. Section III, Algorithm 1, Eqs. (3)-(7).
* 004 §3.3.3 and 003 §IV.2 -- ActiveThief (Pal et al., AAAI 2020) with k-Center-Greedy, the core-set heuristic
  of Sener & Savarese (ICLR 2018).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

__all__ = [
    "PAPER_K_PER_ITER",
    "PAPER_N_SEED",
    "diag_gaussian_loglik",
    "kcenter_greedy",
    "swifttheft_select",
]

#: SwiftTheft's seed-set size |S_0| and per-iteration pick count K (paper 003, §IV; see ``swifttheft_select``).
PAPER_N_SEED = 500
PAPER_K_PER_ITER = 500

#: Upper bound on the float64 elements in one row-chunk temporary (512 KiB).
_CHUNK_ELEMS = 1 << 16

_LOG_2PI = math.log(2.0 * math.pi)


def _as_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be non-empty, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"features must be real numbers, got dtype {x.dtype}")
    rows = _rows_per_chunk(x.shape[0], x.shape[1], None)
    if not all(np.isfinite(x[s : s + rows]).all() for s in range(0, x.shape[0], rows)):  # no N x D temporary
        raise ValueError("features contain NaN or inf")
    return x


def _rows_per_chunk(n: int, width: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return min(n, int(chunk_rows))
    return max(1, min(n, _CHUNK_ELEMS // max(1, width)))


def diag_gaussian_loglik(x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Log-density of ``x`` under the diagonal Gaussian N(mean, diag(var)), in float64.

    ``log p(x) = -1/2 * sum_d [ log(2*pi*var_d) + (x_d - mean_d)^2 / var_d ]`` -- paper 003 Eq. (5) with the
    off-diagonal covariances set to 0, as §III.3 assumes. ``x`` has shape (..., D), ``mean`` and ``var`` shape (D,);
    the result has shape ``x.shape[:-1]``. Every ``var_d`` must be > 0 (no floor is applied here: callers that
    estimate ``var`` from data floor it themselves, as :func:`swifttheft_select` does with ``eps``). One float64
    temporary of ``x``'s size is allocated; pass row chunks for large pools.
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    x = np.asarray(x)
    if mean.ndim != 1 or var.shape != mean.shape or x.shape[-1:] != mean.shape:
        raise ValueError(f"shape mismatch: x {x.shape}, mean {mean.shape}, var {var.shape}")
    if not (var > 0).all():
        raise ValueError("var must be strictly positive (floor it before calling)")
    const = float(np.sum(np.log(var))) + var.shape[0] * _LOG_2PI
    diff = np.subtract(x, mean, dtype=np.float64)
    diff *= diff
    diff /= var
    quad = diff.sum(axis=-1)
    quad += const
    quad *= -0.5
    return quad


def _l1_standardized_loglik(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Paper 003 Eq. (6) read literally, without its constant: ``-sum_d |x_d - mean_d| / sigma_d``."""
    diff = np.subtract(x, mean, dtype=np.float64)
    np.abs(diff, out=diff)
    diff /= std
    return -diff.sum(axis=-1)


class _Moments:
    """Eq. (4) kept up to date as samples join S_i: count, mean and M2 (sum of squared deviations) in float64.

    Each batch's own two-pass statistics are merged in with Chan, Golub & LeVeque's pairwise update, so an iteration
    costs O(K * D) rather than re-reading all of S_i (which would add an O(B^2 / K * D) term independent of the
    pool size). The variance is the biased 1/|S_i| one, as Eq. (4)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.mean = np.zeros(d, dtype=np.float64)
        self.m2 = np.zeros(d, dtype=np.float64)

    def add(self, features: np.ndarray, idx: np.ndarray, rows: int) -> None:
        nb = idx.shape[0]
        total = np.zeros_like(self.mean)
        for s in range(0, nb, rows):
            total += features[idx[s : s + rows]].sum(axis=0, dtype=np.float64)
        mean_b = total / nb
        m2_b = np.zeros_like(self.mean)
        for s in range(0, nb, rows):
            diff = np.subtract(features[idx[s : s + rows]], mean_b, dtype=np.float64)
            diff *= diff
            m2_b += diff.sum(axis=0)
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta * delta * (self.n * nb / n)
        self.n = n

    def var(self) -> np.ndarray:
        return self.m2 / self.n


def _k_smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest scores ordered by (score, index): a stable sort's first ``k``, in O(N)."""
    part = np.argpartition(scores, k - 1)[:k]
    threshold = scores[part].max()
    below = np.flatnonzero(scores < threshold)
    at = np.flatnonzero(scores == threshold)[: k - below.shape[0]]
    chosen = np.concatenate([below, at])
    return chosen[np.lexsort((chosen, scores[chosen]))]


def swifttheft_select(
    features: np.ndarray,
    budget: int,
    k_per_iter: int = PAPER_K_PER_ITER,
    n_seed: int = PAPER_N_SEED,
    rng: np.random.Generator | int | None = None,
    eps: float = 1e-8,
    *,
    criterion: Literal["gaussian", "eq6"] = "gaussian",
    chunk_rows: int | None = None,
) -> np.ndarray:
    """SwiftTheft sample selection (paper 003, §III.3, Algorithm 1 lines 9 and 13-21).

    ``features`` (N, D) holds the *aggregated* feature ``z_n`` of every pool sample: the sum, over the ``m``
    reference models, of each model's output ``F_R^j(x_n)`` (Eq. (3), Alg. 1 lines 10-12; D is the number of
    classes of the reference data set, §III.2). The summing is done by the caller; this function only selects.

    Algorithm, as implemented:

    1. Seeds (Alg. 1 line 9, ``S_0 = Random(S, s_0)``): ``S_0 = rng.choice(N, size=n_seed, replace=False)``,
       in that order. The seeds are part of the selected pool and count toward ``budget``: the paper stops when
       ``S_I`` -- which contains ``S_0`` -- "satisfies the target query budget B", and queries every ``x_n``,
       ``n in S_I`` (§III.3 end, Alg. 1 lines 22-23).
    2. Iteration i (Alg. 1 lines 13-15, Eq. (4)): estimate a diagonal Gaussian from the selected set S_i:
       ``mu_i = mean(z_n)``, ``sigma_i^2 = 1/|S_i| * sum (z_n - mu_i)^2`` per dimension (biased variance,
       independent dimensions as §III.3 assumes). Each ``sigma_i^2`` is floored at ``eps`` (an addition of
       ours, not in the paper) so that a dimension constant over S_i -- e.g. with one seed, or a saturated
       softmax output -- yields huge but finite scores instead of a division by zero.
    3. Score every not-yet-selected sample by its log-likelihood ``log p_i(z_n)`` (Eqs. (5)-(6)) and add the
       ``K`` samples with the *smallest* log-likelihood (Eq. (7), Alg. 1 lines 16-21: K successive argmins over
       the shrinking unselected set, i.e. ascending log-likelihood). Exact ties go to the lower pool index.
    4. Re-estimate on ``S_{i+1} = S_i + picks`` and repeat until ``budget`` samples are selected; the last
       iteration takes only ``budget - |S_i|`` samples (the paper implicitly assumes ``K`` divides
       ``B - s_0``).

    ``criterion`` picks the score. ``"gaussian"`` (default) is the diagonal-Gaussian log-density of Eq. (5)
    under the independence assumption, computed by :func:`diag_gaussian_loglik`; its ranking is that of the
    squared standardized distance ``sum_d (z_d - mu_d)^2 / sigma_d^2``. ``"eq6"`` is Eq. (6) as printed,
    ``-sum_d |z_d - mu_d| / sigma_d`` -- an L1 (Laplace-like) distance, which the paper presents as the
    Gaussian log-likelihood with the constant dropped but which ranks samples differently. The default follows
    the model the paper states (a normal distribution, "use the log-likelihood"); ``"eq6"`` reproduces the
    printed formula.

    Defaults ``n_seed = k_per_iter = 500`` are the paper's setting. §IV does not list SwiftTheft's own
    ``s_0`` and ``K`` directly; it says SwiftTheft and the baselines share "the same query budget and
    experimental settings" (§IV.3), the ActiveThief baseline uses "500 samples as the initial seed data and
    500 samples in each iteration" (§IV.2), and Table 3 reports SwiftTheft's per-iteration time at 1000, 1500,
    ..., 10000 selected samples (a first iteration 500 -> 1000, then +500 per iteration).

    Cost per iteration: O(N * D) for the scores plus O(K * D) for the re-estimation (a running update); partial
    selection is O(N) (``argpartition``), plus O(K log K) to order the picks. Memory: a few N-vectors and row chunks
    of at most ``_CHUNK_ELEMS`` float64 (or ``chunk_rows`` rows); never an N x N matrix.

    ``rng`` is required (a ``np.random.Generator`` or an int seed); it has a default only because it follows
    defaulted arguments. Returns ``budget`` distinct int64 indices in selection order: seeds first, then each
    iteration's picks in ascending log-likelihood.
    """
    x = _as_features(features)
    n = x.shape[0]
    budget, k_per_iter, n_seed = int(budget), int(k_per_iter), int(n_seed)
    if rng is None:
        raise TypeError("swifttheft_select needs rng (a np.random.Generator or an int seed) for the seed set")
    if budget > n:
        raise ValueError(f"budget ({budget}) exceeds the pool size ({n} samples)")
    if n_seed < 1:
        raise ValueError(f"n_seed must be >= 1 (the distribution is estimated from the seeds), got {n_seed}")
    if n_seed > budget:
        raise ValueError(f"n_seed ({n_seed}) exceeds the budget ({budget}); the seeds count toward the budget")
    if k_per_iter < 1:
        raise ValueError(f"k_per_iter must be >= 1, got {k_per_iter}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if criterion not in ("gaussian", "eq6"):
        raise ValueError(f"criterion must be 'gaussian' or 'eq6', got {criterion!r}")
    rows = _rows_per_chunk(n, x.shape[1], chunk_rows)

    rng = np.random.default_rng(rng)
    order = np.empty(budget, dtype=np.int64)
    order[:n_seed] = rng.choice(n, size=n_seed, replace=False)
    selected = np.zeros(n, dtype=bool)
    selected[order[:n_seed]] = True
    count = n_seed
    moments = _Moments(x.shape[1])
    moments.add(x, order[:n_seed], rows)
    scores = np.empty(n, dtype=np.float64)
    while count < budget:
        mean, var = moments.mean, moments.var()
        np.maximum(var, eps, out=var)
        if criterion == "gaussian":
            for s in range(0, n, rows):
                scores[s : s + rows] = diag_gaussian_loglik(x[s : s + rows], mean, var)
        else:
            std = np.sqrt(var)
            for s in range(0, n, rows):
                scores[s : s + rows] = _l1_standardized_loglik(x[s : s + rows], mean, std)
        scores[selected] = np.inf  # only S \ S_i competes (Alg. 1 line 16)
        take = min(k_per_iter, budget - count)
        picks = _k_smallest(scores, take)
        order[count : count + take] = picks
        selected[picks] = True
        moments.add(x, picks, rows)
        count += take
    return order


def _sq_dist_to(x: np.ndarray, center: np.ndarray, rows: int, out: np.ndarray) -> None:
    """``out[i] = ||x_i - center||^2`` in float64, by direct differences, in row chunks."""
    for s in range(0, x.shape[0], rows):
        diff = np.subtract(x[s : s + rows], center, dtype=np.float64)
        diff *= diff
        out[s : s + rows] = diff.sum(axis=1)


def _min_sq_dist_to_set(x: np.ndarray, centers: np.ndarray, rows_hint: int | None) -> np.ndarray:
    """``min_c ||x_i - x_c||^2`` over ``c in centers`` for every row, without an N x |centers| matrix.

    The nearest center is found blockwise with ``||a||^2 + ||b||^2 - 2 a.b`` (a BLAS matmul on
    (rows x D) @ (D x block) tiles of at most ``_CHUNK_ELEMS`` products), then the distance to that center is
    recomputed by direct differences, so values agree with the per-pick updates (and equal rows get equal values
    unless two centers are equidistant from them to within rounding).
    """
    n, d = x.shape
    block = min(centers.shape[0], 256)
    rows = _rows_per_chunk(n, max(d, block), rows_hint)
    best = np.empty(n, dtype=np.float64)
    for s in range(0, n, rows):
        xr = x[s : s + rows].astype(np.float64)
        xx = np.einsum("ij,ij->i", xr, xr)
        best_val = np.full(xr.shape[0], np.inf)
        best_arg = np.zeros(xr.shape[0], dtype=np.int64)
        for b in range(0, centers.shape[0], block):
            # D x block, gathered per tile, C-contiguous on purpose: on a loaded 2-core machine, ``xr @ cb.T`` (the
            # transposed-operand GEMM) was ~100x slower than ``xr @ cbt`` on these small tiles (OpenBLAS threading).
            cbt = np.ascontiguousarray(x[centers[b : b + block]].T, dtype=np.float64)
            prod = xr @ cbt
            prod *= -2.0
            prod += np.einsum("ij,ij->j", cbt, cbt)
            prod += xx[:, None]
            arg = prod.argmin(axis=1)
            val = prod[np.arange(prod.shape[0]), arg]
            better = val < best_val
            best_val[better] = val[better]
            best_arg[better] = arg[better] + b
        diff = xr
        diff -= x[centers[best_arg]]
        diff *= diff
        best[s : s + rows] = diff.sum(axis=1)
    return best


def kcenter_greedy(
    features: np.ndarray,
    already: np.ndarray,
    k: int,
    *,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """k-Center-Greedy (Sener & Savarese 2018, the core-set step ActiveThief uses; paper 004 §3.3.3, 003 §IV.2).

    Repeat ``k`` times: pick the pool point whose minimum Euclidean distance to the selected set is largest,
    add it to the set. The selected set starts as ``already`` (pool indices picked in earlier rounds -- in
    ActiveThief, the seed set plus previous rounds' queries; ``features`` are then the substitute model's outputs
    on the pool). If ``already`` is empty, the first pick is the pool point closest to the pool mean (ties: lowest
    index) -- a deterministic, order-independent start; every later pick follows the max-min rule.

    Distances are squared Euclidean in float64 (same argmax as Euclidean). The per-point minimum distance is
    kept in an N-vector and updated incrementally after each pick with the distances to the new center only:
    O(N * D) per pick, in row chunks. Initialising it for a non-empty ``already`` costs O(N * |already| * D)
    via blocked matmuls (see ``_min_sq_dist_to_set``). No N x N or N x |already| matrix is formed. Exact ties go
    to the lowest index (``argmax`` returns the first maximum).

    Returns ``k`` distinct int64 indices, in pick order, none of them in ``already``. Raises ``ValueError`` if
    fewer than ``k`` points lie outside ``already``.
    """
    x = _as_features(features)
    n = x.shape[0]
    k = int(k)
    already = np.asarray(already)
    if already.size and not np.issubdtype(already.dtype, np.integer):
        raise ValueError(f"already must hold integer indices, got dtype {already.dtype}")
    already = np.unique(already.astype(np.int64).ravel())
    if already.size and (already[0] < 0 or already[-1] >= n):
        raise ValueError(f"already holds indices outside [0, {n})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > n - already.size:
        raise ValueError(f"k ({k}) exceeds the {n - already.size} pool points not already selected")
    out = np.empty(k, dtype=np.int64)
    if k == 0:
        return out
    rows = _rows_per_chunk(n, x.shape[1], chunk_rows)

    new = np.empty(n, dtype=np.float64)
    start = 0
    if already.size:
        dist = _min_sq_dist_to_set(x, already, chunk_rows)
        dist[already] = -np.inf
    else:
        mean = np.zeros(x.shape[1], dtype=np.float64)
        for s in range(0, n, rows):
            mean += x[s : s + rows].sum(axis=0, dtype=np.float64)
        mean /= n
        _sq_dist_to(x, mean, rows, new)
        first = int(np.argmin(new))
        out[0] = first
        dist = np.empty(n, dtype=np.float64)
        _sq_dist_to(x, x[first], rows, dist)
        dist[first] = -np.inf
        start = 1
    for j in range(start, k):
        pick = int(np.argmax(dist))
        out[j] = pick
        if j + 1 < k:
            _sq_dist_to(x, x[pick], rows, new)
            np.minimum(dist, new, out=dist)
        dist[pick] = -np.inf
    return out
