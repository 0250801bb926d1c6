"""ActiveThief strategies: budget contract end to end, round structure, acquisition functions, DeepFool correctness."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import distributed_me.attacks.activethief as at
from distributed_me.attacks import QueryStrategy, Timer, Workbench
from distributed_me.attacks.selection import kcenter_greedy
from distributed_me.data import ArrayPool
from distributed_me.data.base import Normalization
from distributed_me.errors import DmeError
from distributed_me.models import NormalizedModel, create_model
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.train import TrainConfig
from distributed_me.victims import load_victim

STRATEGIES = ["activethief-kcenter", "activethief-uncertainty", "activethief-dfal"]


@pytest.fixture(scope="session")
def victim():
    return load_victim(None)


@dataclass
class CountingBench(Workbench):
    """Records every training call: (number of samples, fresh, epochs)."""

    calls: list[tuple[int, bool, int | None]] = field(default_factory=list)
    interim: list[bool] = field(default_factory=list)

    def train(self, images, answer, fresh=True, epochs=None, interim=False):
        self.calls.append((len(images), fresh, epochs))
        self.interim.append(interim)
        return super().train(images, answer, fresh=fresh, epochs=epochs, interim=interim)


def _bench(oracle, seed: int = 0) -> CountingBench:
    """A Workbench built as ``extraction.run_extraction`` builds it (tiny_cnn, neutral normalization)."""
    c, size, _ = oracle.info.input_shape

    def make_model() -> nn.Module:
        net = create_model("tiny_cnn", oracle.info.num_classes, in_chans=c, img_size=size)
        return NormalizedModel(net, Normalization((0.5,) * c, (0.5,) * c))

    cfg = TrainConfig(epochs=1, batch_size=16, seed=seed)
    return CountingBench(make_model, cfg, oracle.info.input_shape, Timer(), seed)


def _pool(n: int = 300, seed: int = 0) -> ArrayPool:
    return ArrayPool(np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), name="noise")


@pytest.mark.parametrize("name", STRATEGIES)
def test_end_to_end_budget_order_and_rounds(victim, name):
    pool = _pool()
    oracle = RecordingOracle(LocalOracle(victim, "probabilities", budget=100))
    opts = {"n_seed": 20, "per_round": 15, "epochs_per_round": 1}
    if name == "activethief-dfal":
        opts.update(dfal_candidates=40, dfal_max_iter=20)
    strategy = QueryStrategy.create(name, opts)
    bench = _bench(oracle)
    ext = strategy.extract(oracle, pool, 62, bench)

    assert oracle.queries_used == 62
    assert ext.queried.dtype == np.int64 and len(ext.queried) == 62 and len(np.unique(ext.queried)) == 62
    sent = torch.cat(oracle.sent)
    assert torch.equal(sent, bench.load(pool, ext.queried))  # exactly the recorded indices, in query order
    # 20 seed + 15 + 15 + 12 = 62: four query rounds, the last one partial; four trainings on the growing set
    assert [r["picked"] for r in ext.rounds] == [20, 15, 15, 12]
    assert [n for n, _, _ in bench.calls] == [20, 35, 50, 62]
    assert all(fresh for _, fresh, _ in bench.calls)
    assert [e for _, _, e in bench.calls] == [1, 1, 1, None]  # the final round trains with the full config
    assert bench.interim == [True, True, True, False]  # only the final model reaches on_epoch and history
    assert bench.timer.seconds["selection"] > 0 and bench.timer.seconds["query"] > 0


def test_partial_last_round_and_training_count(victim):
    pool = _pool()
    oracle = LocalOracle(victim, "label", budget=None)
    bench = _bench(oracle)
    opts = {"n_seed": 20, "per_round": 15, "measure": "least_confidence", "retrain": "continue"}
    strategy = QueryStrategy.create("activethief-uncertainty", opts)
    ext = strategy.extract(oracle, pool, 58, bench)
    assert oracle.queries_used == 58 and len(np.unique(ext.queried)) == 58
    assert [r["picked"] for r in ext.rounds] == [20, 15, 15, 8]
    assert len(bench.calls) == len(ext.rounds) == 4  # one training per query round
    assert [fresh for _, fresh, _ in bench.calls] == [True, False, False, False]


def test_budget_below_seed_size_is_one_random_round(victim):
    pool = _pool()
    oracle = LocalOracle(victim, "probabilities", budget=10)
    bench = _bench(oracle)
    ext = QueryStrategy.create("activethief-kcenter", {"n_seed": 20}).extract(oracle, pool, 10, bench)
    assert oracle.queries_used == 10 and len(np.unique(ext.queried)) == 10
    assert bench.calls == [(10, True, None)] and len(ext.rounds) == 1


def test_uncertainty_measures_pick_expected_rows():
    a = [0.5, 0.5, 0.0, 0.0]  # entropy ln 2 = 0.69, least confidence 0.5
    b = [0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3]  # entropy 1.11, least confidence 0.4
    sure = [1.0, 0.0, 0.0, 0.0]
    probs = np.array([sure, a, b, sure])
    assert at.select_uncertain(probs, 2, "entropy").tolist() == [2, 1]
    assert at.select_uncertain(probs, 2, "least_confidence").tolist() == [1, 2]
    assert at.select_uncertain(probs, 3, "entropy").tolist() == [2, 1, 0]  # exact ties: lower row first
    assert at.uncertainty_scores(np.array([sure]), "entropy")[0] == 0.0  # 0 log 0 = 0, no NaN


def test_kcenter_acquisition_is_kcenter_greedy_on_probabilities(monkeypatch):
    probs = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0, 0, 1], [0.34, 0.33, 0.33]], dtype=np.float32)
    monkeypatch.setattr(at, "substitute_probs", lambda *a, **k: probs)
    strategy = QueryStrategy.create("activethief-kcenter")
    queried, unqueried = np.array([0, 1]), np.array([2, 3, 4])
    picks = strategy.acquire(None, None, None, queried, unqueried, 2, np.random.default_rng(0))
    assert picks.tolist() == kcenter_greedy(probs, queried, 2).tolist() == [3, 4]  # farthest from {0, 1}, then 4


def test_deepfool_on_linear_binary_is_the_exact_distance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 2.0]]))
        model[1].bias.copy_(torch.tensor([0.0, -0.3]))
    w, b = torch.tensor([1.0, -2.0, 0.5, 2.0]), -0.3
    x = torch.tensor([[0.2, 0.0, 0.0, 0.1], [1.0, 0.0, 0.0, 1.5], [0.0, 1.0, 0.0, 0.0]]).view(3, 1, 2, 2)
    res = at.deepfool(model, x, max_iter=50, overshoot=0.02)
    expected = 1.02 * ((x.flatten(1) @ w + b).abs() + 1e-4) / w.norm()
    assert res.flipped.all() and res.iterations.tolist() == [1, 1, 1]
    torch.testing.assert_close(res.norm, expected, rtol=1e-5, atol=1e-6)
    assert res.norm[0] < res.norm[1]  # |f| = 0.1 vs 3.7: the point near the boundary needs less
    assert (model(x + res.perturbation).argmax(1) != model(x).argmax(1)).all()


def test_deepfool_flips_a_small_multiclass_net():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.rand(12, 1, 4, 4)
    res = at.deepfool(model, x, max_iter=50, overshoot=0.02, num_classes=5)
    assert res.flipped.all()
    with torch.no_grad():
        assert (model(x + res.perturbation).argmax(1) != model(x).argmax(1)).all()
        # the DeepFool step is close to minimal: half of it does not flip most points
        half = model(x + 0.5 * res.perturbation).argmax(1) == model(x).argmax(1)
    assert half.float().mean() > 0.5
    assert (res.norm > 0).all()


def test_option_validation_names_the_option():
    with pytest.raises(DmeError, match="per_round"):
        QueryStrategy.create("activethief-kcenter", {"per_round": 0})
    with pytest.raises(DmeError, match="n_seed"):
        QueryStrategy.create("activethief-dfal", {"n_seed": 0})
    with pytest.raises(DmeError, match="measure"):
        QueryStrategy.create("activethief-uncertainty", {"measure": "margin"})
    with pytest.raises(DmeError, match="measure"):
        QueryStrategy.create("activethief-kcenter", {"measure": "entropy"})  # an option of another strategy
    s = QueryStrategy.create("activethief-dfal")
    assert (s.n_seed, s.per_round, s.retrain, s.dfal_overshoot, s.dfal_max_iter) == (500, 500, "fresh", 0.02, 50)


def test_dfal_acquisition_picks_the_smallest_deepfool_norms(victim):
    pool = _pool(40)
    bench = _bench(LocalOracle(victim, "probabilities"))
    torch.manual_seed(0)
    model = bench.make_model().eval()
    strategy = QueryStrategy.create("activethief-dfal", {"dfal_candidates": None, "dfal_max_iter": 30})
    unqueried = np.arange(5, 40)
    picks = strategy.acquire(model, pool, bench, np.arange(5), unqueried, 6, np.random.default_rng(0))
    res = at.deepfool(model, bench.load(pool, unqueried), max_iter=30)
    dist = torch.where(res.flipped, res.norm, torch.full_like(res.norm, float("inf"))).numpy()
    assert picks.tolist() == unqueried[np.argsort(dist, kind="stable")[:6]].tolist()


def test_run_extraction_entry_point_is_deterministic(victim):
    from distributed_me.extraction import AttackSpec, run_extraction
    from distributed_me.runner import evaluator_for

    evaluator = evaluator_for(victim)

    def once():
        spec = AttackSpec(strategy="activethief-kcenter", strategy_options={"n_seed": 10, "per_round": 10},
                          budget=30, arch="tiny_cnn", epochs=1, seed=3, adv_eval_samples=10)
        return run_extraction(LocalOracle(victim, "probabilities", budget=30), _pool(), spec,
                              evaluator)

    a, b = once(), once()
    assert a.queries_used == b.queries_used == 30
    assert (a.fidelity, a.history) == (b.fidelity, b.history)
