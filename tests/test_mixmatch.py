"""MixMatch-based extraction (paper 004 §3.3.3; Berthelot et al. 2019): the pieces of Algorithm 1 against hand-computed
cases, the training loop's use of the unlabeled set, and what reaches the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distributed_me.attacks import QueryStrategy, Timer, Workbench
from distributed_me.cost.work import CostJob, Net
from distributed_me.data import ArrayPool
from distributed_me.models import create_model
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.train import TrainConfig, predict_probs, soft_cross_entropy
from distributed_me.train.mixmatch import (
    MixMatchConfig,
    UnlabeledSet,
    guess_labels,
    mixmatch_batch,
    mixmatch_fit,
    mixmatch_loss,
    mixup,
    rampup_weight,
    sharpen,
)

CPU = torch.device("cpu")


class FirstPixelsAreLogits(nn.Module):
    """A model whose output is known: the logits are the image's first ``classes`` pixels."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.classes]


class ScriptedAugment:
    """A deterministic stand-in for the stochastic augmentation: call ``i`` applies ``transforms[i]``."""

    def __init__(self, *transforms) -> None:
        self.transforms, self.calls = transforms, 0

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = self.transforms[self.calls](x)
        self.calls += 1
        return out


def _logit_images(probs: list[list[float]], side: int = 2) -> torch.Tensor:
    """1×side×side images whose first pixels are log(probs): FirstPixelsAreLogits' softmax on them is ``probs``."""
    x = torch.zeros(len(probs), 1, side, side)
    x.view(len(probs), -1)[:, : len(probs[0])] = torch.log(torch.tensor(probs))
    return x


def test_sharpen_matches_the_hand_computed_case():
    p = torch.tensor([[0.6, 0.4], [0.25, 0.75]])
    expected = torch.tensor([[0.36, 0.16], [0.0625, 0.5625]])
    torch.testing.assert_close(sharpen(p, 0.5), expected / expected.sum(1, keepdim=True))
    torch.testing.assert_close(sharpen(p, 1.0), p)  # T = 1 leaves a distribution as it is
    assert sharpen(torch.tensor([[1e-20, 1.0]]), 0.1).isfinite().all()  # no 0/0 for tiny probabilities and small T


def test_label_guessing_averages_the_k_views_then_sharpens():
    """Unlabeled image 0 says [0.9, 0.1] in view 1 and [0.5, 0.5] in view 2: its guess is Sharpen([0.7, 0.3], 0.5) =
    [0.49, 0.09] / 0.58 (neither view alone, nor sharpening before averaging, gives it); image 1 ([0.2, 0.8], then
    [0.5, 0.5]) gets Sharpen([0.35, 0.65], 0.5). Every view's row carries its own image's guess."""
    model = FirstPixelsAreLogits()
    u = _logit_images([[0.9, 0.1], [0.2, 0.8]])
    x = _logit_images([[0.2, 0.8], [0.6, 0.4]])
    half = lambda v: torch.log(torch.full_like(v, 0.5))  # noqa: E731  (view 2: softmax [0.5, 0.5])
    aug = ScriptedAugment(lambda v: v, lambda v: v, half)  # call 0: the labeled batch; calls 1..K: the K views of u
    q0 = torch.tensor([0.49, 0.09]) / 0.58
    q1 = torch.tensor([0.1225, 0.4225]) / 0.545
    expected = torch.stack([q0, q1])
    torch.testing.assert_close(guess_labels(model, torch.cat([u, half(u)]), 2, 0.5), expected)
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # λ = 1 makes mixup the identity: the rows are the labeled images, then view 1, view 2, with their targets
    inputs, targets = mixmatch_batch(model, x, p, u, 2, 0.5, 1.0, aug, torch.Generator().manual_seed(0), CPU)
    assert aug.calls == 3  # the labeled batch augmented once, the unlabeled K = 2 times
    torch.testing.assert_close(inputs, torch.cat([x, u, half(u)]))
    torch.testing.assert_close(targets, torch.cat([p, expected, expected]))


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.5, 0.8, 1.0])
def test_mixup_keeps_every_row_closer_to_its_own_source(lam):
    x = torch.eye(6)
    y = torch.eye(6)[:, :3].roll(1, 0)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])
    mx, my = mixup(x, y, lam, perm)
    w = max(lam, 1 - lam)
    torch.testing.assert_close(mx, w * x + (1 - w) * x[perm])
    torch.testing.assert_close(my, w * y + (1 - w) * y[perm])
    assert ((mx - x).norm(dim=1) <= (mx - x[perm]).norm(dim=1) + 1e-6).all()
    assert (mx[torch.arange(6), torch.arange(6)] >= 0.5).all()


