"""The math of the serving-path output-perturbation defenses MAD, AM and CIP, as pure functions (no serving, no Ray)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from distributed_me.defenses import mad
from distributed_me.defenses.cip import (
    calibrate_cip,
    cip_perturb,
    cip_regimes,
    energy_score,
    reliability_score,
)
from distributed_me.defenses.mad import _jacobian_one, _keep_top, mad_perturb, mad_target, surrogate_jacobian
from distributed_me.defenses.misinformation import (
    calibrate_tau,
    misinformation_alpha,
    misinformation_loss,
    misinformation_mix,
)


def random_probs(rng: np.random.Generator, n: int, k: int, sharp: float = 3.0) -> np.ndarray:
    z = rng.normal(size=(n, k)) * sharp
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def assert_simplex(a: np.ndarray, tol: float = 1e-5) -> None:
    assert a.dtype == np.float32
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=tol)


# ---------------------------------------------------------------- MAD
@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("argmax_preserving", [False, True])
@pytest.mark.parametrize("K", [5, 12])  # 12 > 10: MAD-argmax takes the greedy search
def test_mad_stays_in_budget_on_the_simplex(norm, argmax_preserving, K):
    rng = np.random.default_rng(0)
    y = random_probs(rng, 40, K)
    G = rng.normal(size=(40, K, 7))
    for eps in (0.05, 0.5, 1.5):
        out = mad_perturb(y, G, eps, norm=norm, argmax_preserving=argmax_preserving)
        d = out.astype(np.float64) - y
        dist = np.abs(d).sum(1) if norm == "l1" else np.sqrt((d * d).sum(1))
        assert dist.max() <= eps + 1e-6
        assert dist.max() > 0.5 * min(eps, 1.0)  # it does move: the budget is used, not ignored
        assert_simplex(out)
        if argmax_preserving:
            np.testing.assert_array_equal(out.argmax(1), y.argmax(1))


def test_mad_argmax_guard_undoes_float32_ties():
    """Class 0 one float32 ulp below class 1 (the top): a step that keeps class 1 on top in float64 but rounds both
    to the same float32 would hand the label to class 0. This one does so at full and half length, not at a quarter:
    the guard keeps the longest safe step."""
    top = np.float32(0.75)
    y = np.array([[np.nextafter(top, np.float32(0)), top]], dtype=np.float64)
    step = np.array([[1.0e-7, 4.5e-8]])
    for a in (1.0, 0.5):
        raw = (y + a * step).astype(np.float32)
        assert raw[0, 0] == raw[0, 1] and raw.argmax() == 0  # the hazard is real
    out = _keep_top(y, step, np.array([1.0]), (y + step).astype(np.float32))
    np.testing.assert_array_equal(out, (y + 0.25 * step).astype(np.float32))
    assert out.argmax() == 1


def test_mad_argmax_runs_the_guard(monkeypatch):
    calls = []
    monkeypatch.setattr(mad, "_keep_top", lambda *a: calls.append(1) or a[-1])
    rng = np.random.default_rng(8)
    y, G = random_probs(rng, 3, 4), rng.normal(size=(3, 4, 2))
    mad_perturb(y, G, 0.3)
    assert not calls
    mad_perturb(y, G, 0.3, argmax_preserving=True)
    assert calls


def test_mad_eps_zero_returns_y():
    rng = np.random.default_rng(2)
    y = random_probs(rng, 6, 4)
    G = rng.normal(size=(6, 4, 5))
    np.testing.assert_array_equal(mad_perturb(y, G, 0.0), y)
    np.testing.assert_array_equal(mad_perturb(y, G, 0.0, argmax_preserving=True), y)


def angular(G: np.ndarray, yt: np.ndarray, y: np.ndarray) -> float:
    u, v = G.T @ yt, G.T @ y
    return float(np.sum((u / np.linalg.norm(u) - v / np.linalg.norm(v)) ** 2))


def surrogate(G: np.ndarray, yt: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((G.T @ (yt - y)) ** 2))


#: 3 classes, D = 2: class 2's gradient is long and almost parallel to Gᵀy = (1.75, 0.2), class 1's short and
#: almost orthogonal to it. Angular objective: 0.0129, 1.7729, 0.0002; surrogate: 0.6025, 3.0725, 10.6525.
G3 = np.array([[1.0, 0.0], [0.0, 0.3], [5.0, 0.5]])
Y3 = np.array([0.5, 0.25, 0.25])


@pytest.mark.parametrize("objective,f", [("angular", angular), ("surrogate", surrogate)])
def test_mad_target_is_the_best_vertex_by_brute_force(objective, f):
    vertices = np.eye(3)
    want = int(np.argmax([f(G3, v, Y3) for v in vertices]))
    got = mad_target(Y3[None], G3[None], objective=objective)[0]
    np.testing.assert_array_equal(got, vertices[want])


def test_mad_objectives_disagree_on_the_hand_built_case():
    """Why the objective matters: the surrogate objective goes for the far vertex (class 2, the longest gradient),
    the angular one for the direction most unlike Gᵀy (class 1's); hand-computed values above G3."""
    assert mad_target(Y3[None], G3[None], objective="surrogate")[0].argmax() == 2
    assert mad_target(Y3[None], G3[None], objective="angular")[0].argmax() == 1


@pytest.mark.parametrize("objective,f", [("angular", angular), ("surrogate", surrogate)])
def test_mad_argmax_target_is_the_best_argmax_preserving_vertex(objective, f):
    rng = np.random.default_rng(3)
    for _ in range(10):
        K = 4
        G = rng.normal(size=(K, 3))
        y = random_probs(rng, 1, K)[0].astype(np.float64)
        k = int(y.argmax())
        best, best_val = None, -np.inf
        for bits in itertools.product([0, 1], repeat=K):
            if not bits[k]:
                continue
            v = np.array(bits, dtype=float)
            v[k] += 1e-5
            v /= v.sum()
            if f(G, v, y) > best_val:
                best, best_val = v, f(G, v, y)
        np.testing.assert_allclose(mad_target(y[None], G[None], objective=objective, argmax_preserving=True)[0], best)


def test_surrogate_jacobian_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    G = surrogate_jacobian(model, x)  # in eval mode: no dropout
    assert model.training  # the model's mode is restored
    model.eval()
    assert G.shape == (5, 3, 12)
    W = model[3].weight
    h = 1e-6
    fd = np.zeros((5, 3, 12))
    with torch.no_grad():
        for j in range(12):
            base = W.view(-1)[j].item()
            W.view(-1)[j] = base + h
            up = torch.log_softmax(model(x), 1).numpy()
            W.view(-1)[j] = base - h
            down = torch.log_softmax(model(x), 1).numpy()
            W.view(-1)[j] = base
            fd[:, :, j] = (up - down) / (2 * h)
    np.testing.assert_allclose(G, fd, atol=1e-5)


def test_surrogate_jacobian_picks_the_last_linear_and_the_fallback_agrees():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 3)
    batched = surrogate_jacobian(model, x)
    first = surrogate_jacobian(model, x, model[0])
    assert batched.shape == (3, 2, 8) and first.shape == (3, 2, 12)
    looped = torch.stack([_jacobian_one(model, model[2].weight, xi) for xi in x]).reshape(3, 2, -1).numpy()
    np.testing.assert_allclose(batched, looped, atol=1e-6)


