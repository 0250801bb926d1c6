"""Papernot et al.'s Jacobian-based augmentation (``jba``): the augmentation step worked out by hand on a linear
substitute, the periodic sign flip, the reservoir, and the query accounting of a whole extraction."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from distributed_me.attacks import GENERATED, QueryStrategy, Timer, Workbench
from distributed_me.attacks.jba import augment_size, jacobian_augment, step_size
from distributed_me.cost.work import CostJob, Net
from distributed_me.data import ArrayPool
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.train import TrainConfig
from distributed_me.victims import load_victim


@pytest.fixture(scope="module")
def victim():
    return load_victim(None)


def _linear(d: int = 16 * 16, c: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c))


def _aug(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """By hand: the Jacobian of a linear model's logit y w.r.t. its input is the weight row y."""
    return (x + lam * w[labels].sign().view_as(x)).clamp(0, 1)


def test_augmentation_is_the_sign_of_the_oracle_labels_weight_row_clipped():
    torch.manual_seed(0)
    model = _linear(1 * 4 * 4, 3)
    with torch.no_grad():
        model[1].weight[0, :3] = 0.0  # sign(0) = 0: those pixels stay put
    x = torch.rand(6, 1, 4, 4)
    x[0, 0, 0, 3], x[1, 0, 1, 1] = 0.97, 0.02  # near the box: the step is clipped
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    w = model[1].weight.detach()
    for lam in (0.1, -0.1):
        got = jacobian_augment(model, x, labels, lam, batch_size=4)  # two batches
        torch.testing.assert_close(got, _aug(x, w, labels, lam), rtol=0, atol=0)
    assert got.min() >= 0 and got.max() <= 1
    # on the softmax instead: d p_y / dx = p_y (w_y - sum_j p_j w_j)
    p = torch.softmax(model(x), 1).detach()
    direction = w[labels] - p @ w
    got = jacobian_augment(model, x, labels, 0.1, jacobian_of="probabilities")
    torch.testing.assert_close(got, (x + 0.1 * direction.sign().view_as(x)).clamp(0, 1))


def test_periodic_step_size_and_reservoir_size():
    assert [step_size(0.1, r, None) for r in range(4)] == [0.1] * 4
    assert [step_size(0.1, r, 3) for r in range(7)] == [0.1, 0.1, 0.1, -0.1, -0.1, -0.1, 0.1]
    assert [augment_size(n, r, 400, 3) for n, r in [(150, 0), (300, 2), (1200, 3), (300, 5)]] == [150, 300, 400, 300]
    assert augment_size(1200, 3, None, 3) == 1200


class RecordingBench(Workbench):
    """Keeps a copy of every substitute it trains, with what it was trained on."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.runs: list[dict] = []

    def train(self, images, answer, **kw):
        model = super().train(images, answer, **kw)
        self.runs.append({"images": images.clone(), "answer": answer, "interim": kw.get("interim", False),
                          "model": copy.deepcopy(model).cpu()})
        return model


def _noise_pool(n: int = 80) -> ArrayPool:
    rng = np.random.default_rng(0)
    return ArrayPool(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), name="noise")


def test_extraction_augments_with_the_oracle_label_flips_lambda_and_cuts_the_last_round(victim):
    """5 seeds, budget 23, tau 1: rounds add 5 (+λ), 10 (-λ), then 3 of 20 (+λ): the budget ends mid-round. Every
    augmented query is, bit for bit, a seed or earlier point stepped along the sign of the current substitute's weight
    row of the oracle's label; every paid answer trains the final piracy model."""
    pool = _noise_pool()
    oracle = RecordingOracle(LocalOracle(victim, "label", budget=30))
    bench = RecordingBench(lambda: _linear(), TrainConfig(epochs=1), victim.input_shape, Timer(), seed=0)
    strategy = QueryStrategy.create("jba", {"n_seed": 5, "tau": 1})
    out = strategy.extract(oracle, pool, 23, bench)
    sent = oracle.images()
    assert oracle.queries_used == len(out.queried) == len(sent) == 23
    seeds = out.queried[:5]
    assert (seeds >= 0).all() and len(set(seeds.tolist())) == 5 and (out.queried[5:] == GENERATED).all()
    torch.testing.assert_close(sent[:5], bench.load(pool, seeds))
    assert [(r["lambda"], r["augmented"]) for r in out.rounds] == [(0.1, 5), (-0.1, 10), (0.1, 3)]

    assert [r["interim"] for r in bench.runs] == [True, True, True, False]
    assert [len(r["images"]) for r in bench.runs] == [5, 10, 20, 23]
    final = bench.runs[-1]
    torch.testing.assert_close(final["images"], sent)  # all paid pairs, in query order
    labels = torch.from_numpy(final["answer"].labels)
    np.testing.assert_array_equal(final["answer"].labels, victim.predict_labels(sent).numpy())

    w = [r["model"][1].weight.detach() for r in bench.runs]
    torch.testing.assert_close(sent[5:10], _aug(sent[:5], w[0], labels[:5], 0.1), rtol=0, atol=0)
    torch.testing.assert_close(sent[10:20], _aug(sent[:10], w[1], labels[:10], -0.1), rtol=0, atol=0)
    candidates = _aug(sent[:20], w[2], labels[:20], 0.1)
    picked = [next(j for j in range(20) if torch.equal(candidates[j], q)) for q in sent[20:23]]
    assert len(set(picked)) == 3  # a random subset of S_2, each point augmented once
    assert bench.timer.seconds["selection"] > 0


def test_reservoir_augments_kappa_points_per_round_and_cost_follows_the_same_schedule(victim):
    pool = _noise_pool()
    oracle = LocalOracle(victim, "probabilities", budget=14)
    bench = RecordingBench(lambda: _linear(), TrainConfig(epochs=1), victim.input_shape, Timer(), seed=0)
    strategy = QueryStrategy.create("jba", {"n_seed": 4, "kappa": 3, "sigma": 1, "epochs_per_round": 2})
    out = strategy.extract(oracle, pool, 14, bench)
    assert [r["augmented"] for r in out.rounds] == [4, 3, 3]
    assert [len(r["images"]) for r in bench.runs] == [4, 8, 11, 14]
    assert bench.runs[-1]["answer"].scores is not None  # soft targets when the API returns scores

    job = CostJob(budget=14, pool_size=80, piracy=Net("tiny_cnn", 16, 1, 10), epochs=5)
    items = strategy.cost(job)
    assert [(w.samples, w.passes) for w in items if w.kind == "train"] == [(4, 2), (8, 2), (11, 2), (14, 5)]
    assert [(w.samples, w.phase) for w in items if w.kind == "grad"] == [(4, "selection"), (3, "selection"),
                                                                         (3, "selection")]


def test_hard_labels_train_on_the_oracles_labels_only(victim):
    bench = RecordingBench(lambda: _linear(), TrainConfig(epochs=1), victim.input_shape, Timer(), seed=0)
    QueryStrategy.create("jba", {"n_seed": 4, "hard_labels": True}).extract(
        LocalOracle(victim, "probabilities", budget=10), _noise_pool(), 10, bench)
    assert all(r["answer"].kind == "label" and r["answer"].scores is None for r in bench.runs)
