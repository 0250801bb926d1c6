"""KnockoffNets adaptive (Orekondy et al., CVPR 2019 §4.1.2): bandit math against hand-computed numbers, the numerical
guards, rewards on hand-made vectors, and the budget contract end to end on the embedded digits victim."""

import math

import numpy as np
import pytest
import torch

import distributed_me.attacks.knockoff as ko
from distributed_me.answer import Answer
from distributed_me.attacks import QueryStrategy, Workbench
from distributed_me.data import ArrayPool
from distributed_me.data.base import Normalization
from distributed_me.errors import DmeError
from distributed_me.extraction import AttackSpec, run_extraction
from distributed_me.models import NormalizedModel, create_model
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.runner import evaluator_for
from distributed_me.train import TrainConfig
from distributed_me.victims import load_victim

# ------------------------------------------------------------------------------------------------ bandit math --------

def test_gradient_bandit_first_step_by_hand():
    b = ko.GradientBandit(3, alpha=0.1)
    assert b.probs() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    b.update(0, 1.0)  # baseline 0 before any reward: r - rbar = 1
    # pulled arm: 0 + 0.1 * 1 * (1 - 1/3) = 0.0666...; others: 0 - 0.1 * 1 * 1/3 = -0.0333...
    assert b.h == pytest.approx([0.0666666667, -0.0333333333, -0.0333333333], abs=1e-9)
    assert b.baseline == 1.0


def test_gradient_bandit_second_step_uses_mean_of_previous_rewards():
    b = ko.GradientBandit(3, alpha=0.1)
    b.update(0, 1.0)
    # pi after step 1: exp(0.0667) = 1.068939, exp(-0.0333) = 0.967216 (x2); sum 3.003371
    assert b.probs() == pytest.approx([0.355913, 0.322043, 0.322043], abs=1e-6)
    b.update(1, 0.5)  # baseline = mean of earlier rewards = 1.0, so r - rbar = -0.5
    # arm 1: -0.033333 + 0.1 * (-0.5) * (1 - 0.322043) = -0.067231
    # arm 0:  0.066667 - 0.1 * (-0.5) * 0.355913     =  0.084462
    # arm 2: -0.033333 - 0.1 * (-0.5) * 0.322043     = -0.017231
    assert b.h == pytest.approx([0.084462, -0.067231, -0.017231], abs=1e-6)
    assert b.baseline == pytest.approx(0.75)


def test_exhausted_arms_get_zero_probability_and_their_preference_is_untouched():
    b = ko.GradientBandit(3, alpha=0.1)
    avail = np.array([True, False, True])
    assert b.probs(avail) == pytest.approx([0.5, 0.0, 0.5])
    b.update(0, 1.0, avail)  # 0.1 * 1 * (1 - 0.5) = 0.05; other available arm -0.05; exhausted arm unchanged
    assert b.h == pytest.approx([0.05, 0.0, -0.05])
    with pytest.raises(ValueError):
        b.probs(np.zeros(3, dtype=bool))


# ------------------------------------------------------------------------------------------------ guards -------------

@pytest.mark.parametrize("h", [[1e4, -1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, -1e4, -1e4], [800.0, 799.0, -5.0]])
def test_softmax_of_huge_preferences_is_finite_and_normalized(h):
    p = ko.stable_softmax(np.array(h))
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0) and (p >= 0).all()


def test_softmax_huge_values_by_hand():
    assert ko.stable_softmax(np.array([1e4, -1e4, 0.0])) == pytest.approx([1.0, 0.0, 0.0])
    assert ko.stable_softmax(np.array([1e4, 1e4])) == pytest.approx([0.5, 0.5])
    b = ko.GradientBandit(2, alpha=1.0)
    b.h[:] = [1e4, -1e4]
    b.update(1, 5.0)  # must not overflow or produce NaN
    assert np.isfinite(b.h).all() and np.isfinite(b.probs()).all()


