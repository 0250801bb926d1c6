"""Per-API-key detectors (distributed_me.defenses.detectors): PRADA against a literal re-computation of its algorithm,
on synthetic attacker and benign streams; the OOD-rate monitor against a literal binomial loop; state bounds,
stickiness, isolation and exact serialization; and a contract every registered detector meets."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from distributed_me.defenses.detectors import DETECTORS, OodRate, Prada, parse_detector, parse_detectors
from distributed_me.errors import DmeError, UnknownNameError

# ---------------------------------------------------------------- toy victim and streams
SHAPE = (3, 8, 8)
K = 10
_W = np.random.default_rng(123).normal(size=(int(np.prod(SHAPE)), K)).astype(np.float32)


def victim(x: np.ndarray) -> np.ndarray:
    """A fixed random linear softmax classifier over the flattened image."""
    z = (x.reshape(len(x), _W.shape[0]) - 0.5) @ _W
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def natural(rng: np.random.Generator, n: int) -> np.ndarray:
    """Benign stand-in: i.i.d. images, every pixel 0.5 + 0.15·N(0, 1) clipped to [0, 1] — independent draws of one
    distribution, as a benign user's unrelated photos are (no two derived from each other)."""
    return np.clip(0.5 + 0.15 * rng.normal(size=(n, *SHAPE)), 0, 1).astype(np.float32)


def jba_like(rng: np.random.Generator, seeds: int = 10, rounds: int = 5, lam: float = 0.1) -> np.ndarray:
    """Papernot-style Jacobian augmentation stand-in: a few seeds, then every round each sample so far is copied with a
    step of ``lam`` along a sign vector (random here; the real attack takes the substitute's gradient sign): 10 · 2^5
    = 320 queries."""
    s = natural(rng, seeds)
    out = [s]
    for _ in range(rounds):
        new = np.clip(s + lam * np.sign(rng.normal(size=s.shape)), 0, 1).astype(np.float32)
        out.append(new)
        s = np.concatenate([s, new])
    return np.concatenate(out)


def feed(det, state, x: np.ndarray, probs: np.ndarray | None = None, batch: int = 16):
    probs = victim(x) if probs is None else probs
    verdicts = [det.observe(state, x[i:i + batch], probs[i:i + batch]) for i in range(0, len(x), batch)]
    return verdicts[-1], verdicts


def same(a, b) -> bool:
    """Verdicts equal, NaN scores included."""
    return a == b or (math.isnan(a.score) and math.isnan(b.score) and a == dataclasses.replace(b, score=a.score))


def onehot(classes, k: int = 2) -> np.ndarray:
    p = np.full((len(classes), k), 0.1 / (k - 1))
    p[np.arange(len(classes)), classes] = 0.9
    return p


# ---------------------------------------------------------------- PRADA
def literal_prada(xs: np.ndarray, classes: list[int], check_every: int = 10, min_distances: int = 100,
                  min_class: int = 10, m: float = 3.0):
    """PRADA step by step on plain lists, as the authors' src/growing_set.py does it (its check moved after the
    query is counted). Returns the growing sets, thresholds, distances in order and W at every check."""
    G: dict[int, list[np.ndarray]] = {}
    GD: dict[int, list[float]] = {}
    T: dict[int, float] = {}
    D: list[tuple[float, int]] = []
    scores: dict[int, float] = {}
    for q, (x, c) in enumerate(zip(xs.reshape(len(xs), -1).astype(np.float64), classes), 1):
        if c not in G:
            G[c], GD[c], T[c] = [x], [0.0], 0.0
        else:
            d = min(float(np.linalg.norm(x - y)) for y in G[c])
            D.append((d, c))
            if d > T[c]:
                G[c].append(x)
                GD[c].append(d)
                T[c] = max(T[c], float(np.mean(GD[c]) - np.std(GD[c])))
        if q % check_every == 0:
            per_class = {cc: sum(1 for _, k in D if k == cc) for cc in G}
            vals = np.array([d for d, k in D if per_class[k] >= min_class])
            if len(vals):
                vals = vals[abs(vals - vals.mean()) < m * vals.std()]
            scores[q] = float(stats.shapiro(vals).statistic) if len(vals) > min_distances else math.nan
    return G, T, [d for d, _ in D], scores