def test_mixed_labeled_rows_stay_labeled_in_a_real_batch():
    """Through mixmatch_batch with a real stochastic λ: each of the first b mixed rows keeps at least half of its own
    labeled target, so its target's argmax is still the answer's class (λ' ≥ 0.5, ties aside)."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, in_chans=1, img_size=8)
    g = torch.Generator().manual_seed(1)
    x, u = torch.rand(16, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g)
    labels = torch.arange(16) % 3
    p = torch.nn.functional.one_hot(labels, 3).float()
    for lam in np.random.default_rng(0).beta(0.75, 0.75, size=5):
        _, targets = mixmatch_batch(model, x, p, u, 2, 0.5, float(lam), lambda v, gen: v, g, CPU)
        assert targets.shape == (16 * 3, 3) and not targets.requires_grad  # guesses are constants, not paths
        assert (targets[torch.arange(16), labels] >= 0.5 - 1e-6).all()


def test_unsupervised_weight_ramps_up_linearly():
    assert [rampup_weight(s, 100, 100.0, 1.0) for s in (0, 25, 50, 100, 400)] == [0.0, 25.0, 50.0, 100.0, 100.0]
    assert [rampup_weight(s, 100, 100.0, 0.5) for s in (0, 25, 50, 75)] == [0.0, 50.0, 100.0, 100.0]
    assert rampup_weight(0, 100, 75.0, 0.0) == 75.0  # no ramp: full weight from the first step
    # in the loop: one step per epoch over 4 epochs, the weight at each epoch's step
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    history = mixmatch_fit(create_model("tiny_cnn", 3, in_chans=1, img_size=8), torch.rand(8, 1, 8, 8, generator=g),
                           torch.arange(8) % 3, TrainConfig(epochs=4, batch_size=8),
                           unlabeled=UnlabeledSet.from_tensor(torch.rand(20, 1, 8, 8, generator=g)),
                           options=MixMatchConfig(lambda_u=100.0))
    assert [row["lambda_u"] for row in history] == [0.0, 25.0, 50.0, 75.0]
    assert {"epoch", "train_loss", "train_agreement", "loss_x", "loss_u"} <= set(history[0])


def test_loss_is_labeled_cross_entropy_plus_weighted_l2_on_guesses():
    """By hand on 1 labeled and 2 unlabeled rows of 2 classes; with weight 0 it is plain soft cross-entropy on the
    mixed labeled rows and the unlabeled rows get no gradient."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    targets = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]])
    s0 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    lx = -(0.7 * s0[0].log() + 0.3 * s0[1].log())
    s2 = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    lu = ((0.5 - 1.0) ** 2 + (0.5 - 0.0) ** 2 + (s2[0] - 0.5) ** 2 + (s2[1] - 0.5) ** 2) / 4
    loss, got_x, got_u = mixmatch_loss(logits, targets, 1, 10.0)
    torch.testing.assert_close(got_x, lx)
    torch.testing.assert_close(got_u, lu)
    torch.testing.assert_close(loss, lx + 10.0 * lu)
    plain, _, _ = mixmatch_loss(logits, targets, 1, 0.0)
    torch.testing.assert_close(plain, soft_cross_entropy(logits[:1], targets[:1]))
    plain.backward()
    assert logits.grad[1:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def _toy(seed: int, n: int = 24, n_u: int = 96, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.softmax(torch.randn(n, classes, generator=g), 1)
    return x, y, torch.rand(n_u, 1, 8, 8, generator=g)


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def test_the_unlabeled_term_shapes_predictions_on_the_unlabeled_images():
    """What the unlabeled set is for: with λ_U > 0 the model is pulled to its own sharpened guesses on the unlabeled
    images, so its predictions there become far more confident than with λ_U = 0 on the same batches (measured: mean
    entropy 0.18-0.23 vs 1.29-1.37 nats, 4 classes, over 4 seeds)."""
    x, y, u = _toy(0, n=16, n_u=64)
    entropies = {}
    for lambda_u in (0.0, 100.0):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", 4, in_chans=1, img_size=8)
        mixmatch_fit(model, x, y, TrainConfig(epochs=12, batch_size=8, lr=1e-2), unlabeled=UnlabeledSet.from_tensor(u),
                     options=MixMatchConfig(lambda_u=lambda_u, rampup=0.0))
        entropies[lambda_u] = _entropy(predict_probs(model, u))
    assert entropies[100.0] < 0.5 * entropies[0.0], entropies


def test_each_labeled_batch_is_paired_with_an_equal_sized_unlabeled_batch_and_the_set_matters():
    """The unlabeled loader is asked for as many images as each labeled batch holds (paper 004 Table 7), cycling
    through the whole unlabeled set; the same set gives the same model, another set another model."""
    x, y, u = _toy(1, n=20, n_u=30)

    def train(images: torch.Tensor) -> tuple[list[np.ndarray], torch.Tensor]:
        asked: list[np.ndarray] = []

        def load(pos: np.ndarray) -> torch.Tensor:
            asked.append(pos.copy())
            return images[torch.from_numpy(pos)]

        torch.manual_seed(0)
        model = create_model("tiny_cnn", 4, in_chans=1, img_size=8)
        mixmatch_fit(model, x, y, TrainConfig(epochs=3, batch_size=8), unlabeled=UnlabeledSet(len(images), load))
        return asked, torch.cat([p.detach().flatten() for p in model.parameters()])

    asked, w = train(u)
    assert [len(a) for a in asked] == [8, 8, 4] * 3
    assert (np.bincount(np.concatenate(asked)) == 2).all()  # 60 draws = two permutations of the 30 unlabeled
    asked_again, w_again = train(u)
    assert torch.equal(w, w_again) and all(np.array_equal(a, b) for a, b in zip(asked, asked_again))
    _, w_other = train(torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(9)))
    assert not torch.allclose(w, w_other)


def test_ema_weights_replace_the_model_at_the_end():
    x, y, u = _toy(2, n=16, n_u=16)

    def weights(ema: float | None) -> torch.Tensor:
        torch.manual_seed(0)
        model = create_model("tiny_cnn", 4, in_chans=1, img_size=8)
        mixmatch_fit(model, x, y, TrainConfig(epochs=2, batch_size=8), unlabeled=UnlabeledSet.from_tensor(u),
                     options=MixMatchConfig(ema_decay=ema))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = weights(None)
    torch.testing.assert_close(weights(0.0), plain)  # decay 0: the average is the last weights
    assert not torch.allclose(weights(0.9), plain)


class RecordingPool(ArrayPool):
    """Records each load with the number of oracle batches sent before it."""

    def __init__(self, images: np.ndarray, oracle: RecordingOracle) -> None:
        super().__init__(images, name="noise")
        self.oracle = oracle
        self.loads: list[tuple[int, np.ndarray]] = []

    def _load(self, idx: np.ndarray) -> np.ndarray:
        self.loads.append((len(self.oracle.sent), idx.copy()))
        return super()._load(idx)


def _attack(linear_victim, kind: str, options: dict, n: int = 60, budget: int = 20, epochs: int = 3):
    oracle = RecordingOracle(LocalOracle(linear_victim, kind, budget=budget + 5))
    pool = RecordingPool(np.random.default_rng(0).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8), oracle)
    bench = Workbench(lambda: create_model("tiny_cnn", 4, in_chans=1, img_size=4), TrainConfig(epochs=epochs),
                      linear_victim.input_shape, Timer(), seed=3)
    out = QueryStrategy.create("mixmatch", options).extract(oracle, pool, budget, bench)
    return oracle, pool, bench, out