# ---------------------------------------------------------------- AM
def test_am_answers_id_with_the_victim_and_ood_with_misinformation():
    rng = np.random.default_rng(4)
    y, m = random_probs(rng, 3, 5), random_probs(rng, 3, 5)
    tau = 0.9
    s = np.array([0.95, 0.85, 0.9])  # well above, well below (ν = 10⁴: ±0.05 is ±500 in the exponent), at τ
    out = misinformation_mix(y, m, s, tau)
    np.testing.assert_allclose(out[0], y[0], atol=1e-3)
    np.testing.assert_allclose(out[1], m[1], atol=1e-3)
    np.testing.assert_allclose(out[2], (y[2] + m[2]) / 2, atol=1e-6)
    assert_simplex(out)


def test_am_weight_is_monotone_in_the_score():
    s = np.linspace(0.0, 1.0, 2001)
    for nu in (10.0, 1e4):
        with np.errstate(all="raise"):  # ν = 10⁴ puts ±5000 in the exponent: no overflow allowed
            a = misinformation_alpha(s, 0.5, nu)
        assert np.all(np.diff(a) >= 0) and a[0] < 0.01 and a[-1] > 0.99
        assert np.isfinite(a).all()
    y = np.tile([[0.7, 0.2, 0.1]], (len(s), 1)).astype(np.float32)
    m = np.tile([[0.0, 0.1, 0.9]], (len(s), 1)).astype(np.float32)
    dist = np.abs(misinformation_mix(y, m, s, 0.5, 10.0) - y).sum(1)
    assert np.all(np.diff(dist) <= 1e-7)