# twelve 2-D points (images of shape 1×1×2), worked by hand:
#   a (0,0) c0: first of class 0, no distance, T0 = 0      b (3,4): d=5 joins, T0 = max(0, 2.5-2.5) = 0
#   c (3,5): d=1 joins, T0 stays 0 (mean-std < 0)           d (6,8): d=√18=4.243 joins, T0 = 0.453
#   e (6,8.3): d=0.3 <= T0, left out                        f (10,8): d=4 joins, T0 = 0.8773
#   g (0,10) c1: first of class 1                           h (0.5,10) c1: d=0.5 joins, T1 = 0
#   i (10,8.5): d=0.5 <= T0, left out                       j (0,10) c1: repeats g, d=0, left out
#   k (20,20): d=√244 joins; mean-std of D_G0 falls below 0.877 but T0 never decreases
#   l (10,8.7): d=0.7 <= T0 = 0.8773, left out (it would join had T0 dropped)
HAND = np.array([[0, 0], [3, 4], [3, 5], [6, 8], [6, 8.3], [10, 8], [0, 10], [0.5, 10], [10, 8.5], [0, 10],
                 [20, 20], [10, 8.7]], np.float32)
HAND_CLASSES = [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0]


def test_prada_growing_sets_thresholds_and_distances_follow_algorithm_1():
    det = Prada()
    state = det.new_state()
    det.observe(state, HAND.reshape(-1, 1, 1, 2), onehot(HAND_CLASSES))
    G, T, D, _ = literal_prada(HAND, HAND_CLASSES)
    np.testing.assert_allclose(state.distances(), [5, 1, math.sqrt(18), 0.3, 4, 0.5, 0.5, 0, math.sqrt(244), 0.7],
                               rtol=1e-6)
    np.testing.assert_allclose(state.distances(), D, rtol=1e-6)
    np.testing.assert_array_equal(state.growing_set(0), HAND[[0, 1, 2, 3, 5, 10]])
    np.testing.assert_array_equal(state.growing_set(1), HAND[[6, 7]])
    for c in (0, 1):
        np.testing.assert_array_equal(state.growing_set(c), np.array(G[c], np.float32))
        assert state.thr[c] == pytest.approx(T[c], rel=1e-6)
    assert state.thr[0] == pytest.approx(0.8773, abs=1e-4) and state.thr[1] == 0


def test_prada_score_is_shapiro_wilk_of_the_filtered_distances_at_every_check():
    """A 2-D stream with a rare class (fewer than 10 distances: left out) and far outliers (cut at 3 std)."""
    rng = np.random.default_rng(7)
    n = 400
    xs = rng.normal(size=(n, 2)).astype(np.float32)
    xs[rng.choice(n, 8, replace=False)] *= 40  # outliers
    classes = list(rng.choice([0, 1], size=n))
    for i in rng.choice(n, 6, replace=False):
        classes[i] = 2  # rare
    det = Prada()
    state = det.new_state()
    ours = {}
    for i in range(n):
        v = det.observe(state, xs[i:i + 1].reshape(1, 1, 1, 2), onehot(classes[i:i + 1], 3))
        if v.queries_seen % 10 == 0:
            ours[v.queries_seen] = v.score
    _, _, _, literal = literal_prada(xs, classes)
    assert ours.keys() == literal.keys()
    assert any(math.isnan(w) for w in literal.values()) and any(not math.isnan(w) for w in literal.values())
    np.testing.assert_allclose([ours[q] for q in literal], list(literal.values()), rtol=1e-6)


