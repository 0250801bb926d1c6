"""Adversarial queries (``adversarial``, MEBench §3.3.3 after CloudLeak): PGD queries stay in the ε-ball of their
clean source and flip the substitute where noise of the same size does not; CW meets its margin κ; the batches mix
adversarial and clean queries at the requested ratio; the pool is used once before any source is reused."""

import numpy as np
import pytest
import torch
from torch import nn

from distributed_me.attacks import GENERATED, QueryStrategy, Timer, Workbench
from distributed_me.attacks.adversarial import craft, cw_l2, n_adversarial
from distributed_me.cost.work import CostJob, Net
from distributed_me.data import ArrayPool
from distributed_me.errors import DmeError
from distributed_me.models import create_model
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.train import TrainConfig
from distributed_me.victims import load_victim

EPS = 4 / 255


@pytest.fixture(scope="module")
def victim():
    return load_victim(None)


def _noise_pool(n: int = 120) -> ArrayPool:
    rng = np.random.default_rng(0)
    return ArrayPool(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), name="noise")


class CountingBench(Workbench):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.runs: list[tuple[int, bool]] = []

    def train(self, images, answer, **kw):
        self.runs.append((len(images), kw.get("interim", False)))
        return super().train(images, answer, **kw)


def _bench(victim) -> CountingBench:
    return CountingBench(lambda: create_model("tiny_cnn", 10, in_chans=1, img_size=16), TrainConfig(epochs=1),
                         victim.input_shape, Timer(), seed=0)


def test_pgd_queries_stay_in_the_eps_ball_of_their_pool_source(victim):
    pool = _noise_pool()
    oracle = RecordingOracle(LocalOracle(victim, "label", budget=40))
    bench = _bench(victim)
    out = QueryStrategy.create("adversarial", {"n_seed": 8, "batch_size": 8}).extract(oracle, pool, 32, bench)
    sent = oracle.images()
    assert oracle.queries_used == len(out.queried) == len(sent) == len(out.origin) == 32
    assert (out.queried[:8] >= 0).all() and (out.queried[8:] == GENERATED).all()  # default adv_ratio 1.0
    assert len(np.unique(out.origin)) == 32  # every query from its own pool image
    src = bench.load(pool, out.origin)
    gap = (sent - src).abs().flatten(1).max(1).values
    assert (gap[8:] <= EPS + 1e-6).all() and (gap[8:] > 0).all() and (gap[:8] == 0).all()
    assert 0 <= sent.min() and sent.max() <= 1
    assert [r["retrained"] for r in out.rounds] == [True, True, True]
    assert bench.runs == [(8, True), (16, True), (24, True), (32, False)]


def test_pgd_flips_the_substitute_more_often_than_noise_of_the_same_size():
    """7-step PGD at ε = 4/255 (the defaults of :func:`craft`) against a substitute changes its prediction far more
    often than ±ε random-sign noise, the corners of the same L∞ ball. A linear substitute keeps it fast and clear-cut:
    PGD moves each logit gap by ε·||w_j - w_y||_1, noise by about ε·||w_j - w_y||_2 (16x less on 256 pixels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    x = torch.rand(200, 1, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = craft(model, x, "pgd", generator=torch.Generator().manual_seed(0), batch_size=64)
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    noise = (x + EPS * signs).clamp(0, 1)
    assert (adv - x).abs().max() <= EPS + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    with torch.no_grad():
        pgd_flips = (model(adv).argmax(1) != y).sum().item()
        noise_flips = (model(noise).argmax(1) != y).sum().item()
    assert pgd_flips >= 100 and pgd_flips > 5 * noise_flips, (pgd_flips, noise_flips)  # measured 130 vs 7


def _toy_linear() -> nn.Module:
    """Two classes on 8x8 pixels, logit difference 8 · (sum of the left half - sum of the right half)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2, bias=False))
    pattern = torch.ones(1, 8, 8)
    pattern[..., 4:] = -1
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([4 * pattern.flatten(), -4 * pattern.flatten()]))
    return model