def test_calibrate_tau_flags_the_target_share_of_in_distribution():
    rng = np.random.default_rng(5)
    scores = rng.uniform(size=1000)
    for fpr in (0.0, 0.01, 0.05, 0.3):
        tau = calibrate_tau(scores, fpr)
        assert (scores < tau).mean() <= fpr
        assert (scores <= tau).mean() > fpr  # and not lower than needed
    assert (scores < calibrate_tau(scores, 1.0)).all()


def test_misinformation_loss_falls_with_p_y_and_is_finite_at_one():
    a = torch.linspace(5.0, -5.0, 11)
    logits = torch.stack([a, torch.zeros_like(a), torch.zeros_like(a)], 1)
    labels = torch.zeros(11, dtype=torch.long)
    loss = misinformation_loss(logits, labels, reduction="none")
    assert torch.all(loss[1:] < loss[:-1])
    p_y = torch.softmax(logits, 1)[:, 0]
    torch.testing.assert_close(loss, -torch.log1p(-p_y), rtol=1e-5, atol=1e-6)
    sure = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    assert torch.softmax(sure, 1)[0, 0].item() == 1.0  # p_y is exactly 1 in float32
    worst = misinformation_loss(sure, torch.tensor([0]))
    worst.backward()
    assert torch.isfinite(worst) and torch.isfinite(sure.grad).all()
    torch.testing.assert_close(worst, torch.tensor(200.0 - np.log(2.0), dtype=torch.float32))


# ---------------------------------------------------------------- CIP
class FixedNormal:
    """A normal source whose draws are given, so CIP's random rows can be computed by hand."""

    def __init__(self, draws: np.ndarray):
        self.draws = np.asarray(draws, dtype=np.float64)

    def normal(self, loc: float, scale: float, size: tuple[int, int]) -> np.ndarray:
        assert size == self.draws.shape
        return loc + scale * self.draws


def test_cip_regimes_split_at_the_two_thresholds():
    E = np.array([-9.0, -5.0, -4.99, -2.0, -1.99, 3.0])
    np.testing.assert_array_equal(cip_regimes(E, -5.0, -2.0), [0, 0, 1, 1, 2, 2])


def test_cip_id_rows_are_untouched():
    y = np.array([[0.6, 0.3, 0.1], [0.34, 0.33, 0.33]], dtype=np.float32)
    out = cip_perturb(y, np.array([-10.0, -10.0]), e1=-5.0, e2=-2.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, y)


def test_cip_uncertain_ood_gets_the_mild_reverse_sigmoid():
    # σ(0.6·logit 0.8) = 0.8^0.6 / (0.8^0.6 + 0.2^0.6) = 0.87469 / 1.25542 = 0.69673;
    # 0.8 − 0.9·0.19673 = 0.62294 and 0.2 + 0.17706 = 0.37706: the row already sums to 1
    y = np.array([[0.8, 0.2], [0.5, 0.5]], dtype=np.float32)
    out = cip_perturb(y, np.array([-3.0, -3.0]), e1=-5.0, e2=-2.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out, [[0.62294, 0.37706], [0.5, 0.5]], atol=1e-5)