@pytest.mark.parametrize("kind", ["probabilities", "label"])
def test_only_the_labeled_selection_reaches_the_oracle_and_the_rest_is_unlabeled(linear_victim, kind):
    """The oracle sees exactly the random selection (the basic attack's draw for the same seed); every image loaded
    after the query is an unqueried pool image, and over 3 epochs (60 draws of 40) all 40 of them are used."""
    oracle, pool, bench, out = _attack(linear_victim, kind, {})
    expected = np.sort(np.random.default_rng(3).choice(60, size=20, replace=False))
    np.testing.assert_array_equal(out.queried, expected)
    assert oracle.queries_used == 20
    after = np.concatenate([idx for sent, idx in pool.loads if sent > 0])
    assert set(after.tolist()) == set(range(60)) - set(expected.tolist())
    torch.testing.assert_close(oracle.images(), bench.load(pool, expected))
    assert [r["epoch"] for r in out.history] == [1, 2, 3] and bench.history is out.history


def test_unlabeled_max_caps_the_unlabeled_set_to_a_random_subset(linear_victim):
    oracle, pool, _, out = _attack(linear_victim, "topk:2", {"unlabeled_max": 10}, epochs=2)
    after = set(np.concatenate([idx for sent, idx in pool.loads if sent > 0]).tolist())
    assert len(after) == 10 and not after & set(out.queried.tolist()) and oracle.queries_used == 20


def test_cost_prices_queries_the_supervised_part_and_the_unlabeled_views():
    piracy = Net("tiny_cnn", 16, 1, 10)
    s = QueryStrategy.create("mixmatch", {"k": 3})
    items = s.cost(CostJob(budget=100, pool_size=1000, piracy=piracy, epochs=5, batch_size=64))
    got = [(w.kind, w.samples, w.passes, w.batch_size) for w in items]
    assert got == [("query", 100, 1, 256), ("train", 100, 5, 64), ("train", 100, 15, 64), ("infer", 300, 5, 192)]
    only_labeled = s.cost(CostJob(budget=100, pool_size=100, piracy=piracy, epochs=5))
    assert [w.kind for w in only_labeled] == ["query", "train"]  # no unlabeled image left: plain mixup training