def test_cw_meets_the_margin_kappa_on_a_linear_model():
    torch.manual_seed(0)
    model = _toy_linear()
    x = 0.3 + 0.4 * torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = cw_l2(model, x, y, kappa=40, steps=50, lr=0.01)
    with torch.no_grad():
        z = model(adv)
    margin = z.gather(1, (1 - y)[:, None]).squeeze(1) - z.gather(1, y[:, None]).squeeze(1)
    assert (margin >= 40 - 1e-3).all(), margin
    assert 0 <= adv.min() and adv.max() <= 1
    # the smallest-L2 iterate meeting the margin, not an overshoot: the margin grows by at most 8 per unit of L1
    # change here, so reaching 40 from the clean margin m0 < 0 needs L1 >= (40 - m0) / 8; Adam's steps stay near that
    with torch.no_grad():
        z0 = model(x)
    m0 = z0.gather(1, (1 - y)[:, None]).squeeze(1) - z0.gather(1, y[:, None]).squeeze(1)
    l1 = (adv - x).abs().flatten(1).sum(1)
    assert (m0 < 0).all() and (l1 >= (40 - m0) / 8 - 1e-3).all() and (l1 <= 1.5 * (40 - m0) / 8).all(), (l1, m0)
    # an unreachable margin: the last iterate, moved toward the boundary, never the clean image
    far = cw_l2(model, x, y, kappa=1e6, steps=5, lr=0.01)
    with torch.no_grad():
        zf = model(far)
    m_far = zf.gather(1, (1 - y)[:, None]).squeeze(1) - zf.gather(1, y[:, None]).squeeze(1)
    assert not torch.equal(far, x) and (m_far > m0 + 1).all() and (m_far < 40).all()


@pytest.mark.parametrize("ratio,expected", [(0.25, [2, 2, 2, 1]), (0.5, [4, 4, 4, 3]), (0.0, [0, 0, 0, 0])])
def test_batches_mix_adversarial_and_clean_queries_at_the_ratio(victim, ratio, expected):
    """Seeds 8, batches of 8, budget 37: three full batches and a last one of 5 (its share rounded half up)."""
    assert [n_adversarial(n, ratio) for n in (8, 8, 8, 5)] == expected
    pool = _noise_pool()
    oracle = RecordingOracle(LocalOracle(victim, "probabilities", budget=37))
    bench = _bench(victim)
    strategy = QueryStrategy.create("adversarial", {"n_seed": 8, "batch_size": 8, "adv_ratio": ratio,
                                                    "retrain_every": 2})
    out = strategy.extract(oracle, pool, 37, bench)
    assert oracle.queries_used == len(out.queried) == 37
    blocks = np.split(out.queried[8:], [8, 16, 24])
    assert [int((b == GENERATED).sum()) for b in blocks] == expected
    for b, k in zip(blocks, expected, strict=True):
        assert (b[:k] == GENERATED).all() and (b[k:] >= 0).all()  # adversarial first, then clean
    clean = out.queried[out.queried >= 0]
    assert len(np.unique(clean)) == len(clean)
    torch.testing.assert_close(oracle.images()[torch.from_numpy(out.queried >= 0)], bench.load(pool, clean))
    np.testing.assert_array_equal(out.origin[out.queried >= 0], clean)
    # retrain every 2 rounds: after the seeds, after round 2, and the final piracy model after round 4
    assert bench.runs == [(8, True), (24, True), (37, False)]


def test_pool_is_used_once_before_any_source_is_reused_and_clean_only_needs_the_pool(victim):
    pool = _noise_pool(20)
    oracle = LocalOracle(victim, "label", budget=40)
    strategy = QueryStrategy.create("adversarial", {"n_seed": 8, "batch_size": 8, "adv_ratio": 0.5})
    out = strategy.extract(oracle, pool, 30, _bench(victim))
    assert oracle.queries_used == 30
    assert sorted(out.origin[:20].tolist()) == list(range(20))  # the whole pool first, each image once
    clean = out.queried[out.queried >= 0]
    assert len(np.unique(clean)) == len(clean) and (out.queried[20:] == GENERATED).all()
    clean_only = QueryStrategy.create("adversarial", {"adv_ratio": 0.0})
    with pytest.raises(DmeError, match="larger than the pool"):
        clean_only.check(LocalOracle(victim, "label"), pool, 21)


def test_cost_prices_the_rounds_as_extract_runs_them():
    s = QueryStrategy.create("adversarial", {"method": "cw", "adv_ratio": 0.5, "retrain_every": 2,
                                             "epochs_per_round": 2})
    job = CostJob(budget=64 * 5, pool_size=1000, piracy=Net("cnn32", 32, 3, 10), epochs=7)
    items = s.cost(job)
    assert sum(w.samples for w in items if w.kind == "query") == 320
    assert [(w.samples, w.passes) for w in items if w.kind == "train"] == [(64, 2), (192, 2), (320, 7)]
    assert [(w.samples, w.passes, w.phase) for w in items if w.kind == "grad"] == [(32, 51, "selection")] * 4