def test_prada_flags_jba_like_streams_and_no_benign_stream():
    det = Prada()
    flagged_at = []
    for seed in range(5):
        verdict, _ = feed(det, det.new_state(), jba_like(np.random.default_rng(seed)))
        assert verdict.flagged, verdict.reason
        assert verdict.reason.startswith("PRADA: Shapiro-Wilk W=") and "< delta=0.9" in verdict.reason
        flagged_at.append(verdict.flagged_at)
    assert max(flagged_at) <= 200, flagged_at  # measured: 130-150 of the 320 queries
    false_positives, lowest = 0, 1.0
    for seed in range(5):
        _, verdicts = feed(det, det.new_state(), natural(np.random.default_rng(100 + seed), 1000), batch=50)
        false_positives += verdicts[-1].flagged
        lowest = min([lowest, *(v.score for v in verdicts if not math.isnan(v.score))])
    assert false_positives == 0 and lowest > 0.95, lowest  # measured: lowest W 0.97 over 5 keys × 1000 queries


def test_prada_memory_stays_bounded_and_the_largest_class_makes_room():
    det = Prada(max_kept=3, max_distances=5)
    state = det.new_state()
    pts = np.array([[0, 50], [0, 0], [5, 0], [9, 0], [30, 30]], np.float32)
    det.observe(state, pts.reshape(-1, 1, 1, 2), onehot([1, 0, 0, 0, 1]))
    # full after the first three; (9,0) evicts class 0's oldest (0,0), not the oldest of all, (0,50) of class 1;
    # (30,30) joins class 1 and evicts (5,0), the oldest of class 0, now the largest set
    np.testing.assert_array_equal(state.growing_set(0), pts[[3]])
    np.testing.assert_array_equal(state.growing_set(1), pts[[0, 4]])

    det = Prada(max_kept=50, max_distances=200)
    state = det.new_state()
    feed(det, state, natural(np.random.default_rng(1), 2000), batch=100)
    p = int(np.prod(SHAPE))
    assert state.g_used == 50 and len(state.distances()) == 200
    assert state.nbytes <= 50 * (4 * p + 16) + 200 * 16 + K * 32 + 256 + 200
    assert state.nbytes > 50 * 4 * p  # and it measures the images


# ---------------------------------------------------------------- OOD rate
def literal_tails(bits: np.ndarray, window: int, min_queries: int, p: float) -> np.ndarray:
    """After each query: the one-sided binomial test's p-value over the last ``window`` queries (NaN before
    ``min_queries``)."""
    out = np.full(len(bits), np.nan)
    for q in range(1, len(bits) + 1):
        recent = bits[max(0, q - window):q]
        if len(recent) >= min_queries:
            out[q - 1] = stats.binomtest(int(recent.sum()), len(recent), p, alternative="greater").pvalue
    return out


def probs_with_max(rng: np.random.Generator, top: np.ndarray, k: int = 10) -> np.ndarray:
    """Rows whose largest probability is ``top`` (> 1/k), the rest spread evenly, the top class at random."""
    p = np.repeat(((1 - top) / (k - 1))[:, None], k, axis=1)
    p[np.arange(len(top)), rng.integers(0, k, len(top))] = top
    return p


def test_ood_rate_calibration_is_the_empirical_quantile():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.3), size=997)
    scores = 1 - probs.max(axis=1)
    for fpr in (0.01, 0.05, 0.2):
        t = OodRate.calibrate(probs, fpr)
        m = math.floor(fpr * len(probs))
        assert (scores > t).sum() == m and (scores >= t).sum() == m + 1
        assert t == np.sort(scores)[len(scores) - 1 - m]  # the (m+1)-th largest: the first one not counted
    det = OodRate.calibrated(probs, 0.05, window=500)
    assert det.threshold == OodRate.calibrate(probs, 0.05) and det.expected_rate == 0.05 and det.window == 500
    with pytest.raises(DmeError, match="fpr"):
        OodRate.calibrate(probs, 1.5)


def test_ood_rate_does_not_flag_in_distribution_streams():
    det = OodRate(threshold=0.3)
    rng = np.random.default_rng(0)
    confident = probs_with_max(rng, rng.uniform(0.75, 1.0, 2000))
    verdict, _ = feed(det, det.new_state(), np.zeros((2000, 1, 1, 1), np.float32), confident, batch=64)
    assert not verdict.flagged and verdict.queries_seen == 2000
    for seed in range(5):  # benign clients exactly at the expected rate of low-confidence queries
        rng = np.random.default_rng(10 + seed)
        tops = np.where(rng.random(2000) < det.expected_rate, 0.5, 0.9)
        verdict, _ = feed(det, det.new_state(), np.zeros((2000, 1, 1, 1), np.float32), probs_with_max(rng, tops), 64)
        assert not verdict.flagged, (seed, verdict.reason)


