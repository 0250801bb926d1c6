"""KnockoffNets, adaptive strategy (Orekondy, Schiele, Fritz, "Knockoff Nets: Stealing Functionality of Black-Box
Models", CVPR 2019, §4.1.2), as used as an attack baseline in paper 002 (AdvFT, §3.2).

Threat model: black box; the attacker sees only the API's answers (probabilities, top-k or a label) for images it picks
from its own natural-image pool; the budget counts images sent to the API. The pool is split into "arms" and a
gradient bandit (Sutton & Barto, *Reinforcement Learning*, 2nd ed., §2.8) learns which arms yield informative answers:

* arms: the pool's own class labels (the paper uses the attacker's labelled transfer set, e.g. ImageNet classes), or,
  for an unlabelled pool, k-means clusters of cheap 8x8 grayscale features (our substitute for the paper's labels).
  ``arms="labels"`` must only be used when the labels are the *attacker's* annotations of its own pool, never the
  victim task's labels.
* policy: ``pi_t = softmax(H_t)`` over arms that still have unused images (exhausted arms get probability 0).
* step t: draw ``a_t ~ pi_t``, draw ``batch_per_step`` unused images of ``a_t`` uniformly, query them, reward ``r_t``,
  then ``H(a_t) += alpha (r_t - rbar_t)(1 - pi(a_t))`` and ``H(a) -= alpha (r_t - rbar_t) pi(a)`` for ``a != a_t``.
  Baseline convention: ``rbar_t`` is the mean of the rewards of steps ``0..t-1`` (strictly before this step), 0 at
  ``t = 0``. (S&B §2.8, 2018 edition, also excludes the current reward but sets ``rbar_1 = R_1``, which makes the
  first update a no-op; ART's implementation includes the current reward. We keep the first step informative.)
* rewards (§4.1.2), each averaged over the step's batch: certainty = ``P(top1) - P(top2)`` of the victim's answer;
  diversity = ``sum_k max(0, y_k - ybar_k)`` with ``ybar`` the mean answer over the last ``delta`` steps (this step
  included, as in the paper's ``ybar_{t:t-delta}``); loss = cross-entropy between the victim's answer and the
  substitute's prediction (0 until a first substitute exists). ``reward="all"`` (the paper's best) sums the three
  after standardizing each with its running mean and std.

Departures, for cost: the paper queries one image per step; we query ``batch_per_step`` (default 16) images of the
chosen arm per step, so a 10k budget takes ~600 bandit steps rather than 10k. The substitute is retrained on all pairs
so far every ``retrain_every`` queries (default: every 10% of the budget) for a few epochs, warm-started (only when the
reward uses the loss term), and once from scratch with the full training config at the end.

Numerical guards (the popular ART implementation overflows; see ../shared/STYLE.md): max-subtracted softmax, clipped
log in cross-entropy, a floored std when standardizing, one-hot targets for label-only answers, ``soft_targets()``
imputation for top-k answers.

Defaults: ``reward="all"`` (paper §4.1.2, best variant). ``alpha=0.1`` and ``delta=25`` are *our* choices (the paper
text available to us does not state them): 0.1 is the smaller of the two gradient-bandit step sizes of Sutton &
Barto's Fig. 2.5; with standardized rewards of order 1 each step moves H by at most ~0.1 (x3 for ``reward="all"``),
so the policy concentrates over tens of steps instead of collapsing on the first lucky arm. 25 steps of 16 images
average the diversity reference over 400 answers.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ..answer import Answer
from ..cost import work
from ..cost.work import CostJob, Work
from ..data.base import Pool
from ..errors import DmeError
from ..oracle import Oracle
from ..train import predict_probs
from .base import Extraction, QueryStrategy, Workbench, register_attack

log = logging.getLogger(__name__)

#: smallest probability fed to log() in the loss reward; keeps CE finite when the substitute says exactly 0
PROB_FLOOR = 1e-12
#: a running std below this is treated as 1 (constant rewards would otherwise divide by zero)
STD_FLOOR = 1e-8
#: at most this many pool rows are used to fit k-means (all rows are then assigned in batches)
KMEANS_SAMPLE = 20_000
#: side of the grayscale thumbnails clustered when the pool has no labels
FEATURE_SIZE = 8


# ---------------------------------------------------------------- pure bandit math (unit-tested by hand) -----------

def stable_softmax(h: np.ndarray, available: np.ndarray | None = None) -> np.ndarray:
    """``softmax(h)`` restricted to ``available`` arms (others get exactly 0), safe for any finite ``h`` (±1e4 too):
    the max over available arms is subtracted before exp, so the largest term is exp(0) = 1."""
    h = np.asarray(h, dtype=np.float64)
    mask = np.ones(h.shape, dtype=bool) if available is None else np.asarray(available, dtype=bool)
    if not mask.any():
        raise ValueError("no available arm to sample from")
    z = np.where(mask, h, -np.inf)
    e = np.where(mask, np.exp(z - z[mask].max()), 0.0)
    return e / e.sum()


class GradientBandit:
    """Gradient bandit of Sutton & Barto §2.8: preferences ``h`` with ``pi = softmax(h)`` and a mean-reward baseline.

    The baseline is the mean of all rewards passed to :meth:`update` *before* the current one (0 at the first).
    """

    def __init__(self, n_arms: int, alpha: float) -> None:
        if n_arms < 1:
            raise ValueError(f"need at least one arm, got {n_arms}")
        self.h = np.zeros(n_arms, dtype=np.float64)
        self.alpha = float(alpha)
        self.steps = 0
        self.baseline = 0.0

    def probs(self, available: np.ndarray | None = None) -> np.ndarray:
        return stable_softmax(self.h, available)

    def update(self, arm: int, reward: float, available: np.ndarray | None = None) -> None:
        """One policy-gradient step after pulling ``arm`` (drawn from ``probs(available)``) and observing ``reward``."""
        if not np.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        pi = self.probs(available)
        step = self.alpha * (reward - self.baseline)
        self.h -= step * pi  # every arm: -alpha (r - rbar) pi(a); unavailable arms have pi = 0 and stay put
        self.h[arm] += step  # the pulled arm: net +alpha (r - rbar)(1 - pi(a_t))
        self.steps += 1
        self.baseline += (reward - self.baseline) / self.steps


class RunningStandardizer:
    """Welford running mean/variance; :meth:`__call__` adds a value and returns it standardized by the stats so far
    (itself included), with std < ``STD_FLOOR`` treated as 1 so constant streams give 0, not NaN."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, x: float) -> float:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        std = float(np.sqrt(self.m2 / self.n))
        return (x - self.mean) / (std if std >= STD_FLOOR else 1.0)


