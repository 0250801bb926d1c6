"""MixMatch-based model extraction: MEBench's semi-supervised attack (paper 004 §3.3.3, Tables 7 and 19), after
Jagielski et al. (USENIX Security 2020), with MixMatch of Berthelot et al. (NeurIPS 2019).

Threat model: black box, any response kind (probabilities, top-k, label); the attacker has an unlabeled pool. It
queries ``budget`` pool images drawn uniformly without replacement (exactly the basic attack's selection, same seed,
same images: :mod:`~distributed_me.attacks.random`), and the answers are MixMatch's *labeled* set. The rest of the pool
(or a random ``unlabeled_max`` of it) is the *unlabeled* set: those images are never sent to the API, so the budget
counts the labeled set only. The piracy model is then trained by :func:`~distributed_me.train.mixmatch.mixmatch_fit`
through :meth:`Workbench.train` (so the (image, answer) pairs stay auditable): each labeled batch of 64 is paired with
an equal-sized unlabeled batch (paper 004 Table 7), guessed labels come from ``K`` augmentations, sharpened at ``T``,
and mixed up with the labeled batch. Labeled targets are the API's soft labels when it returns scores (top-k imputed
as for the basic attack), MixMatch's one-hot labels otherwise.

Defaults and their sources: ``k = 2``, ``temperature = 0.5``, ``alpha = 0.75``, ``lambda_u = 100`` are Berthelot et
al.'s (§4); batch size 64 comes from the training config (MEBench Table 7 fixes it at 64, as does our default);
``unlabeled_max = None`` uses the whole rest of the pool as paper 004 does (RAF-DB / ExpW: every image not queried),
decoded one batch at a time so a 1M-image pool costs only its index.

Ambiguities and the choices made (more in :mod:`distributed_me.train.mixmatch`):

* the paper's λ_U ramp spans its first 16k of ~1M steps; our runs are far shorter, so ``rampup`` is a fraction of the
  run (default 1.0, YU1ut/MixMatch-pytorch's choice);
* an epoch is one pass over the labeled set (the basic attack's step count), each step drawing a fresh unlabeled
  batch of the labeled batch's size; MixMatch steps cost about ``1 + K`` supervised steps plus ``K`` guess passes;
* the weight EMA the paper evaluates (0.999) is off by default (``ema_decay``): over a few hundred steps a 0.999
  average is still mostly the initial weights;
* augmentation is the project's crop-and-resize (:mod:`distributed_me.train.augment`), MixMatch's "standard"
  augmentation being crops and flips; flips stay opt-in (``hflip`` of the training config).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from ..cost import work
from ..cost.work import CostJob, Work
from ..data.base import Pool
from ..oracle import Oracle
from ..train.mixmatch import MixMatchConfig, UnlabeledSet, mixmatch_fit
from .base import Extraction, QueryStrategy, Workbench, register_attack

log = logging.getLogger(__name__)


@register_attack
class MixMatchAttack(QueryStrategy):
    """MixMatch semi-supervised extraction: random queries are the labeled set, the unqueried pool the unlabeled set
    (paper 004 §3.3.3; Berthelot et al. 2019). Only the labeled set is sent to the API."""

    name = "mixmatch"
    smoke_options: ClassVar[dict[str, Any]] = {"unlabeled_max": 128}
    # K = 1 halves the unlabeled work per step (Berthelot et al. Table 4: a small accuracy cost); a 10k-image cap
    cpu_small_options: ClassVar[dict[str, Any]] = {"k": 1, "unlabeled_max": 10_000}
    learning_test_budget: ClassVar[int | None] = 200

    k: int = Field(2, ge=1, description="K, augmentations of each unlabeled image averaged for its guessed label")
    temperature: float = Field(0.5, gt=0, description="T, sharpening temperature of the guessed labels")
    alpha: float = Field(0.75, gt=0, description="α of the Beta(α, α) mixup weight (λ' = max(λ, 1 - λ))")
    lambda_u: float = Field(100.0, ge=0, description="λ_U, weight of the unlabeled L2 loss after the ramp")
    rampup: float = Field(1.0, ge=0, description="fraction of the training steps over which λ_U ramps up from 0")
    unlabeled_max: int | None = Field(None, ge=1, description="unlabeled images drawn at random from the unqueried "
                                      "pool; None = all of them")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="EMA of the weights kept and used at the end "
                                    "(the paper: 0.999); None = off")

    def mixmatch_config(self) -> MixMatchConfig:
        return MixMatchConfig(k=self.k, temperature=self.temperature, alpha=self.alpha, lambda_u=self.lambda_u,
                              rampup=self.rampup, ema_decay=self.ema_decay)

    def cost(self, job: CostJob) -> list[Work]:
        """The queries, the supervised part of every step (the labeled set, ``epochs`` times), and, when the pool has
        images left, per epoch ``K`` views of as many unlabeled images trained on and passed forward once more to
        guess their labels."""
        items = [work.query(job.victim, job.budget, job.query_batch),
                 work.train(job.piracy, job.budget, job.epochs, job.batch_size)]
        n_unlabeled = max(0, job.pool_size - job.budget)
        if self.unlabeled_max is not None:
            n_unlabeled = min(n_unlabeled, self.unlabeled_max)
        if n_unlabeled:
            items += [work.train(job.piracy, job.budget, self.k * job.epochs, job.batch_size,
                                 what="MixMatch unlabeled views"),
                      work.infer(job.piracy, self.k * job.budget, job.epochs, self.k * job.batch_size, phase="train",
                                 what="MixMatch label guessing")]
        return items

    def unlabeled_indices(self, pool_size: int, queried: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The pool indices not queried, or a random ``unlabeled_max`` of them, sorted."""
        rest = np.setdiff1d(np.arange(pool_size, dtype=np.int64), queried, assume_unique=True)
        if self.unlabeled_max is not None and len(rest) > self.unlabeled_max:
            rest = np.sort(rng.choice(rest, size=self.unlabeled_max, replace=False))
        return rest

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        with bench.timer.phase("selection"):
            rng = np.random.default_rng(bench.seed)
            idx = np.sort(rng.choice(len(pool), size=budget, replace=False))  # the basic attack's draw
            images = bench.load(pool, idx)
            rest = self.unlabeled_indices(len(pool), idx, rng)
        answer = bench.query(oracle, images)
        log.info("mixmatch: %d labeled (queried) and %d unlabeled pool images", budget, len(rest))
        unlabeled = UnlabeledSet(len(rest), lambda pos: bench.load(pool, rest[pos]))
        fit_fn = functools.partial(mixmatch_fit, unlabeled=unlabeled, options=self.mixmatch_config())
        model = bench.train(images, answer, fit_fn=fit_fn)
        return Extraction(model, idx, bench.history)