@pytest.mark.parametrize("rates", [(0.4,), (0.12,), (0.03, 0.2)], ids=["40%", "12%", "3%-then-20%"])
def test_ood_rate_flags_at_the_first_query_whose_binomial_tail_drops_below_alpha(rates):
    """40% flags at the first test, 12% some queries later, 3% for 600 queries then 20% once the window is full."""
    det = OodRate(threshold=0.3, window=300)
    rng = np.random.default_rng(3)
    bits = np.concatenate([rng.random(600 if len(rates) > 1 else 1500) < r for r in rates])
    n = len(bits)
    probs = probs_with_max(rng, np.where(bits, 0.45, 0.95))
    images = np.zeros((n, 1, 1, 1), np.float32)
    tails = literal_tails(bits.astype(int), det.window, det.min_queries, det.expected_rate)
    expected = int(np.flatnonzero(tails < det.alpha)[0]) + 1
    assert expected == det.min_queries if rates == (0.4,) else det.min_queries < expected <= 900
    assert (expected > 600) == (len(rates) > 1)
    for batch in (1, 37, n):  # the answer does not depend on how queries are batched
        verdict, verdicts = feed(det, state := det.new_state(), images, probs, batch)
        assert verdict.flagged and verdict.flagged_at == expected, batch
        if batch == 1:  # the score after every query is the literal p-value
            np.testing.assert_allclose([v.score for v in verdicts], tails, rtol=1e-9, atol=1e-300)
        assert verdict.reason.startswith("ood-rate: ") and "< alpha=0.0001" in verdict.reason
    assert state.window_counts == (det.window, int(bits[-det.window:].sum()))


# ---------------------------------------------------------------- state: serialization, stickiness, isolation
@pytest.mark.parametrize("det", [Prada(), OodRate(threshold=0.3)], ids=["prada", "ood-rate"])
def test_state_round_trip_gives_identical_later_verdicts(det):
    rng = np.random.default_rng(5)
    x = np.concatenate([natural(rng, 150), jba_like(rng)])
    probs = victim(x)
    live = det.new_state()
    feed(det, live, x[:160], probs[:160])
    restored = det.load_state(live.to_bytes())
    assert restored == live
    for i in range(160, len(x), 16):
        xi, pi = x[i:i + 16], probs[i:i + 16]
        assert same(det.observe(restored, xi, pi), det.observe(live, xi, pi))
    assert restored == live and live.flagged  # both halves of the stream were exercised


def test_flags_are_sticky():
    prada = Prada(max_distances=500)
    state = prada.new_state()
    first, _ = feed(prada, state, jba_like(np.random.default_rng(0)))
    assert first.flagged
    later, verdicts = feed(prada, state, natural(np.random.default_rng(1), 1500), batch=100)
    assert later.score > prada.delta  # the newest 500 distances look benign again...
    assert all(v.flagged and v.flagged_at == first.flagged_at and v.reason == first.reason for v in verdicts)

    ood = OodRate(threshold=0.3, window=200)
    rng = np.random.default_rng(2)
    state = ood.new_state()
    first, _ = feed(ood, state, np.zeros((300, 1, 1, 1), np.float32), probs_with_max(rng, np.full(300, 0.4)))
    later, _ = feed(ood, state, np.zeros((1000, 1, 1, 1), np.float32), probs_with_max(rng, np.full(1000, 0.99)))
    assert first.flagged and later.score == 1.0  # ...but the flag stays
    assert later.flagged and later.flagged_at == first.flagged_at


