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
    with pytest.raises(UnknownNameError, match="valid output policy names: .*label.*probabilities.*round.*topk"):
        parse_policy("bogus")


def test_spec_round_trips():
    chain = parse_policy("round:3,topk:2")
    again = parse_policy(chain.spec())
    assert again.spec() == chain.spec() == "round:decimals=3,topk:k=2"
    assert chain.returns == "topk"


def test_every_registered_policy_builds_with_defaults_and_answers():
    for name in POLICIES.names():
        a = PolicyChain([POLICIES.get(name)()])(P)
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