def test_constant_rewards_standardize_to_zero_not_nan():
    s = ko.RunningStandardizer()
    assert [s(3.0) for _ in range(5)] == [0.0] * 5
    t = ko.RunningStandardizer()
    assert t(1.0) == 0.0
    assert t(3.0) == pytest.approx(1.0)  # mean 2, population std 1


def test_loss_reward_with_zero_probability_is_finite():
    r = ko.loss_reward(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    assert r == pytest.approx(-math.log(1e-12)) and math.isfinite(r)  # 27.631021


def test_label_only_and_topk_answers_become_distributions():
    y = ko.answer_distribution(Answer("label", np.array([2, 0])), num_classes=3)
    assert y.tolist() == [[0, 0, 1], [1, 0, 0]]
    topk = Answer("topk", np.array([0]), np.array([[0.6, 0.3, 0.0, 0.0]], dtype=np.float32), np.array([[0, 1]]))
    assert ko.answer_distribution(topk, 4) == pytest.approx(np.array([[0.6, 0.3, 0.05, 0.05]]))
    assert ko.certainty_reward(y) == 1.0 and ko.loss_reward(y, np.full((2, 3), 1 / 3)) == pytest.approx(math.log(3))


# ------------------------------------------------------------------------------------------------ rewards ------------

def test_certainty_reward_by_hand():
    assert ko.certainty_reward(np.array([[0.7, 0.2, 0.1]])) == pytest.approx(0.5)
    assert ko.certainty_reward(np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])) == pytest.approx(0.25)  # (0.5 + 0) / 2


def test_diversity_reward_by_hand():
    ybar = np.array([0.2, 0.5, 0.3])
    assert ko.diversity_reward(np.array([[0.6, 0.3, 0.1]]), ybar) == pytest.approx(0.4)
    # rows: 0.4 + 0 + 0 and 0 + 0 + 0.5 -> mean 0.45
    assert ko.diversity_reward(np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]), ybar) == pytest.approx(0.45)
    assert ko.diversity_reward(ybar[None], ybar) == 0.0


def test_loss_reward_by_hand():
    assert ko.loss_reward(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])) == pytest.approx(0.693147, abs=1e-6)
    # -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.5 * (1.386294 + 0.287682)
    assert ko.loss_reward(np.array([[0.5, 0.5]]), np.array([[0.25, 0.75]])) == pytest.approx(0.836988, abs=1e-6)


def test_kmeans_separates_obvious_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.01, (50, 2)), rng.normal(5, 0.01, (50, 2))])
    c = ko.kmeans(x, 2, rng)
    a = ko.nearest_center(x, c)
    assert len(set(a[:50])) == 1 and len(set(a[50:])) == 1 and a[0] != a[50]
    assert len(ko.kmeans(np.zeros((3, 2)), 8, rng)) == 3  # k capped by rows; identical rows do not crash seeding


# ------------------------------------------------------------------------------------------------ end to end ---------

@pytest.fixture(scope="module")
def victim():
    return load_victim(None)


def _pool(n: int, labels: np.ndarray | None, seed: int = 0) -> ArrayPool:
    rng = np.random.default_rng(seed)
    return ArrayPool(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), name="noise", labels=labels)


def _bench(oracle, seed: int = 0) -> Workbench:
    c, size, _ = oracle.info.input_shape

    def make_model():
        net = create_model("tiny_cnn", oracle.info.num_classes, in_chans=c, img_size=size)
        return NormalizedModel(net, Normalization((0.5,) * c, (0.5,) * c))

    return Workbench(make_model, TrainConfig(epochs=1, batch_size=32, seed=seed), oracle.info.input_shape, seed=seed)


