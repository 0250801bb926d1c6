import hashlib

import numpy as np
import pytest

from distributed_me.answer import Answer
from distributed_me.defenses import POLICIES, PolicyChain, parse_policy
from distributed_me.errors import DmeError, UnknownNameError

P = np.array([[0.1, 0.6, 0.3], [0.333, 0.333, 0.334], [0.07, 0.03, 0.9]], dtype=np.float32)


def test_probabilities_is_identity_and_default():
    a = parse_policy(None)(P)
    assert a.kind == "probabilities"
    np.testing.assert_array_equal(a.scores, P)
    np.testing.assert_array_equal(a.labels, [1, 2, 2])


def test_topk_keeps_k_highest_scores():
    a = parse_policy("topk:2")(P)
    assert a.kind == "topk"
    np.testing.assert_array_equal(a.topk, [[1, 2], [2, 0], [2, 0]])
    np.testing.assert_allclose(a.scores[0], [0.0, 0.6, 0.3])
    np.testing.assert_allclose(a.scores[2], [0.07, 0.0, 0.9])


def test_label_only_returns_no_scores():
    a = parse_policy("label")(P)
    assert a.kind == "label" and a.scores is None
    np.testing.assert_array_equal(a.labels, [1, 2, 2])


def test_round_to_decimals_keeps_the_victims_label_on_ties():
    a = parse_policy("round:1")(P)
    np.testing.assert_allclose(a.scores, [[0.1, 0.6, 0.3], [0.3, 0.3, 0.3], [0.1, 0.0, 0.9]], atol=1e-7)
    # row 1 rounds to a three-way tie: the API still names the victim's class (2), not argmax of the tie (0)
    np.testing.assert_array_equal(a.labels, [1, 2, 2])
    top1 = parse_policy("round:1,topk:1")(P)
    np.testing.assert_array_equal(top1.topk[:, 0], [1, 2, 2])


def test_chain_rejects_format_before_transform():
    with pytest.raises(DmeError, match="must come last"):
        parse_policy("topk:1,round:2")


def test_bad_parameters_name_field_value_and_allowed():
    with pytest.raises(DmeError, match=r"'decimals' = -1"):
        parse_policy("round:-1")
    with pytest.raises(DmeError, match=r"'k' = 0"):
        parse_policy("topk:k=0")
    names = ".*dp.*label.*noise.*probabilities.*quantize.*reverse_sigmoid.*round.*topk"
    with pytest.raises(UnknownNameError, match=f"valid output policy names: {names}"):
        parse_policy("bogus")


def test_spec_round_trips():
    chain = parse_policy("round:3,topk:2")
    again = parse_policy(chain.spec())
    assert again.spec() == chain.spec() == "round:decimals=3,topk:k=2"
    assert chain.returns == "topk"
    for spec, full in [
        ("quantize:10,topk:1", "quantize:intervals=10,topk:k=1"),
        ("noise:0.1", "noise:std=0.1,probabilities"),
        ("reverse_sigmoid:beta=0.5:gamma=0.2", "reverse_sigmoid:beta=0.5:gamma=0.2,probabilities"),
    ]:
        assert parse_policy(spec).spec() == parse_policy(full).spec() == full


def test_every_registered_policy_builds_with_defaults_and_answers():
    """Stateless policies answer as they are; those carrying a defense kit answer with it in test_model_defenses.py,
    and without it refuse, saying how to bind it."""
    for name in POLICIES.names():
        chain = PolicyChain([POLICIES.get(name)()])
        if POLICIES.get(name).needs_kit:
            with pytest.raises(DmeError, match="bind_kits"):
                chain(P)
            continue
        a = chain(P)
        assert len(a) == 3 and a.labels.dtype == np.int64


def test_answer_json_round_trip_for_each_kind():
    for spec in ("probabilities", "topk:2", "label"):
        a = parse_policy(spec)(P)
        b = Answer.from_json(a.to_json(), num_classes=3)
        assert b.kind == a.kind
        np.testing.assert_array_equal(b.labels, a.labels)
        if a.scores is not None:
            np.testing.assert_allclose(b.scores, a.scores)


