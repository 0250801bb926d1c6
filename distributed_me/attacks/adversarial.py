"""Adversarial queries: MEBench's adversarial learning strategy (paper 004 §3.3.3, "Adversarial learning", Tables 9 and
10), after CloudLeak (Yu et al., "CloudLeak: Large-Scale Deep Learning Models Stealing Through Adversarial Examples",
NDSS 2020).

Adversarial examples crafted against the current piracy model lie near its decision boundaries, in its most uncertain
regions; querying them there shows the API where the piracy model is wrong and pulls it toward the victim's boundaries
(004 §3.3.3). Loop:

1. Seed: ``min(n_seed, budget, len(pool))`` clean pool images drawn uniformly without replacement, queried; the
   substitute (piracy model) is trained on them. Adversarial examples need a model to be adversarial *to*; MEBench
   does not say how its first batch is made, so we start from one clean batch (``n_seed = 64``, one batch).
2. Round: a batch of ``min(batch_size, budget left)`` queries. ``round(adv_ratio · n)`` of them are adversarial
   examples crafted on *unused* pool images against the current substitute, untargeted, with the substitute's own
   prediction as the label (no query is spent on the clean source): PGD (L∞, reusing
   :func:`distributed_me.metrics.pgd`) or CW-L2 (:func:`cw_l2`). The rest are clean unused pool images, sent as-is.
3. Every ``retrain_every`` rounds the substitute is retrained on all pairs so far (interim; ``retrain="fresh"`` from
   scratch, ``"continue"`` fine-tunes); after the budget is spent the piracy model is trained on every pair.

What counts as a query: every image sent, seeds and clean images (reported with their pool index) and adversarial
images (reported :data:`~distributed_me.attacks.base.GENERATED`; :attr:`AdversarialExtraction.origin` keeps the pool
image each one was crafted from). No pool image is sent as-is twice and each one is the source of at most one query
while unused images remain. The budget is bounded by the API key (``draws_from_pool = False``): once every pool
image has been used, adversarial examples are crafted again from images drawn at random from the whole pool (a fresh
random start makes a new query), and the clean share of a batch that finds no unused image left is made adversarial.
A budget over the pool with ``adv_ratio = 0`` (clean queries only) is refused by :meth:`check`.

Threat model: black box, any answer kind (crafting uses the substitute only; training goes through
:meth:`Workbench.train`: soft targets when the API returns scores, labels otherwise).

Defaults and their sources (004 §3.3.3): batches of 64 (Tables 9, 10: "batch size fixed as 64"); PGD ``eps = 4/255``,
``alpha = 2/255``, 7 iterations, random start; CW ``kappa = 40``, 50 steps, LR 0.01. ``adv_ratio = 1.0``: Table 9's
PGD/CW columns query adversarial examples only — its PGD fidelities equal Table 10's 1:0 column (42.92 on RAFDB, 49.35
on FER+ at 32 batches) and its basic attack the 0:1 column (45.94). Ambiguities and choices:

* CW's constant ``c`` is not given; ``c = 1`` with no binary search (the parameter set "kappa, steps, LR 0.01" is that
  of torchattacks' ``CW``, whose ``c`` defaults to 1). Per sample we return the smallest-L2 iterate that reached the
  margin ``max_{j≠y} Z_j - Z_y >= kappa``, else the last iterate (never the clean image: that would spend a query on
  a clean image reported as generated).
* Retraining schedule: after every batch (``retrain_every = 1``), CloudLeak's and MEBench's per-batch update of the
  piracy model; ``epochs_per_round=None`` trains interim substitutes for the spec's epochs.
* Order within a batch: the adversarial queries first, then the clean ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..cost import work
from ..cost.work import CostJob, Work
from ..data.base import Pool
from ..device import get_device
from ..errors import DmeError
from ..metrics import PGD_STEPS, pgd
from ..oracle import Oracle
from .base import GENERATED, Extraction, QueryBook, QueryStrategy, Workbench, register_attack

log = logging.getLogger(__name__)

__all__ = ["AdversarialExtraction", "AdversarialQueries", "craft", "cw_l2", "n_adversarial"]


def n_adversarial(n: int, ratio: float) -> int:
    """Adversarial queries in a batch of ``n``: ``ratio · n`` rounded half up."""
    return min(n, int(np.floor(ratio * n + 0.5)))


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: float = 40.0, steps: int = 50, lr: float = 0.01,
          c: float = 1.0) -> torch.Tensor:
    """Untargeted Carlini–Wagner L2 (S&P 2017) on float images in [0, 1], without the search over ``c``.

    Minimises ``||x' - x||² + c · max(Z_y(x') - max_{j≠y} Z_j(x'), -kappa)`` over ``x' = (tanh(w) + 1) / 2`` with Adam
    (``lr``) for ``steps`` steps. Per sample, returns the smallest-L2 iterate whose margin
    ``max_{j≠y} Z_j - Z_y`` reached ``kappa``, or the last iterate if none did; on ``x``'s device."""
    model.eval()
    x = x.detach()
    w = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best = x.clone()
    best_l2 = torch.full((len(x),), float("inf"), device=x.device)
    for step in range(steps + 1):
        with torch.enable_grad():
            adv = (torch.tanh(w) + 1) / 2
            l2 = (adv - x).pow(2).flatten(1).sum(1)
            z = model(adv)
            real = z.gather(1, y[:, None]).squeeze(1)
            other = z.scatter(1, y[:, None], float("-inf")).max(1).values
            margin = other - real
            loss = l2.sum() + c * torch.clamp(-margin, min=-kappa).sum()
        with torch.no_grad():
            ok = (margin >= kappa) & (l2 < best_l2)
            best[ok], best_l2[ok] = adv[ok].detach(), l2[ok].detach()
        if step == steps:  # the last iterate is scored, not stepped from
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.where(torch.isfinite(best_l2).view(-1, *[1] * (x.dim() - 1)), best, adv.detach())


def craft(model: nn.Module, x: torch.Tensor, method: Literal["pgd", "cw"], *, eps: float = 4 / 255,
          alpha: float = 2 / 255, pgd_steps: int = PGD_STEPS, random_start: bool = True, kappa: float = 40.0,
          cw_steps: int = 50, cw_lr: float = 0.01, cw_c: float = 1.0, generator: torch.Generator | None = None,
          batch_size: int = 256) -> torch.Tensor:
    """Untargeted adversarial examples of ``x`` against ``model``, labelled by ``model``'s own prediction; CPU."""
    device = get_device()
    model.eval().to(device)
    out: list[torch.Tensor] = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].detach().to(device, torch.float32)
        with torch.no_grad():
            y = model(xb).argmax(1)
        if method == "pgd":
            adv = pgd(model, xb, y, eps, alpha, pgd_steps, random_start, generator)
        else:
            adv = cw_l2(model, xb, y, kappa, cw_steps, cw_lr, cw_c)
        out.append(adv.cpu())
    return torch.cat(out) if out else x[:0].detach().cpu()