def _extract(victim, pool, policy, budget, seed=0, **options):
    oracle = RecordingOracle(LocalOracle(victim, policy, budget=budget))
    bench = _bench(oracle, seed)
    epochs_reported = []
    bench.on_epoch = lambda epoch, row: epochs_reported.append(epoch)
    train, bench.fresh_flags = bench.train, []

    def counting_train(images, answer, fresh=True, epochs=None, interim=False):
        bench.fresh_flags.append(fresh)
        assert interim == (not fresh)  # warm-started updates are the interim ones
        return train(images, answer, fresh=fresh, epochs=epochs, interim=interim)

    bench.train = counting_train
    strategy = QueryStrategy.create("knockoff", {"batch_per_step": 8, "retrain_every": 30, "retrain_epochs": 1,
                                                 **options})
    ext = strategy.extract(oracle, pool, budget, bench)
    return ext, oracle, bench, epochs_reported


@pytest.mark.parametrize("labelled,policy", [(True, "probabilities"), (False, "label"), (False, "topk:2")])
def test_extract_respects_budget_and_sends_exactly_the_reported_images(victim, labelled, policy):
    labels = np.arange(300) % 5 if labelled else None
    pool = _pool(300, labels)
    ext, oracle, bench, epochs_reported = _extract(victim, pool, policy, budget=100)
    q = ext.queried
    assert q.dtype == np.int64 and len(q) == 100 and len(np.unique(q)) == 100
    assert oracle.queries_used == 100
    sent = torch.cat(oracle.sent)
    assert len(sent) == 100 and torch.equal(sent, bench.load(pool, q))  # same images, same order
    assert bench.fresh_flags == [False, False, False, True]  # warm updates after 32, 64, 96 queries; final fit fresh
    assert epochs_reported == [1]  # interim updates stay out of per-epoch reports; the final fit (1 epoch) is in
    assert bench.timer.seconds["selection"] > 0 and bench.timer.seconds["query"] > 0
    assert ext.model is bench.model


def test_budget_equal_to_pool_exhausts_every_arm_without_repeats(victim):
    labels = np.repeat([0, 1, 2, 3, 4], [30, 20, 7, 2, 1])  # uneven arms: small ones run dry early
    pool = _pool(60, labels)
    ext, oracle, _, _ = _extract(victim, pool, "probabilities", budget=60, alpha=5.0)
    assert sorted(ext.queried.tolist()) == list(range(60)) and oracle.queries_used == 60


def test_same_seed_same_queries(victim):
    a = _extract(victim, _pool(200, None), "probabilities", budget=50, seed=3, n_clusters=6)[0].queried
    b = _extract(victim, _pool(200, None), "probabilities", budget=50, seed=3, n_clusters=6)[0].queried
    assert a.tolist() == b.tolist()


def test_runs_through_run_extraction(victim):
    spec = AttackSpec(strategy="knockoff", strategy_options={"reward": "loss", "batch_per_step": 4}, budget=40,
                      arch="tiny_cnn", epochs=1, adv_eval_samples=10)
    oracle = LocalOracle(victim, "probabilities", budget=40)
    r = run_extraction(oracle, _pool(120, None), spec, evaluator_for(victim))
    assert r.queries_used == oracle.queries_used == 40
    # the result is scored on the victim's test split, not made up: its figures agree with the evaluator's own
    assert r.victim_accuracy == pytest.approx(evaluator_for(victim).victim_accuracy) and r.victim_accuracy > 0.9


def test_label_arms_on_unlabelled_pool_fail_before_any_query(victim):
    oracle = LocalOracle(victim, "probabilities", budget=10)
    strategy = QueryStrategy.create("knockoff", {"arms": "labels"})
    with pytest.raises(DmeError, match="arms='labels'"):
        strategy.extract(oracle, _pool(20, None), 10, _bench(oracle))
    assert oracle.queries_used == 0


# ------------------------------------------------------------------------------------------------ options ------------

@pytest.mark.parametrize("options,name", [({"alpha": -1}, "alpha"), ({"reward": "bogus"}, "reward"),
                                          ({"batch_per_step": 0}, "batch_per_step"), ({"arms": "x"}, "arms")])
def test_invalid_option_names_the_option(options, name):
    with pytest.raises(DmeError, match=f"option '{name}'"):
        QueryStrategy.create("knockoff", options)
