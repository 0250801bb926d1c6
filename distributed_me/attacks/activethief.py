"""ActiveThief (Pal et al., "ActiveThief: Model Extraction Using Active Learning and Unannotated Public Data",
AAAI 2020).

Pool-based active learning against a black-box API, as MEBench runs it (paper 004 §3.3.3, "Active learning": "At each
iteration, ActiveThief picks k central samples from the unlabeled data ... to query the API. These responses are added
to the training set ..., which is used to train f_p. This process continues until the allocated query budget n_budget
is exhausted") and as SwiftTheft uses it as a baseline (paper 003 §IV.2: "We randomly select 500 samples as the
initial seed data and select 500 samples in each iteration"; §II names ActiveThief's DFAL strategy [14]; paper 004 §7
lists "uncertainty, K-center, and DeepFool-based active learning" as the strategies of [49]).

Loop, shared by the three registered strategies:

1. Seed: ``min(n_seed, budget)`` pool samples drawn uniformly without replacement, queried, substitute trained.
2. Round: the substitute scores the pool (batched through ``Pool.iter_batches``; only an (N, C) probability matrix or
   an N-vector of scores is kept, never the images), the acquisition function picks ``min(per_round, budget left)``
   unqueried samples, they are queried, and the substitute is retrained on *all* query-response pairs so far (from
   scratch by default, ``retrain="fresh"``; ``"continue"`` fine-tunes the current model instead).
3. Repeat until the budget is spent; the last round may be partial.

Acquisition functions (one strategy each):

* ``activethief-kcenter`` -- k-Center-Greedy (Sener & Savarese 2018) in the space of the substitute's softmax outputs,
  the space ActiveThief uses; centers = every sample queried so far (:func:`.selection.kcenter_greedy`). Paper 004
  describes the space as the piracy model's "latent space"; its output layer is what a black-box substitute of any
  architecture exposes uniformly, so we follow ActiveThief.
* ``activethief-uncertainty`` -- the samples whose substitute output has the highest entropy (``measure="entropy"``)
  or the lowest top probability (``"least_confidence"``).
* ``activethief-dfal`` -- DeepFool Active Learning (Ducoffe & Precioso 2018): DeepFool (Moosavi-Dezfooli et al., CVPR
  2016) on the substitute; the samples with the smallest perturbation that flips its prediction are nearest to its
  decision boundary. DeepFool is ~``max_iter`` forward/backward passes per sample, so each round it runs on a *random*
  subset of ``dfal_candidates`` unqueried samples (our choice of restriction: unbiased and independent of the other
  acquisition functions; ``None`` = the whole unqueried pool).

Threat model: black box; any answer kind (soft targets when scores come back, labels otherwise -- ``Workbench.train``).
The budget counts images sent to the API; no index is queried twice. Defaults ``n_seed = per_round = 500`` are
paper 003 §IV.2's setting (``selection.PAPER_N_SEED``/``PAPER_K_PER_ITER``); ``overshoot = 0.02``, ``max_iter = 50``
and ``dfal_classes = 10`` are DeepFool's reference defaults.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..answer import Answer
from ..cost import work
from ..cost.work import CostJob, Work
from ..data.base import Pool, to_tensor
from ..device import get_device
from ..oracle import Oracle
from ..train import predict_probs
from .base import Extraction, QueryStrategy, Workbench, register_attack
from .selection import PAPER_K_PER_ITER, PAPER_N_SEED, kcenter_greedy

log = logging.getLogger(__name__)

__all__ = [
    "ActiveThiefDFAL",
    "ActiveThiefExtraction",
    "ActiveThiefKCenter",
    "ActiveThiefUncertainty",
    "deepfool",
    "select_uncertain",
    "substitute_probs",
    "uncertainty_scores",
]


# ---------------------------------------------------------------------------------------------------- pure helpers


def uncertainty_scores(probs: np.ndarray, measure: Literal["entropy", "least_confidence"] = "entropy") -> np.ndarray:
    """Per-row uncertainty of an (N, C) probability matrix, higher = more uncertain, in float64.

    ``entropy``: ``-sum_c p_c log p_c`` (with ``0 log 0 = 0``); ``least_confidence``: ``1 - max_c p_c``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {p.shape}")
    if measure == "entropy":
        logp = np.log(np.where(p > 0, p, 1.0))
        return -(p * logp).sum(axis=1)
    if measure == "least_confidence":
        return 1.0 - p.max(axis=1)
    raise ValueError(f"measure must be 'entropy' or 'least_confidence', got {measure!r}")