def test_soft_targets_topk_imputes_rest_evenly_mebench_eq6():
    a = parse_policy("topk:1")(np.array([[0.1, 0.7, 0.2]], dtype=np.float32))
    np.testing.assert_allclose(a.soft_targets(), [[0.15, 0.7, 0.15]], atol=1e-6)


def test_soft_targets_renormalize_and_fall_back_to_label():
    a = Answer("probabilities", np.array([2, 1]), np.array([[0.2, 0.2, 0.4], [0.0, 0.0, 0.0]], np.float32))
    np.testing.assert_allclose(a.soft_targets(), [[0.25, 0.25, 0.5], [0, 1, 0]], atol=1e-6)
    assert Answer("label", np.array([0])).soft_targets() is None


# ---------------------------------------------------------------- quantize (MEBench §3.5)
def test_quantize_replaces_each_score_by_its_bin_midpoint():
    # intervals=5: bins [0,.2) [.2,.4) [.4,.6) [.6,.8) [.8,1] with midpoints .1 .3 .5 .7 .9
    a = parse_policy("quantize:5")(P)
    np.testing.assert_allclose(a.scores, [[0.1, 0.7, 0.3], [0.3, 0.3, 0.3], [0.1, 0.1, 0.9]], atol=1e-7)
    edges = np.array([[0.0, 0.19, 0.2, 0.6, 0.79, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(parse_policy("quantize:5")(edges).scores, [[0.1, 0.1, 0.3, 0.7, 0.7, 0.9]], atol=1e-7)
    # float32 0.7 is 0.69999999: still in [0.7, 0.8) with ten bins; 1.0 goes into the last bin
    tens = np.array([[0.7, 0.3, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(parse_policy("quantize:10")(tens).scores, [[0.75, 0.35, 0.05, 0.95]], atol=1e-7)
    np.testing.assert_allclose(parse_policy("quantize:1")(P).scores, np.full((3, 3), 0.5), atol=1e-7)
    # no renormalization: the first row now sums to 1.1
    assert abs(a.scores[0].sum() - 1.1) < 1e-6


def test_quantize_keeps_the_victims_label_on_ties():
    a = parse_policy("quantize:5")(P)
    # row 1 quantizes to a three-way tie at 0.3: the API still names the victim's class 2
    np.testing.assert_array_equal(a.labels, [1, 2, 2])
    top1 = parse_policy("quantize:5,topk:1")(P)
    np.testing.assert_array_equal(top1.topk[:, 0], [1, 2, 2])
    np.testing.assert_allclose(top1.scores, [[0, 0.7, 0], [0, 0, 0.3], [0, 0, 0.9]], atol=1e-7)


# ---------------------------------------------------------------- noise
def _row_noise(seed: int, stream: str, row: np.ndarray, c: int, std: float) -> np.ndarray:
    """The documented keying, written out by hand: blake2b digests as little-endian 64-bit words."""
    def words(data: bytes, n: int) -> list[int]:
        d = hashlib.blake2b(data, digest_size=8 * n).digest()
        return [int.from_bytes(d[8 * i : 8 * i + 8], "little") for i in range(n)]
    return np.random.default_rng([seed, *words(stream.encode(), 1), *words(row.tobytes(), 2)]).normal(0.0, std, c)


def test_noise_is_gaussian_keyed_per_row_then_clipped_and_renormalized():
    queries = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
    out = parse_policy("noise:0.1", seed=7)(P, queries=queries, stream="sha256:abc").scores
    noise = np.stack([_row_noise(7, "sha256:abc", q, P.shape[1], 0.1) for q in queries])
    expected = np.clip(P.astype(np.float64) + noise, 0.0, None)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert not np.allclose(out, P, atol=1e-3)


def test_noise_zero_std_is_identity_and_seeds_reproduce():
    np.testing.assert_allclose(parse_policy("noise:0")(P).scores, P, atol=1e-6)
    a = parse_policy("noise:0.2", seed=1)(P).scores
    b = parse_policy("noise:0.2", seed=1)(P).scores
    c = parse_policy("noise:0.2", seed=2)(P).scores
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_noise_row_depends_on_its_query_and_key_not_on_its_batch_or_history():
    """A row's draws are a function of (seed, key, image): batch-mates, order and earlier calls change nothing; another
    key or another image gets another draw."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    queries = rng.random((6, 3, 8, 8), dtype=np.float32)
    chain = parse_policy("noise:0.1", seed=3)
    whole = chain(probs, queries=queries, stream="k1").scores
    chain(probs[:2], queries=queries[:2], stream="k1")  # history must not matter
    perm = np.array([5, 2, 0, 4, 1, 3])
    shuffled = chain(probs[perm], queries=queries[perm], stream="k1").scores
    np.testing.assert_array_equal(shuffled, whole[perm])
    np.testing.assert_array_equal(chain(probs[3:4], queries=queries[3:4], stream="k1").scores, whole[3:4])
    other_key = chain(probs, queries=queries, stream="k2").scores
    assert not np.isclose(other_key, whole, atol=1e-4).all(axis=1).any()
    moved = queries.copy()
    moved[:, 0, 0, 0] += 1e-3
    assert not np.isclose(chain(probs, queries=moved, stream="k1").scores, whole, atol=1e-4).all(axis=1).any()


def test_noise_rows_sum_to_one_without_negatives_and_label_follows_noise():
    big = np.tile(P, (50, 1))
    a = parse_policy("noise:0.3", seed=3)(big)
    assert (a.scores >= 0).all() and (a.scores == 0).any()  # std 0.3 really clips some scores
    np.testing.assert_allclose(a.scores.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(a.labels, a.scores.argmax(axis=1))
    assert (a.labels != big.argmax(axis=1)).any()  # the defense changes answers


def test_noise_empirical_std_matches_parameter():
    # 100 classes at 0.01, std 0.001: no clipping (10 sigma) and renormalization moves scores by ~1e-4 only
    clean = np.full((200, 100), 0.01, dtype=np.float32)
    queries = np.arange(200, dtype=np.float32).reshape(200, 1, 1, 1)  # 200 distinct images: 200 independent draws
    diff = parse_policy("noise:0.001", seed=0)(clean, queries=queries).scores.astype(np.float64) - clean
    assert abs(diff.mean()) < 5e-5
    assert 0.00095 < diff.std() < 0.00105


def test_noise_row_that_clips_to_zero_falls_back_to_original():
    class Fixed:
        def normal(self, loc, scale, size):
            return np.array([[-1.0, -1.0, -1.0], [0.1, 0.0, -0.1]])

    rows = P[:2]
    out = POLICIES.get("noise")(std=0.5).transform(rows, Fixed())
    np.testing.assert_allclose(out[0], rows[0], atol=1e-7)
    np.testing.assert_allclose(out[1], [0.433, 0.333, 0.234], atol=1e-6)


# ---------------------------------------------------------------- reverse sigmoid (Lee et al. 2019; ART)
def _reverse_sigmoid_by_hand(y, beta, gamma):
    yc = np.clip(y, 1e-6, 1 - 1e-6)
    r = beta * (1 / (1 + np.exp(-gamma * np.log(yc / (1 - yc)))) - 0.5)
    z = np.clip(y - r, 0, 1)
    return z / z.sum()


def test_reverse_sigmoid_matches_the_formula():
    out = parse_policy("reverse_sigmoid:beta=0.5:gamma=0.2")(P).scores
    # row 0 by hand: r(0.1) = 0.5*(sigmoid(0.2*ln(1/9)) - 0.5) = -0.054063, r(0.6) = 0.010131, r(0.3) = -0.021131
    # y - r = [0.154063, 0.589869, 0.321131], sum 1.065063
    np.testing.assert_allclose(out[0], [0.144652, 0.553835, 0.301514], atol=2e-6)
    for i in range(3):
        np.testing.assert_allclose(out[i], _reverse_sigmoid_by_hand(P[i].astype(np.float64), 0.5, 0.2), atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(parse_policy("reverse_sigmoid")(P).labels, [1, 2, 2])


def test_reverse_sigmoid_handles_exact_zero_and_one():
    y = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    out = parse_policy("reverse_sigmoid")(y).scores
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
    # y=0: r = 1*(sigmoid(0.1*logit(1e-6)) - 0.5) = -0.299240, y=1: 1 - 0.299240; row sum 1.299240
    np.testing.assert_allclose(out[0], [0.230319, 0.539362, 0.230319], atol=2e-6)
    for i in range(3):
        np.testing.assert_allclose(out[i], _reverse_sigmoid_by_hand(y[i].astype(np.float64), 1.0, 0.1), atol=1e-6)


def test_reverse_sigmoid_can_flip_the_top_class_for_large_beta():
    # beta=5: r(0) = -1.496 so the zero class clips to 1; r(0.4) = -0.050675, r(0.6) = +0.050675; sum 2
    a = parse_policy("reverse_sigmoid:beta=5")(np.array([[0.6, 0.4, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(a.scores, [[0.274663, 0.225337, 0.5]], atol=2e-6)
    np.testing.assert_array_equal(a.labels, [2])
    b = parse_policy("reverse_sigmoid:beta=20")(np.array([[0.6, 0.4]], dtype=np.float32))
    assert b.labels[0] == 1


def test_dp_is_the_reverse_sigmoid_with_the_victims_top_class_kept_on_top():
    """DP (AdvFT's baseline [15]) = the reverse sigmoid where it keeps the top class; where it would not, the two
    scores swap. Hand case: beta=5 turns [0.6, 0.4, 0.0] into [0.274663, 0.225337, 0.5] (above), so DP answers
    [0.5, 0.225337, 0.274663] with label 0."""
    flipped = parse_policy("dp:beta=5")(np.array([[0.6, 0.4, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(flipped.scores, [[0.5, 0.225337, 0.274663]], atol=2e-6)
    np.testing.assert_array_equal(flipped.labels, [0])
    kept = parse_policy("dp:beta=0.5:gamma=0.2")(P)  # no flip here: exactly the reverse sigmoid
    np.testing.assert_array_equal(kept.scores, parse_policy("reverse_sigmoid:beta=0.5:gamma=0.2")(P).scores)
    rng = np.random.default_rng(0)
    for beta, gamma in ((1.0, 0.1), (5.0, 0.1), (20.0, 0.5), (2.0, 0.05)):
        y = rng.dirichlet(np.full(10, 0.3), size=200).astype(np.float32)
        a = parse_policy(f"dp:beta={beta}:gamma={gamma}")(y)
        np.testing.assert_array_equal(a.labels, y.argmax(axis=1))
        np.testing.assert_array_equal(a.scores.argmax(axis=1), y.argmax(axis=1))
        np.testing.assert_allclose(a.scores.sum(axis=1), 1.0, atol=1e-5)


def test_reverse_sigmoid_binary_single_column_follows_art():
    y = np.array([[0.3], [0.0], [1.0]], dtype=np.float32)
    out = parse_policy("reverse_sigmoid")(y).scores
    for i, v in enumerate(y[:, 0].astype(np.float64)):
        two = _reverse_sigmoid_by_hand(np.array([v, 1 - v]), 1.0, 0.1)
        np.testing.assert_allclose(out[i, 0], two[0], atol=1e-6)
    np.testing.assert_allclose(out[1:, 0], [0.299240, 0.700760], atol=2e-6)


def test_reverse_sigmoid_row_that_clips_to_zero_falls_back_to_original():
    # not a probability row (e.g. after another transform): both scores drop below 0 for beta=100
    y = np.array([[0.9, 0.9], [0.6, 0.4]], dtype=np.float32)
    out = POLICIES.get("reverse_sigmoid")(beta=100).transform(y, np.random.default_rng(0))
    np.testing.assert_allclose(out[0], [0.9, 0.9], atol=1e-7)
    np.testing.assert_allclose(out[1].sum(), 1.0, atol=1e-6)


def test_new_policies_reject_bad_parameters_naming_the_field():
    with pytest.raises(DmeError, match=r"'intervals' = 0"):
        parse_policy("quantize:0")
    with pytest.raises(DmeError, match=r"'std' = -0.1"):
        parse_policy("noise:-0.1")
    with pytest.raises(DmeError, match=r"'beta' = 0"):
        parse_policy("reverse_sigmoid:beta=0")
    with pytest.raises(DmeError, match=r"'beta' = -1"):
        parse_policy("reverse_sigmoid:-1")
    with pytest.raises(DmeError, match=r"'gamma' = 0.0"):
        parse_policy("reverse_sigmoid:gamma=0.0")