@dataclass
class AdversarialExtraction(Extraction):
    """:class:`Extraction` plus, per query, the pool image it ``origin``-ates from (the image itself for a clean
    query, the source for an adversarial one), and one row per round."""

    origin: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    rounds: list[dict] = field(default_factory=list)


@register_attack
class AdversarialQueries(QueryStrategy):
    """Batches of adversarial (PGD or CW) and clean pool queries against the current substitute; see the module
    docstring."""

    name = "adversarial"
    method: Literal["pgd", "cw"] = "pgd"
    adv_ratio: float = Field(1.0, ge=0, le=1, description="adversarial fraction of each batch (004 Table 10)")
    batch_size: int = Field(64, ge=1, description="queries per round (004 §3.3.3: 64)")
    n_seed: int = Field(64, ge=1, description="clean pool images of the first batch")
    retrain_every: int = Field(1, ge=1, description="rounds between interim substitute trainings")
    retrain: Literal["fresh", "continue"] = "fresh"
    epochs_per_round: int | None = Field(None, ge=1, description="epochs of interim substitutes; None = spec epochs")
    eps: float = Field(4 / 255, gt=0, le=1, description="PGD L∞ radius (004 §3.3.3: 4/255)")
    alpha: float = Field(2 / 255, gt=0, le=1, description="PGD step (004 §3.3.3: 2/255)")
    pgd_steps: int = Field(PGD_STEPS, ge=1, description="PGD iterations (004 §3.3.3: 7)")
    random_start: bool = True
    kappa: float = Field(40.0, ge=0, description="CW confidence margin (004 §3.3.3: 40)")
    cw_steps: int = Field(50, ge=1, description="CW Adam steps (004 §3.3.3: 50)")
    cw_lr: float = Field(0.01, gt=0, description="CW learning rate (004 §3.3.3: 0.01)")
    cw_c: float = Field(1.0, gt=0, description="CW constant c (not given by 004; torchattacks' default)")
    grad_batch_size: int = Field(256, ge=1, description="batch size of crafting")

    accepts: ClassVar[tuple[str, ...]] = ("probabilities", "topk", "label")
    draws_from_pool: ClassVar[bool] = False
    smoke_options: ClassVar[dict[str, Any]] = {"n_seed": 10, "batch_size": 9, "adv_ratio": 0.67, "retrain_every": 2}
    #: interim substitutes after every batch of 64 are the heavy part: every 4 batches, with fewer epochs
    cpu_small_options: ClassVar[dict[str, Any]] = {"retrain_every": 4, "epochs_per_round": 3}

    def check(self, oracle: Oracle, pool: Pool, budget: int) -> None:
        super().check(oracle, pool, budget)
        if self.adv_ratio == 0 and budget > len(pool):
            raise DmeError(f"budget {budget} is larger than the pool {pool.name!r} ({len(pool)} images) and "
                           "adv_ratio = 0 sends clean pool images only; lower --budget or raise adv_ratio")

    def _schedule(self, budget: int) -> list[tuple[int, int, bool]]:
        """(queries so far, adversarial queries of the batch, retrain after it) per round, as :meth:`extract`."""
        n, rnd, out = min(self.n_seed, budget), 0, []
        while n < budget:
            b = min(self.batch_size, budget - n)
            n += b
            rnd += 1
            out.append((n, n_adversarial(b, self.adv_ratio), n < budget and rnd % self.retrain_every == 0))
        return out

    def cost(self, job: CostJob) -> list[Work]:
        """The seed substitute, then per round: a forward pass (the substitute's labels) and ``pgd_steps`` or
        ``cw_steps`` forward+backward passes over its adversarial share, and an interim substitute every
        ``retrain_every`` rounds; the piracy model on all ``budget`` pairs."""
        seeds = min(self.n_seed, job.budget)
        items: list[Work] = []
        if seeds < job.budget:
            items.append(work.train(job.piracy, seeds, self.epochs_per_round or job.epochs, job.batch_size,
                                    what="interim substitutes"))
        steps = self.pgd_steps if self.method == "pgd" else self.cw_steps + 1
        for n, n_adv, retrain in self._schedule(job.budget):
            if n_adv:
                items.append(work.infer(job.piracy, n_adv, batch_size=self.grad_batch_size,
                                        what="substitute labels of the sources"))
                items.append(work.grad(job.piracy, n_adv, steps, self.grad_batch_size, phase="selection",
                                       what=f"{self.method.upper()} on the substitute"))
            if retrain:
                items.append(work.train(job.piracy, n, self.epochs_per_round or job.epochs, job.batch_size,
                                        what="interim substitutes"))
        items.append(work.train(job.piracy, job.budget, job.epochs, job.batch_size))
        return [work.query(job.victim, job.budget, job.query_batch), *items]

    def _craft(self, model: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return craft(model, x, self.method, eps=self.eps, alpha=self.alpha, pgd_steps=self.pgd_steps,
                     random_start=self.random_start, kappa=self.kappa, cw_steps=self.cw_steps, cw_lr=self.cw_lr,
                     cw_c=self.cw_c, generator=gen, batch_size=self.grad_batch_size)

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> AdversarialExtraction:
        self.check(oracle, pool, budget)
        rng = np.random.default_rng(bench.seed)
        gen = torch.Generator().manual_seed(bench.seed)
        book = QueryBook(oracle, budget, bench)
        with bench.timer.phase("selection"):
            order = rng.permutation(len(pool)).astype(np.int64)  # unused pool images, in the order they are used
            seeds = np.sort(order[: min(self.n_seed, budget, len(pool))])
            images = bench.load(pool, seeds)
        pos = len(seeds)
        book.ask(images, seeds)
        origin: list[np.ndarray] = [seeds]
        rounds: list[dict] = []
        x, answer = book.pairs()
        model = bench.train(x, answer, interim=book.left > 0)
        rnd = 0
        while book.left > 0:
            rnd += 1
            n = min(self.batch_size, book.left)
            with bench.timer.phase("selection"):
                n_clean = min(n - n_adversarial(n, self.adv_ratio), len(pool) - pos)
                n_adv = n - n_clean
                fresh = min(n_adv, len(pool) - pos)
                adv_src = np.concatenate([order[pos : pos + fresh],
                                          rng.choice(len(pool), size=n_adv - fresh).astype(np.int64)])
                pos += fresh
                clean = np.sort(order[pos : pos + n_clean])
                pos += n_clean
                parts, sources = [], []
                if n_adv:
                    parts.append(self._craft(model, bench.load(pool, adv_src), gen))
                    sources.append(np.full(n_adv, GENERATED, dtype=np.int64))
                if n_clean:
                    parts.append(bench.load(pool, clean))
                    sources.append(clean)
            book.ask(torch.cat(parts), np.concatenate(sources))
            origin += [adv_src, clean]
            final = book.left == 0
            retrained = final or rnd % self.retrain_every == 0
            if retrained:
                x, answer = book.pairs()
                model = bench.train(x, answer, fresh=self.retrain == "fresh",
                                    epochs=None if final else self.epochs_per_round, interim=not final)
            rounds.append({"round": rnd, "adversarial": n_adv, "clean": n_clean, "queried": book.used,
                           "retrained": retrained})
            log.info("adversarial round %d: %d %s + %d clean, %d/%d queried", rnd, n_adv, self.method, n_clean,
                     book.used, budget)
        return AdversarialExtraction(model, book.queried, bench.history, np.concatenate(origin), rounds)


@register_attack
class AdversarialPGD(AdversarialQueries):
    """``adversarial`` with ``method="pgd"`` under its own name, so PGD and CW queries are two levels of a sweep's
    ``strategy`` factor (MEBench Table 9's columns)."""

    name = "adversarial-pgd"
    method: Literal["pgd", "cw"] = "pgd"


@register_attack
class AdversarialCW(AdversarialQueries):
    """``adversarial`` with ``method="cw"`` under its own name (MEBench Table 9's CW column)."""

    name = "adversarial-cw"
    method: Literal["pgd", "cw"] = "cw"