def select_uncertain(probs: np.ndarray, k: int, measure: Literal["entropy", "least_confidence"] = "entropy"
                     ) -> np.ndarray:
    """Row indices of the ``k`` most uncertain rows, most uncertain first; exact ties go to the lower row."""
    scores = uncertainty_scores(probs, measure)
    if not 0 <= k <= len(scores):
        raise ValueError(f"k ({k}) must lie in [0, {len(scores)}]")
    return np.argsort(-scores, kind="stable")[:k].astype(np.int64)


@torch.no_grad()
def substitute_probs(model: nn.Module, pool: Pool, bench: Workbench, idx: np.ndarray | None = None,
                     batch_size: int = 512) -> np.ndarray:
    """Softmax outputs of ``model`` on ``pool[idx]`` (all of it if ``None``) as float32 (len(idx), C).

    Images are decoded batch by batch; only the probability matrix survives, so memory is O(N * C), not O(N * pixels).
    """
    c, h, _ = bench.input_shape
    parts = [predict_probs(model, to_tensor(images), batch_size).numpy()
             for _, images in pool.iter_batches(batch_size, idx, size=h, channels=c)]
    return np.concatenate(parts).astype(np.float32, copy=False)


@dataclass
class DeepFoolResult:
    """``perturbation`` (same shape as the input; ``x + perturbation`` is the adversarial point), its L2 ``norm`` per
    sample, whether it ``flipped`` the prediction within ``max_iter``, and the ``iterations`` each sample used."""

    perturbation: torch.Tensor
    norm: torch.Tensor
    flipped: torch.Tensor
    iterations: torch.Tensor


def deepfool(model: nn.Module, x: torch.Tensor, max_iter: int = 50, overshoot: float = 0.02,
             num_classes: int = 10) -> DeepFoolResult:
    """Batched multi-class DeepFool (Moosavi-Dezfooli et al. 2016, Algorithm 2), L2.

    For every sample with original class ``k0``: linearise ``f_k - f_k0`` at the current point for the ``num_classes``
    top classes of the clean logits (DeepFool's candidate restriction; all classes if fewer), step onto the nearest
    linearised boundary ``r = (|f'_l| + 1e-4) / ||w_l||^2 * w_l``, accumulate, and stop once
    ``x + (1 + overshoot) * r_tot`` changes the prediction. On a linear binary classifier this is exact in one step:
    ``||r|| = (1 + overshoot) * (|w.x + b| + 1e-4) / ||w||``. No clipping to [0, 1]: the norm is a distance score for
    DFAL, never a query. Samples are independent (the model runs in eval mode); only unflipped samples are recomputed.
    """
    model.eval()
    device = next(model.parameters()).device
    x0 = x.detach().to(device, torch.float32)
    n = x0.shape[0]
    with torch.no_grad():
        logits0 = model(x0)
    m = min(num_classes, logits0.shape[1])
    cand = logits0.topk(m, dim=1).indices  # (N, m), column 0 = original class
    k0 = cand[:, 0]
    r_tot = torch.zeros_like(x0)
    flipped = torch.zeros(n, dtype=torch.bool, device=device)
    iters = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)
    for it in range(max_iter + 1):
        xi = (x0[active] + (1 + overshoot) * r_tot[active]).requires_grad_(True)
        with torch.enable_grad():
            logits = model(xi)
            now = logits.argmax(dim=1)
            done = now != k0[active]
            flipped[active[done]] = True
            keep = ~done
            if it == max_iter or not keep.any():
                break
            picked = logits.gather(1, cand[active])  # (A, m)
            grads = [torch.autograd.grad(picked[:, j].sum(), xi, retain_graph=j < m - 1)[0] for j in range(m)]
        g = torch.stack(grads, dim=1).flatten(2)  # (A, m, D)
        w = g[:, 1:] - g[:, :1]  # (A, m-1, D)
        f = (picked[:, 1:] - picked[:, :1]).detach()  # (A, m-1)
        wnorm = w.norm(dim=2).clamp_min(1e-12)
        dist = f.abs() / wnorm
        best = dist.argmin(dim=1)
        rows = torch.arange(len(best), device=device)
        step = ((f[rows, best].abs() + 1e-4) / wnorm[rows, best] ** 2)[:, None] * w[rows, best]
        upd = active[keep]
        r_tot[upd] += step[keep].view_as(x0[upd])
        iters[upd] += 1
        active = upd
    pert = (1 + overshoot) * r_tot
    return DeepFoolResult(pert.detach(), pert.flatten(1).norm(dim=1).detach(), flipped, iters)