def certainty_reward(y: np.ndarray) -> float:
    """Mean margin ``P(top1) - P(top2)`` of the victim's answers ``y`` (N, K): confident answers are informative."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if y.shape[1] < 2:
        return float(y[:, 0].mean())
    top2 = np.partition(y, -2, axis=1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).mean())


def diversity_reward(y: np.ndarray, window_mean: np.ndarray) -> float:
    """Mean over rows of ``sum_k max(0, y_k - ybar_k)``: rewards answers that differ from the recent average."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    return float(np.clip(y - np.asarray(window_mean, dtype=np.float64), 0.0, None).sum(axis=1).mean())


def loss_reward(y: np.ndarray, substitute: np.ndarray) -> float:
    """Mean cross-entropy ``-sum_k y_k log p_k`` of the substitute's probabilities ``p`` against the victim's ``y``:
    images the substitute gets wrong teach it most. ``p`` is clipped at ``PROB_FLOOR`` so a 0 never yields inf."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    p = np.clip(np.atleast_2d(np.asarray(substitute, dtype=np.float64)), PROB_FLOOR, 1.0)
    return float(-(y * np.log(p)).sum(axis=1).mean())


def answer_distribution(answer: Answer, num_classes: int) -> np.ndarray:
    """The victim's answer as one distribution per row: ``soft_targets()`` (top-k imputed), one-hot for labels."""
    soft = answer.soft_targets()
    if soft is not None:
        return soft.astype(np.float64)
    return np.eye(num_classes, dtype=np.float64)[answer.labels]


# ---------------------------------------------------------------- arms ---------------------------------------------