def test_cip_confident_ood_is_permuted_away_from_the_top_plus_noise():
    y = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    # position draws (9, 5, 1): class 0 holds the top and is forbidden, so the top value 0.7 goes to class 1;
    # arrangement draws over the free positions {0, 2}: (3, 0) → 0.2 (first other value) to class 2, 0.1 to class 0;
    # noise: |−2| on class 0 only, σ = √(mean(p²)/10^(10/10)) = √(0.54/3/10) = 0.134164
    draws = np.array([[9.0, 5.0, 1.0, 3.0, -2.0, 0.0, -2.0, 0.0, 0.0]])
    out = cip_perturb(y, np.array([0.0]), e1=-5.0, e2=-2.0, rng=FixedNormal(draws))
    noise = 2 * 0.134164
    np.testing.assert_allclose(out, [[(0.1 + noise) / (1 + noise), 0.7 / (1 + noise), 0.2 / (1 + noise)]], atol=1e-5)
    rng = np.random.default_rng(6)
    y = random_probs(rng, 200, 6)
    out = cip_perturb(y, np.zeros(200), e1=-5.0, e2=-2.0, rng=rng)
    assert_simplex(out)
    assert (out.argmax(1) != y.argmax(1)).mean() > 0.9  # the noise may, rarely, hand the top back


def test_cip_tied_top_still_leaves_the_forbidden_class():
    # the first 0.4 (class 0) goes to class 2; the arrangement puts the other 0.4 on class 0, which would leave
    # class 0 on top: it is swapped with the first smaller value (class 1). No noise.
    y = np.array([[0.4, 0.4, 0.2]], dtype=np.float32)
    draws = np.array([[0.0, 0.0, 5.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    out = cip_perturb(y, np.array([0.0]), e1=-5.0, e2=-2.0, rng=FixedNormal(draws))
    np.testing.assert_allclose(out, [[0.2, 0.4, 0.4]], atol=1e-7)


def test_cip_backdoor_turns_unreliable_id_rows_into_confident_wrong_labels():
    y = np.array([[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [0.5, 0.3, 0.2]], dtype=np.float32)
    R = reliability_score(y)
    # (0.5² − 1/3) / (std(0.3, 0.2) + 1 − 1/9) = −0.083333 / (0.05 + 0.888889)
    np.testing.assert_allclose(R[0], -0.0887574, rtol=1e-5)
    assert R[0] < R[1]
    # row 0: floor = 0.2/100 = 0.002 on class 2, the others + 0.022 → 1/[0.522, 0.322, 0.002], top on class 2;
    # the top may go anywhere but class 0 (the victim's label): the position draws send it to class 1, and the
    # arrangement draws put 1/0.522 (first other value) on class 2, 1/0.322 on class 0
    draws = np.array([[0.0, 4.0, 1.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0]] * 3)
    E = np.array([-9.0, -9.0, -3.0])  # rows 0 and 1 are ID, row 2 uncertain OOD
    out = cip_perturb(y, E, e1=-5.0, e2=-2.0, rng=FixedNormal(draws), reliability_threshold=float(R.mean()))
    inv = 1 / np.array([0.522, 0.322, 0.002])
    np.testing.assert_allclose(out[0], np.array([inv[1], inv[2], inv[0]]) / inv.sum(), rtol=1e-4)
    np.testing.assert_array_equal(out[1], y[1])  # a reliable ID row keeps its answer
    weak_only = cip_perturb(y[2:], E[2:], e1=-5.0, e2=-2.0, rng=FixedNormal(draws[2:]))
    np.testing.assert_array_equal(out[2], weak_only[0])  # PBD picks ID rows only
    assert_simplex(out)


def test_calibrate_cip_takes_the_codes_quantiles():
    E = np.arange(1000, dtype=np.float64)  # sorted energies 0 … 999
    probs = random_probs(np.random.default_rng(7), 1000, 4)
    t = calibrate_cip(E[::-1], probs, pbd_rate=0.01)
    assert (t.e1, t.e2) == (950.0, 999.0)
    assert (reliability_score(probs) < t.reliability).mean() <= 0.01
    np.testing.assert_allclose(energy_score(np.log([[0.5, 0.25, 0.25]])), [0.0], atol=1e-12)
