"""ModelGuard-W and ModelGuard-S (Tang et al., USENIX Security 2024) on hand-computed cases.

W: the LP's optimum where it can be worked out by hand, its constraints on random rows, and no feasible point that
beats it. S: the codebook's first-within-ε rule, one book per top class, repeat answers, and its bound.
"""

import numpy as np
import pytest

from distributed_me.defenses import POLICIES, parse_policy
from distributed_me.defenses.modelguard import ARGMAX_MARGIN, LOG_OFFSET, modelguard_w


def _objective(y, yp):
    return (np.log(y + LOG_OFFSET) * yp).sum(axis=-1)


def test_w_moves_half_the_budget_from_the_top_to_the_least_likely_class():
    # weights log y: moving mass 0 -> 2 gains the most per unit; ε = 0.2 in L1 moves 0.1, the margin does not bind
    np.testing.assert_allclose(modelguard_w(np.array([[0.7, 0.2, 0.1]]), eps=0.2), [[0.6, 0.2, 0.2]], atol=1e-9)


def test_w_when_the_top_class_margin_binds():
    # ε = 1 could move 0.5, but class 2 may not overtake class 0: the optimum empties class 1 and splits the rest
    # as evenly as the margin allows (objective y0·w0 + (1 − y0)·w2 grows with y0, so y0 = (1 + m) / 2);
    # it moves mass *into* the top class to make room, L1 = 0.7 < ε
    m = ARGMAX_MARGIN
    out = modelguard_w(np.array([[0.4, 0.35, 0.25]]), eps=1.0)
    np.testing.assert_allclose(out, [[(1 + m) / 2, 0.0, (1 - m) / 2]], atol=1e-9)


def test_w_answers_lie_in_the_ball_keep_the_label_and_no_feasible_point_does_better():
    rng = np.random.default_rng(0)
    y = rng.dirichlet(np.full(6, 0.5), 40)
    for eps in (0.1, 0.5, 1.0):
        out = modelguard_w(y, eps)
        assert np.abs(out - y).sum(axis=1).max() <= eps + 1e-7
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-9)
        assert out.min() >= 0 and np.array_equal(out.argmax(axis=1), y.argmax(axis=1))
        best = _objective(y, out)
        for _ in range(200):  # random feasible points: mix y towards a random argmax-keeping target inside the ball
            target = rng.dirichlet(np.ones(6), 40)
            target[np.arange(40), y.argmax(axis=1)] += 1.0
            target /= target.sum(axis=1, keepdims=True)
            step = np.minimum(1.0, eps / np.abs(target - y).sum(axis=1))[:, None] * rng.uniform(0, 1, (40, 1))
            cand = (1 - step) * y + step * target
            ok = (cand.argmax(axis=1) == y.argmax(axis=1))
            assert (best[ok] <= _objective(y, cand)[ok] + 1e-9).all()


def test_w_batch_equals_row_by_row_and_its_policy_is_float32():
    y = np.random.default_rng(1).dirichlet(np.ones(10), 16).astype(np.float32)
    batch = modelguard_w(y)
    rows = np.concatenate([modelguard_w(y[i : i + 1]) for i in range(16)])
    np.testing.assert_allclose(batch, rows, atol=1e-9)
    ans = parse_policy("modelguard-w")(y)
    assert ans.scores.dtype == np.float32 and np.array_equal(ans.labels, y.argmax(axis=1))
    np.testing.assert_allclose(ans.scores, batch, atol=1e-6)


def test_w_repairs_a_top_class_tie_and_answers_an_empty_batch():
    tie = np.array([[0.45, 0.45, 0.1]])
    out = modelguard_w(tie, eps=0.5)
    assert out[0, 0] - out[0, 1] >= ARGMAX_MARGIN - 1e-9  # the first of the tied classes is kept on top
    assert modelguard_w(np.zeros((0, 3))).shape == (0, 3)


def test_s_answers_the_first_codeword_within_eps_not_the_nearest():
    policy = POLICIES.get("modelguard-s")(eps=0.5)
    a, c, f = [0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.62, 0.28, 0.1]
    # c is 0.6 from a: a new codeword; f is 0.36 from a and 0.24 from c: a, the first within ε
    out = policy.transform(np.array([a, c, f], np.float32), None)
    np.testing.assert_array_equal(out, np.array([a, c, a], np.float32))
    assert policy.codewords() == {0: 2}


def test_s_keeps_one_book_per_top_class_and_repeats_answers_across_batches():
    policy = POLICIES.get("modelguard-s")(eps=0.3)
    first = policy.transform(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]], np.float32), None)
    # [0.2, 0.7, 0.1] is 0.2 from the class-1 codeword: quantized to it; the class-0 row to class 0's
    again = policy.transform(np.array([[0.2, 0.7, 0.1], [0.75, 0.15, 0.1], [0.1, 0.8, 0.1]], np.float32), None)
    np.testing.assert_array_equal(again, [first[0], first[1], first[0]])
    assert policy.codewords() == {1: 1, 0: 1}
    y = np.random.default_rng(2).dirichlet(np.ones(5), 300).astype(np.float32)
    out = POLICIES.get("modelguard-s")(eps=1.0).transform(y, None)
    assert np.abs(out - y).sum(axis=1).max() <= 1.0 + 1e-6 and np.array_equal(out.argmax(1), y.argmax(1))
    assert len(np.unique(out, axis=0)) < 60  # few distinct answers: what limits the information a clone gets


def test_s_codebook_is_bounded_and_a_full_book_answers_unquantized(caplog):
    policy = POLICIES.get("modelguard-s")(eps=0.05, max_codewords=2)
    y = np.array([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.5, 0.3, 0.2], [0.9, 0.09, 0.01]], np.float32)
    out = policy.transform(y, None)
    assert policy.codewords() == {0: 2}
    np.testing.assert_array_equal(out, [y[0], y[1], y[2], y[0]])
    assert "codebook is full" in caplog.text


@pytest.mark.parametrize("spec,field", [("modelguard-w:eps=0", "eps"), ("modelguard-w:eps=3", "eps"),
                                        ("modelguard-s:max_codewords=0", "max_codewords")])
def test_bad_parameters_name_the_field(spec, field):
    from distributed_me.errors import DmeError

    with pytest.raises(DmeError, match=field):
        parse_policy(spec)