def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on rows of ``x``; returns the (k', D) centers, k' = min(k, len(x))."""
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    centers = [x[rng.integers(len(x))]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        centers.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = np.stack(centers)
    for _ in range(iters):
        assign = nearest_center(x, c)
        new = c.copy()
        for j in range(k):
            members = x[assign == j]
            if len(members):  # an empty cluster keeps its old center
                new[j] = members.mean(0)
        if np.allclose(new, c):
            break
        c = new
    return c


def nearest_center(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center per row, via ``|x|^2 - 2 x.c + |c|^2`` (no (N, k, D) temporary)."""
    x = np.asarray(x, dtype=np.float64)
    d = (x**2).sum(1, keepdims=True) - 2.0 * x @ centers.T + (centers**2).sum(1)
    return d.argmin(1)


def cluster_arms(pool: Pool, n_clusters: int, rng: np.random.Generator, batch_size: int = 1024) -> np.ndarray:
    """Arm id per pool row from k-means on 8x8 grayscale thumbnails, fit on at most ``KMEANS_SAMPLE`` rows.

    Two streamed passes (fit sample, then assign all) keep only the (N,) arm ids in memory, never the pool.
    """
    n = len(pool)
    sample = np.sort(rng.choice(n, size=min(n, KMEANS_SAMPLE), replace=False))
    feats = np.concatenate([imgs.reshape(len(imgs), -1).astype(np.float64) / 255.0
                            for _, imgs in pool.iter_batches(batch_size, sample, FEATURE_SIZE, 1)])
    centers = kmeans(feats, n_clusters, rng)
    arm_of = np.empty(n, dtype=np.int64)
    for idx, imgs in pool.iter_batches(batch_size, None, FEATURE_SIZE, 1):
        arm_of[idx] = nearest_center(imgs.reshape(len(imgs), -1).astype(np.float64) / 255.0, centers)
    return arm_of


def arm_queues(arm_of: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Pool indices of each non-empty arm in a random order: popping from the front of a shuffled queue is uniform
    sampling without replacement. One stable sort, O(N log N), whatever the number of arms."""
    order = rng.permutation(len(arm_of))
    order = order[np.argsort(arm_of[order], kind="stable")]
    counts = np.bincount(arm_of)
    return [q for q in np.split(order.astype(np.int64), np.cumsum(counts)[:-1]) if len(q)]


# ---------------------------------------------------------------- the strategy -------------------------------------

@register_attack
class KnockoffAdaptive(QueryStrategy):
    """KnockoffNets adaptive sampling: a gradient bandit over pool classes/clusters picks what to query next."""

    name: ClassVar[str] = "knockoff"
    accepts: ClassVar[tuple[str, ...]] = ("probabilities", "topk", "label")
    smoke_options: ClassVar[dict[str, Any]] = {"batch_per_step": 5}

    arms: Literal["auto", "labels", "clusters"] = "auto"
    n_clusters: int = Field(32, ge=1, description="k-means clusters used as arms when the pool has no labels")
    batch_per_step: int = Field(16, ge=1, description="images queried per bandit step (the paper uses 1)")
    alpha: float = Field(0.1, gt=0, description="step size of the preference update")
    reward: Literal["cert", "div", "loss", "all"] = "all"
    delta: int = Field(25, ge=1, description="steps averaged for the diversity reward")
    retrain_every: int | None = Field(None, ge=1, description="queries between substitute updates; None = budget/10")
    retrain_epochs: int = Field(2, ge=1, description="epochs of each warm-started interim substitute update")

    def _arm_ids(self, pool: Pool, rng: np.random.Generator) -> np.ndarray:
        use_labels = self.arms == "labels" or (self.arms == "auto" and pool.labels is not None)
        if use_labels:
            if pool.labels is None:
                raise DmeError(f"attack 'knockoff' option arms='labels' needs a labelled pool, but pool "
                               f"{pool.name!r} has no labels; use arms='clusters'")
            return np.unique(np.asarray(pool.labels), return_inverse=True)[1].astype(np.int64).ravel()
        return cluster_arms(pool, self.n_clusters, rng)

    def _reward(self, y: np.ndarray, sub: np.ndarray | None, window: deque[np.ndarray],
                stats: list[RunningStandardizer]) -> float:
        window.append(y)
        ybar = np.concatenate(list(window)).mean(0)
        parts = {"cert": lambda: certainty_reward(y), "div": lambda: diversity_reward(y, ybar),
                 "loss": lambda: 0.0 if sub is None else loss_reward(y, sub)}
        if self.reward != "all":
            return parts[self.reward]()
        return float(sum(s(parts[k]()) for s, k in zip(stats, ("cert", "div", "loss"))))

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        rng = np.random.default_rng(bench.seed)
        num_classes = oracle.info.num_classes
        with bench.timer.phase("selection"):
            arm_of = self._arm_ids(pool, rng)
            members = arm_queues(arm_of, rng)
            remaining = np.array([len(m) for m in members])
            used_in_arm = np.zeros(len(members), dtype=np.int64)
        log.info("knockoff: %d arms, budget %d in steps of %d", len(members), budget, self.batch_per_step)

        bandit = GradientBandit(len(members), self.alpha)
        window: deque[np.ndarray] = deque(maxlen=self.delta)
        stats = [RunningStandardizer() for _ in range(3)]
        every = self.retrain_every or max(1, budget // 10)
        queried: list[np.ndarray] = []
        images: list[torch.Tensor] = []
        answers: list[Answer] = []
        substitute: torch.nn.Module | None = None
        used = 0
        while used < budget:
            with bench.timer.phase("selection"):
                available = remaining > 0
                arm = int(rng.choice(len(members), p=bandit.probs(available)))
                n = int(min(self.batch_per_step, budget - used, remaining[arm]))
                idx = members[arm][used_in_arm[arm] : used_in_arm[arm] + n]
                used_in_arm[arm] += n
                remaining[arm] -= n
                x = bench.load(pool, idx)
            answer = bench.query(oracle, x)
            queried.append(idx)
            images.append(x)
            answers.append(answer)
            used += n
            with bench.timer.phase("selection"):
                y = answer_distribution(answer, num_classes)
                needs_sub = substitute is not None and self.reward in ("loss", "all")
                sub = predict_probs(substitute, x).numpy() if needs_sub else None
                bandit.update(arm, self._reward(y, sub, window, stats), available)
            crossed = used // every > (used - n) // every  # passed a multiple of retrain_every
            if crossed and used < budget and self.reward in ("loss", "all"):  # only the loss reward needs it
                substitute = self._interim_train(bench, images, answers)
        log.info("knockoff: %d bandit steps, final preferences min %.3g max %.3g", bandit.steps, bandit.h.min(),
                 bandit.h.max())
        model = bench.train(torch.cat(images), Answer.concat(answers), fresh=True)
        return Extraction(model, np.concatenate(queried).astype(np.int64), bench.history)

    def cost(self, job: CostJob) -> list[Work]:
        """Queries in bandit steps of ``batch_per_step`` images (one API request each); with the loss reward, the
        substitute scores every step's images and is updated (warm, ``retrain_epochs``) every ``retrain_every``
        queries; k-means on 8x8 thumbnails when the pool has no labels; then the final piracy model."""
        steps = -(-job.budget // self.batch_per_step)
        items = [work.query(job.victim, job.budget, self.batch_per_step)]
        labeled = job.pool is not None and job.pool.labels is not None
        if not (self.arms == "labels" or (self.arms == "auto" and labeled)):
            rows = min(job.pool_size, KMEANS_SAMPLE)
            d = FEATURE_SIZE * FEATURE_SIZE
            items.append(work.flops(3.0 * rows * self.n_clusters * d * 50 + 3.0 * job.pool_size * self.n_clusters * d,
                                    what="k-means arms"))
        if self.reward in ("loss", "all"):
            every = self.retrain_every or max(1, job.budget // 10)
            updates = [n for n in range(every, job.budget, every)]
            items += [work.train(job.piracy, n, self.retrain_epochs, job.batch_size, what="interim substitute")
                      for n in updates]
            if updates:
                items.append(work.infer(job.piracy, job.budget - updates[0], batch_size=self.batch_per_step,
                                        what="substitute on each step's images"))
        items.append(work.seconds(steps * 2e-4, "selection", "bandit steps"))
        items.append(work.train(job.piracy, job.budget, job.epochs, job.batch_size))
        return items

    def _interim_train(self, bench: Workbench, images: list[torch.Tensor], answers: list[Answer]) -> torch.nn.Module:
        """Warm-started update on all pairs so far, for the loss reward only: kept out of the per-epoch reports
        (``on_epoch``), which describe the final piracy model."""
        return bench.train(torch.cat(images), Answer.concat(answers), fresh=False, epochs=self.retrain_epochs,
                           interim=True)
