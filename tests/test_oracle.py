import numpy as np
import pytest
import torch

from distributed_me.errors import BudgetExhausted, DmeError
from distributed_me.oracle import LocalOracle, Oracle, query_in_batches


def test_counts_queries_and_refuses_past_budget(linear_victim):
    o = LocalOracle(linear_victim, "probabilities", budget=10)
    assert isinstance(o, Oracle)
    x = torch.rand(6, 1, 4, 4)
    a = o.query(x)
    assert len(a) == 6 and o.queries_used == 6 and o.remaining == 4
    calls = linear_victim.calls
    with pytest.raises(BudgetExhausted, match="5 queries requested but only 4 of 10 remain"):
        o.query(torch.rand(5, 1, 4, 4))
    assert o.queries_used == 6 and linear_victim.calls == calls  # refused batch: victim never ran, nothing charged
    o.query(torch.rand(4, 1, 4, 4))
    assert o.remaining == 0
    with pytest.raises(BudgetExhausted):
        o.query(torch.rand(1, 1, 4, 4))


def test_unmetered_oracle(linear_victim):
    o = LocalOracle(linear_victim, budget=None)
    o.query(torch.rand(100, 1, 4, 4))
    assert o.queries_used == 100 and o.remaining is None


def test_answers_follow_the_policy_and_match_the_victim(linear_victim):
    x = torch.rand(8, 1, 4, 4)
    probs = linear_victim.predict_probs(x).numpy()
    full = LocalOracle(linear_victim, "probabilities").query(x)
    np.testing.assert_allclose(full.scores, probs, rtol=1e-6)
    label = LocalOracle(linear_victim, "label").query(x)
    assert label.scores is None
    np.testing.assert_array_equal(label.labels, probs.argmax(1))
    assert LocalOracle(linear_victim, "topk:2").info.returns == "topk"


def test_uint8_nhwc_input_is_converted(linear_victim):
    o = LocalOracle(linear_victim)
    u8 = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    a = o.query(u8)
    b = o.query(torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


@pytest.mark.parametrize("bad,msg", [
    (torch.rand(2, 3, 4, 4), "takes"),
    (torch.rand(2, 1, 5, 5), "takes"),
    (torch.rand(0, 1, 4, 4), "empty"),
    (torch.full((2, 1, 4, 4), float("nan")), "NaN"),
])
def test_bad_batches_are_refused_without_charge(linear_victim, bad, msg):
    o = LocalOracle(linear_victim, budget=5)
    with pytest.raises(DmeError, match=msg):
        o.query(bad)
    assert o.queries_used == 0


def test_query_in_batches_joins_in_order(linear_victim):
    o = LocalOracle(linear_victim, budget=50)
    x = torch.rand(23, 1, 4, 4)
    a = query_in_batches(o, x, batch_size=5)
    np.testing.assert_array_equal(a.labels, linear_victim.predict_labels(x).numpy())
    assert o.queries_used == 23


def test_info_is_public_metadata_only(linear_victim):
    d = LocalOracle(linear_victim, "round:2,topk:1", name="v").info.to_dict()
    assert d["name"] == "v" and d["input_shape"] == [1, 4, 4] and d["returns"] == "topk"
    assert "w" not in d and not any("path" in k for k in d)