def test_keys_are_isolated():
    det = Prada()
    attacker, benign = jba_like(np.random.default_rng(0)), natural(np.random.default_rng(1), 320)
    a, b, alone = det.new_state(), det.new_state(), det.new_state()
    for i in range(0, 320, 16):  # interleaved requests of two keys
        va = det.observe(a, attacker[i:i + 16], victim(attacker[i:i + 16]))
        vb = det.observe(b, benign[i:i + 16], victim(benign[i:i + 16]))
    feed(det, alone, benign)
    assert va.flagged and not vb.flagged and b == alone and a != b


def test_ood_window_bound_and_tighter_bounds_on_load():
    det = OodRate(window=100)
    state = det.new_state()
    rng = np.random.default_rng(0)
    feed(det, state, np.zeros((5000, 1, 1, 1), np.float32), probs_with_max(rng, rng.uniform(0.2, 1, 5000)), 500)
    assert state.window_counts[0] == 100 and state.nbytes <= 100 + 256 + 300
    smaller = OodRate(window=10).load_state(state.to_bytes())
    assert smaller.window_counts[0] == 10 and smaller.queries_seen == 5000
    prada = Prada()
    p_state = prada.new_state()
    feed(prada, p_state, natural(rng, 300))
    trimmed = Prada(max_kept=20, max_distances=30).load_state(p_state.to_bytes())
    assert trimmed.g_used == 20 and len(trimmed.distances()) == 30
    np.testing.assert_array_equal(np.sort(trimmed.g_seq), np.sort(p_state.g_seq[: p_state.g_used])[-20:])


# ---------------------------------------------------------------- every registered detector
@pytest.fixture(params=DETECTORS.names())
def detector(request):
    return DETECTORS.get(request.param)()  # defaults validate


def test_contract_defaults_empty_request_and_round_trip(detector):
    assert set(DETECTORS.names()) >= {"prada", "ood-rate"}
    state = detector.new_state()
    fresh = detector.new_state()
    v = detector.observe(state, np.zeros((0, *SHAPE), np.float32), np.zeros((0, K)))
    assert state == fresh and v.queries_seen == 0 and not v.flagged and v.flagged_at is None
    assert v.detector == detector.name and math.isnan(v.score) and v.reason
    assert detector.load_state(state.to_bytes()) == state
    rng = np.random.default_rng(0)
    x = natural(rng, 120)
    feed(detector, state, x)
    again = detector.load_state(state.to_bytes())
    assert again == state and again.queries_seen == 120 and again != fresh
    assert same(detector.observe(again, x[:0], victim(x[:0])), detector.verdict(state))
    assert parse_detector(detector.spec()) == detector


def test_contract_bad_input_is_refused_with_a_useful_error(detector):
    name, field = detector.name, next(iter(type(detector).model_fields))
    with pytest.raises(DmeError, match=f"field '{field}' = 'oops'") as e:
        parse_detector(f"{name}:{field}=oops")
    assert all(f in str(e.value) for f in type(detector).model_fields)  # the parameters are listed
    with pytest.raises(DmeError, match="'bogus' = 1"):
        parse_detector(f"{name}:bogus=1")
    with pytest.raises(DmeError, match="cannot be loaded|unreadable"):
        detector.load_state(b"not an archive")
    other = next(n for n in DETECTORS.names() if n != name)
    with pytest.raises(DmeError, match=f"written by '{other}'"):
        detector.load_state(DETECTORS.get(other)().new_state().to_bytes())
    with pytest.raises(ValueError):
        detector.observe(detector.new_state(), np.zeros((2, *SHAPE), np.float32), np.zeros((3, K)))


def test_parse_names_first_parameter_and_lists():
    assert parse_detector("prada:0.85") == Prada(delta=0.85)
    assert parse_detector(" ood-rate : threshold=0.4 : alpha=1e-3 ") == OodRate(threshold=0.4, alpha=1e-3)
    assert parse_detectors("prada,ood-rate:window=50") == [Prada(), OodRate(window=50)]
    assert parse_detectors(None) == [] and parse_detectors("") == []
    with pytest.raises(UnknownNameError, match="valid detector names: ood-rate, prada"):
        parse_detector("prado")
    with pytest.raises(DmeError, match="'delta' = 1.5"):
        parse_detector("prada:delta=1.5")
