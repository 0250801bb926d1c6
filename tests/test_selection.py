"""Selection cores (distributed_me.attacks.selection) against literal brute-force reimplementations.

Everything here is tiny NumPy work: no models, no Ray, well under a second per test.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from distributed_me.attacks.selection import (
    PAPER_K_PER_ITER,
    PAPER_N_SEED,
    diag_gaussian_loglik,
    kcenter_greedy,
    swifttheft_select,
)

# ----------------------------------------------------------------------------------------------- brute force


def brute_swifttheft(X, budget, K, n_seed, seed, eps=1e-8, criterion="gaussian"):
    """Algorithm 1 of paper 003 as literally as possible: plain loops, math.log, np.mean/np.var per iteration."""
    N, D = X.shape
    rng = np.random.default_rng(seed)
    S = [int(i) for i in rng.choice(N, size=n_seed, replace=False)]  # line 9: S_0 = Random(S, s_0)
    while len(S) < budget:
        rows = X[S].astype(np.float64)
        mu = np.mean(rows, axis=0)  # line 14
        var = np.var(rows, axis=0)  # line 15 (1/|S_i|)
        var = [max(float(v), eps) for v in var]
        logp = {}
        for n in range(N):
            if n in S:
                continue
            total = 0.0
            for d in range(D):
                z, m, v = float(X[n, d]), float(mu[d]), var[d]
                if criterion == "gaussian":  # log of the 1-D normal density, Eq. (5) with diagonal covariance
                    total += math.log(1.0 / math.sqrt(2.0 * math.pi * v)) - (z - m) ** 2 / (2.0 * v)
                else:  # Eq. (6) as printed
                    total -= abs(z - m) / math.sqrt(v)
            logp[n] = total
        remaining = set(logp)  # line 16: S \ S_i
        for _ in range(min(K, budget - len(S))):  # lines 18-21: successive argmins (ties: lower index)
            n_k = min(remaining, key=lambda n: (logp[n], n))
            remaining.remove(n_k)
            S.append(n_k)
    return S


def brute_kcenter(X, already, k):
    X = X.astype(np.float64)
    N = X.shape[0]
    dist = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))  # full N x N, fine for tiny N
    selected = [int(i) for i in already]
    picks = []
    if not selected:
        mean = X.mean(axis=0)
        first = min(range(N), key=lambda i: (float(np.sqrt(((X[i] - mean) ** 2).sum())), i))
        picks.append(first)
        selected.append(first)
    while len(picks) < k:
        best, best_d = None, -1.0
        for i in range(N):
            if i in selected:
                continue
            d = min(dist[i, j] for j in selected)
            if d > best_d:  # strict: ties keep the lower index
                best, best_d = i, d
        picks.append(best)
        selected.append(best)
    return picks


def _pool(n=200, d=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


# ---------------------------------------------------------------------------------------------- swifttheft


@pytest.mark.parametrize(
    "budget,K,n_seed",
    [(40, 5, 10), (37, 8, 5), (25, 1, 1), (60, 7, 3), (200, 30, 20)],
)
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_swifttheft_matches_brute_force(budget, K, n_seed, chunk_rows):
    X = _pool()
    got = swifttheft_select(X, budget, K, n_seed, np.random.default_rng(11), chunk_rows=chunk_rows)
    assert got.tolist() == brute_swifttheft(X, budget, K, n_seed, seed=11)


@pytest.mark.parametrize("criterion", ["gaussian", "eq6"])
def test_swifttheft_criteria_match_brute_force_float32_and_ties(criterion):
    # 50 distinct rows, each 4 times, shuffled: exact score ties must go to the lower index in both versions.
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 5)).astype(np.float32)[rng.permutation(np.repeat(np.arange(50), 4))]
    got = swifttheft_select(X, 45, 6, 4, np.random.default_rng(2), criterion=criterion, chunk_rows=13)
    assert got.tolist() == brute_swifttheft(X, 45, 6, 4, seed=2, criterion=criterion)


def test_swifttheft_gaussian_and_eq6_differ():
    X = _pool(seed=5)
    a = swifttheft_select(X, 60, 10, 5, np.random.default_rng(0))
    b = swifttheft_select(X, 60, 10, 5, np.random.default_rng(0), criterion="eq6")
    assert a[:5].tolist() == b[:5].tolist() and a.tolist() != b.tolist()


def test_swifttheft_properties():
    X = _pool()
    out = swifttheft_select(X, 53, 8, 9, np.random.default_rng(4))
    assert out.dtype == np.int64 and out.shape == (53,)
    assert len(set(out.tolist())) == 53 and out.min() >= 0 and out.max() < 200
    seeds = np.random.default_rng(4).choice(200, size=9, replace=False)
    assert out[:9].tolist() == seeds.tolist()  # seeds first, and they count toward the budget
    # deterministic for the same seed, different for another
    assert np.array_equal(out, swifttheft_select(X, 53, 8, 9, np.random.default_rng(4)))
    assert np.array_equal(out, swifttheft_select(X, 53, 8, 9, 4))  # int seed == Generator(seed)
    assert not np.array_equal(out, swifttheft_select(X, 53, 8, 9, np.random.default_rng(5)))


def test_swifttheft_fills_the_rarest_reference_class_and_batches_overshoot():
    """The mechanism behind SwiftTheft (§III.3): with features that separate the reference classes (m perfect
    reference models, z = m * onehot), the least likely sample under the diagonal Gaussian of S_i is one of the class
    rarest in S_i, so K = 1 balances the classes exactly. K successive argmins under one estimate (eq. 7) all go to
    the same rarest class: a large K overshoots it. This is why K matters in the diagnostics of issue 5."""
    classes, per_class, m = 5, 200, 4
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(0).shuffle(labels)
    feats = np.zeros((len(labels), classes), dtype=np.float32)
    feats[np.arange(len(labels)), labels] = m
    idx = swifttheft_select(feats, 50, k_per_iter=1, n_seed=5, rng=0)
    assert np.bincount(labels[idx], minlength=classes).tolist() == [10] * classes
    batched = swifttheft_select(feats, 37, k_per_iter=25, n_seed=12, rng=3)
    seeds = np.bincount(labels[batched[:12]], minlength=classes)
    assert (seeds == seeds.min()).sum() == 1  # (this seed set has one rarest class)
    picks = labels[batched[12:]]
    assert set(picks.tolist()) == {int(seeds.argmin())}  # one batch, all of the rarest class: 25 more of it


def test_swifttheft_budget_equal_to_seeds_returns_only_seeds():
    X = _pool()
    out = swifttheft_select(X, 12, 5, 12, np.random.default_rng(1))
    assert out.tolist() == np.random.default_rng(1).choice(200, size=12, replace=False).tolist()


def test_swifttheft_paper_defaults():
    assert PAPER_N_SEED == 500 and PAPER_K_PER_ITER == 500
    X = _pool(n=1200, d=3)
    out = swifttheft_select(X, 1100, rng=np.random.default_rng(0))  # 500 seeds, 500, then the last 100
    assert len(set(out.tolist())) == 1100


def test_swifttheft_argument_errors():
    X = _pool()
    with pytest.raises(ValueError, match=r"budget \(201\) exceeds the pool size \(200 samples\)"):
        swifttheft_select(X, 201, 5, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_seed"):
        swifttheft_select(X, 10, 5, 11, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_seed"):
        swifttheft_select(X, 10, 5, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="k_per_iter"):
        swifttheft_select(X, 10, 0, 5, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        swifttheft_select(X, 10, 5, 5)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        swifttheft_select(bad, 10, 5, 5, np.random.default_rng(0))


@pytest.mark.parametrize("criterion", ["gaussian", "eq6"])
def test_swifttheft_zero_variance_is_finite(criterion):
    X = _pool()
    X[:, 2] = 1.5  # constant feature: variance exactly 0 on every selected set
    X[:100, 4] = 0.0  # constant on half the pool: zero variance while the seeds all come from that half
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        out = swifttheft_select(X, 30, 4, 1, np.random.default_rng(0), criterion=criterion)  # 1 seed: all var 0
        out2 = swifttheft_select(X, 50, 10, 10, np.random.default_rng(1), criterion=criterion)
    assert len(set(out.tolist())) == 30 and len(set(out2.tolist())) == 50
    assert out.tolist() == brute_swifttheft(X, 30, 4, 1, seed=0, criterion=criterion)
    ll = diag_gaussian_loglik(X, X[:10].mean(0), np.maximum(X[:10].var(0), 1e-8))
    assert np.isfinite(ll).all()


def test_swifttheft_memory_is_linear():
    X = np.random.default_rng(0).normal(size=(20000, 8)).astype(np.float32)
    swifttheft_select(X[:50], 10, 3, 2, np.random.default_rng(0))  # warm-up: first-call allocations aren't ours
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = swifttheft_select(X, 1500, 100, 100, np.random.default_rng(0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(set(out.tolist())) == 1500
    assert peak < 4 * X.nbytes, (peak, X.nbytes)  # an N x N float matrix alone would be 5000x X.nbytes


# ------------------------------------------------------------------------------------------------- helper


def test_diag_gaussian_loglik_matches_math():
    rng = np.random.default_rng(0)
    x, mean, var = rng.normal(size=(3, 4, 5)), rng.normal(size=5), rng.uniform(0.1, 2.0, size=5)
    got = diag_gaussian_loglik(x, mean, var)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = sum(
                -0.5 * math.log(2 * math.pi * var[d]) - (x[i, j, d] - mean[d]) ** 2 / (2 * var[d]) for d in range(5)
            )
            assert got[i, j] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert diag_gaussian_loglik(x[0, 0], mean, var) == pytest.approx(got[0, 0])
    with pytest.raises(ValueError, match="positive"):
        diag_gaussian_loglik(x, mean, np.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        diag_gaussian_loglik(x, mean[:4], var[:4])


# ----------------------------------------------------------------------------------------------- k-center


@pytest.mark.parametrize("n_already,k", [(0, 15), (1, 10), (10, 20), (190, 10)])
@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_kcenter_matches_brute_force(n_already, k, chunk_rows):
    X = _pool(n=200, d=6, seed=1)
    already = np.random.default_rng(9).choice(200, size=n_already, replace=False)
    got = kcenter_greedy(X, already, k, chunk_rows=chunk_rows)
    assert got.tolist() == brute_kcenter(X, already.tolist(), k)


@pytest.mark.parametrize("n_already", [0, 6])
def test_kcenter_ties_and_float32(n_already):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 4)).astype(np.float32)[rng.permutation(np.repeat(np.arange(40), 3))]
    already = np.random.default_rng(0).choice(120, size=n_already, replace=False)
    got = kcenter_greedy(X, already, 50, chunk_rows=11)
    assert got.tolist() == brute_kcenter(X, already.tolist(), 50)


def test_kcenter_properties_and_errors():
    X = _pool()
    already = np.array([5, 17, 17, 199, 0])  # duplicates are allowed and ignored
    out = kcenter_greedy(X, already, 30)
    assert out.dtype == np.int64 and out.shape == (30,)
    assert len(set(out.tolist())) == 30 and not set(out.tolist()) & {0, 5, 17, 199}
    assert out.min() >= 0 and out.max() < 200
    assert np.array_equal(out, kcenter_greedy(X, already, 30))
    assert kcenter_greedy(X, already, 0).shape == (0,)
    # exhausting the pool returns every remaining index exactly once
    assert sorted(kcenter_greedy(X, already, 196).tolist()) == sorted(set(range(200)) - {0, 5, 17, 199})
    with pytest.raises(ValueError, match=r"k \(197\) exceeds the 196 pool points"):
        kcenter_greedy(X, already, 197)
    with pytest.raises(ValueError, match="outside"):
        kcenter_greedy(X, np.array([200]), 3)
    with pytest.raises(ValueError, match="integer"):
        kcenter_greedy(X, np.array([1.0]), 3)


def test_kcenter_memory_is_linear():
    X = np.random.default_rng(0).normal(size=(20000, 8)).astype(np.float32)
    already = np.random.default_rng(1).choice(20000, size=300, replace=False)
    kcenter_greedy(X[:50], [1, 2], 3)  # warm-up: first-call allocations (einsum, BLAS) aren't ours
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = kcenter_greedy(X, already, 40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(set(out.tolist()) - set(already.tolist())) == 40
    assert peak < 4 * X.nbytes, (peak, X.nbytes)