# ---------------------------------------------------------------------------------------------------- strategies


@dataclass
class ActiveThiefExtraction(Extraction):
    """:class:`Extraction` plus one row per round: round, picked, queried so far, selection/query/train seconds."""

    rounds: list[dict] = field(default_factory=list)


class _ActiveThief(QueryStrategy):
    """The seed-then-rounds loop; subclasses implement :meth:`acquire` (the acquisition function)."""

    n_seed: int = Field(PAPER_N_SEED, ge=1, description="random seed queries (paper 003 §IV.2: 500)")
    per_round: int = Field(PAPER_K_PER_ITER, ge=1, description="queries picked per round (paper 003 §IV.2: 500)")
    retrain: Literal["fresh", "continue"] = "fresh"
    epochs_per_round: int | None = Field(None, ge=1, description="epochs of intermediate rounds; None = spec epochs")
    infer_batch_size: int = Field(512, ge=1, description="pool batch size for substitute inference")

    accepts: ClassVar[tuple[str, ...]] = ("probabilities", "topk", "label")
    smoke_options: ClassVar[dict[str, Any]] = {"n_seed": 10, "per_round": 10}

    def acquire(self, model: nn.Module, pool: Pool, bench: Workbench, queried: np.ndarray, unqueried: np.ndarray,
                k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` distinct pool indices from ``unqueried``, in pick order."""
        raise NotImplementedError

    def acquire_cost(self, job: CostJob, queried: int, k: int) -> list[Work]:
        """The work of one :meth:`acquire` with ``queried`` samples queried so far and ``k`` to pick."""
        raise NotImplementedError

    def cost(self, job: CostJob) -> list[Work]:
        """Round 0 queries the seeds; every later round retrains the substitute on all pairs so far
        (``epochs_per_round``, the last round ``epochs``), then acquires ``per_round`` more, as :meth:`extract`."""
        items: list[Work] = []
        n = min(self.n_seed, job.budget)
        while True:
            final = n >= job.budget
            items.append(work.train(job.piracy, n, job.epochs if final else (self.epochs_per_round or job.epochs),
                                    job.batch_size, what="piracy model" if final else "interim substitutes"))
            if final:
                break
            k = min(self.per_round, job.budget - n)
            items += self.acquire_cost(job, n, k)
            n += k
        return [work.query(job.victim, job.budget, job.query_batch), *items]

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> ActiveThiefExtraction:
        self.check(oracle, pool, budget)
        rng = np.random.default_rng(bench.seed)
        rounds: list[dict] = []
        t0 = time.perf_counter()
        with bench.timer.phase("selection"):
            picks = rng.choice(len(pool), size=min(self.n_seed, budget), replace=False).astype(np.int64)
            images = bench.load(pool, picks)
        sel_s = time.perf_counter() - t0
        is_queried = np.zeros(len(pool), dtype=bool)
        order: list[np.ndarray] = []
        all_images: torch.Tensor | None = None
        answers: list[Answer] = []
        model: nn.Module | None = None
        rnd = 0
        while True:
            t1 = time.perf_counter()
            answers.append(bench.query(oracle, images))
            t2 = time.perf_counter()
            order.append(picks)
            is_queried[picks] = True
            all_images = images if all_images is None else torch.cat([all_images, images])
            n_done = int(is_queried.sum())
            final = n_done >= budget
            model = bench.train(all_images, Answer.concat(answers), fresh=rnd == 0 or self.retrain == "fresh",
                                epochs=None if final else self.epochs_per_round, interim=not final)
            t3 = time.perf_counter()
            rounds.append({"round": rnd, "picked": len(picks), "queried": n_done, "selection_seconds": sel_s,
                           "query_seconds": t2 - t1, "train_seconds": t3 - t2})
            log.info("%s round %d: %d picked, %d/%d queried, selection %.2fs", self.name, rnd, len(picks), n_done,
                     budget, sel_s)
            if final:
                break
            rnd += 1
            k = min(self.per_round, budget - n_done)
            t0 = time.perf_counter()
            with bench.timer.phase("selection"):
                queried = np.concatenate(order)
                picks = np.asarray(self.acquire(model, pool, bench, queried, np.flatnonzero(~is_queried), k, rng),
                                   dtype=np.int64)
                if len(picks) != k or len(np.unique(picks)) != k or is_queried[picks].any():
                    raise RuntimeError(f"{self.name}: acquisition returned an invalid pick set")  # a bug, not user's
                images = bench.load(pool, picks)
            sel_s = time.perf_counter() - t0
        return ActiveThiefExtraction(model, np.concatenate(order), bench.history, rounds)  # type: ignore[arg-type]


@register_attack
class ActiveThiefKCenter(_ActiveThief):
    """k-Center-Greedy on the substitute's softmax outputs; centers = every sample queried so far."""

    name = "activethief-kcenter"

    def acquire(self, model, pool, bench, queried, unqueried, k, rng):
        probs = substitute_probs(model, pool, bench, None, self.infer_batch_size)  # queried rows are the centers
        return kcenter_greedy(probs, queried, k)

    def acquire_cost(self, job: CostJob, queried: int, k: int) -> list[Work]:
        c, n = job.piracy.num_classes, job.pool_size
        return [work.infer(job.piracy, n, batch_size=self.infer_batch_size, what="substitute over the pool"),
                # min distances to the queried set (blocked matmuls), then k picks of O(N·C) each, in float64
                work.flops(2.0 * n * queried * c + 4.0 * n * k * c, what="k-center greedy")]


@register_attack
class ActiveThiefUncertainty(_ActiveThief):
    """The unqueried samples on which the substitute is least sure (entropy or least confidence)."""

    name = "activethief-uncertainty"
    measure: Literal["entropy", "least_confidence"] = "entropy"

    def acquire(self, model, pool, bench, queried, unqueried, k, rng):
        probs = substitute_probs(model, pool, bench, unqueried, self.infer_batch_size)
        return unqueried[select_uncertain(probs, k, self.measure)]

    def acquire_cost(self, job: CostJob, queried: int, k: int) -> list[Work]:
        return [work.infer(job.piracy, job.pool_size - queried, batch_size=self.infer_batch_size,
                           what="substitute over the unqueried pool")]


@register_attack
class ActiveThiefDFAL(_ActiveThief):
    """DeepFool Active Learning: the candidates with the smallest DeepFool perturbation on the substitute.

    Each round DeepFool runs on ``max(dfal_candidates, k)`` unqueried samples drawn uniformly at random (``None`` =
    all of them). Samples DeepFool cannot flip within ``dfal_max_iter`` rank last (infinite distance).
    """

    name = "activethief-dfal"
    smoke_options: ClassVar[dict[str, Any]] = {"n_seed": 10, "per_round": 10, "dfal_candidates": 60,
                                               "dfal_max_iter": 5}
    dfal_candidates: int | None = Field(5000, ge=1, description="random unqueried samples DeepFool runs on per round")
    dfal_max_iter: int = Field(50, ge=1)
    dfal_overshoot: float = Field(0.02, ge=0)
    dfal_classes: int = Field(10, ge=2, description="top classes DeepFool linearises against")
    dfal_batch_size: int = Field(128, ge=1)

    def acquire(self, model, pool, bench, queried, unqueried, k, rng):
        cand = unqueried
        if self.dfal_candidates is not None and max(self.dfal_candidates, k) < len(unqueried):
            cand = np.sort(rng.choice(unqueried, size=max(self.dfal_candidates, k), replace=False))
        c, h, _ = bench.input_shape
        model.eval().to(get_device())
        dist = np.empty(len(cand), dtype=np.float64)
        pos = 0
        for _, images in pool.iter_batches(self.dfal_batch_size, cand, size=h, channels=c):
            res = deepfool(model, to_tensor(images), self.dfal_max_iter, self.dfal_overshoot, self.dfal_classes)
            d = torch.where(res.flipped, res.norm, torch.full_like(res.norm, float("inf")))
            dist[pos : pos + len(images)] = d.cpu().numpy()
            pos += len(images)
        return cand[np.argsort(dist, kind="stable")[:k]]

    #: DeepFool iterations a candidate takes on average before it flips (each linearises ``dfal_classes`` logits,
    #: one backward pass each). The loop stops at the flip, rarely near ``dfal_max_iter``; 3 is an assumption (small
    #: CNNs on natural images flip in 2-4 steps), corrected by recorded runs.
    DEEPFOOL_MEAN_ITERS: ClassVar[int] = 3

    def acquire_cost(self, job: CostJob, queried: int, k: int) -> list[Work]:
        unqueried = job.pool_size - queried
        cand = unqueried if self.dfal_candidates is None else min(unqueried, max(self.dfal_candidates, k))
        iters = min(self.dfal_max_iter, self.DEEPFOOL_MEAN_ITERS)
        return [work.grad(job.piracy, cand, iters * self.dfal_classes, self.dfal_batch_size, phase="selection",
                          what="DeepFool on candidates")]
