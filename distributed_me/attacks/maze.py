"""MAZE: Kariyappa, Prakash, Qureshi, "MAZE: Data-Free Model Stealing Attack Using Zeroth-Order Gradient
Estimation", CVPR 2021 (§3, Alg. 1).

Threat model: black box, no data (the pool is ignored); the API must return probabilities (the generator's objective
and the clone's loss are KL divergences to them), so a top-k or label-only API is refused at :meth:`check`. As in
DFME, a generator is trained to produce inputs where clone and victim disagree, and the clone to agree:

* generator step (``n_G`` per iteration): ``B`` images; the disagreement ``KL(victim ‖ clone)`` per image has its
  gradient w.r.t. the generator's pre-activation estimated by zeroth-order forward differences (MAZE eq. 6,
  :mod:`distributed_me.attacks.datafree`) along ``m = ndirs`` random unit directions with smoothing ``μ``, and the
  generator (SGD) descends ``−KL``;
* clone steps (``n_S`` per iteration): the first reuses the generator step's images *and their paid answers* (the
  unperturbed points of the estimate; the authors' ``c == 0``), the others query ``B`` fresh generator images; one
  SGD step on ``KL(victim ‖ clone)`` each;
* experience replay (MAZE §3.3): the last clone batch of each iteration, images and the victim's answers, is stored
  (every stored pair was paid for; the buffer is never filled otherwise), and the clone takes ``n_R`` further SGD
  steps on batches drawn uniformly from everything stored so far.

What counts as a query: every image sent to the API, perturbed points included. One iteration costs
``B · (n_G (m + 1) + n_S − 1)`` queries (the authors' ``budget_per_iter``): 128 · 15 = 1,920 with the defaults. Every
query is a generated image. At the end of the budget one iteration runs at the batch that still fits, then the last
queries (fewer than a row's cost) go to clone-only batches, stored for replay too: exactly ``budget`` queries, every
answer used.

Defaults: the authors' code (sanjaykariyappa/MAZE ``src/utils/config.py``, ``src/attacks/maze.py``,
``src/models/conv3_gen.py``): batch 128, latent 100, ``conv3_gen`` (= DFME's GeneratorA with ``ngf`` 64 and an affine
last BatchNorm), ``ndirs`` 10, ``μ = 1e-3``, ``iter_gen`` 1, ``iter_clone`` 5, ``iter_exp`` 10, clone SGD lr 0.1 and
generator SGD lr 1e-4 (both momentum 0.9, weight decay 5e-4), cosine annealing over the iterations; no GAN term
(``alpha_gan = 0``, the data-free setting). The authors' default budget is 5M (``--budget``).

Choices where the sources leave room: images ``(tanh(x_pre) + 1) / 2`` (see DFME's note); the clone is evaluated in
eval mode during the estimate (the authors leave it in train mode, so its BatchNorm statistics differ between the base
and the perturbed batches by noise); replay samples ``min(B, stored)`` pairs without replacement per step (the authors
cycle a shuffled loader and stop the replay loop at its short last batch); the replay buffer is unbounded as theirs
(``replay_size`` caps it, oldest out first: 1/15 of the budget is stored, 24 GB of CIFAR images at 30M queries).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from ..cost.work import CostJob, Work
from ..data.base import Pool
from ..device import get_device
from ..oracle import Oracle
from .base import Extraction, QueryBook, Workbench, register_attack
from .datafree import (
    DataFreeStrategy,
    Generator,
    ReplayBuffer,
    Reporter,
    datafree_cost,
    fit_step,
    forward_difference,
    frozen,
    generator_flops,
    job_shape,
    kl_per_sample,
    lr_lambda,
    next_batch,
    perturb,
    plan_budget,
    to_images,
    victim_probs,
)

log = logging.getLogger(__name__)


@register_attack
class MAZE(DataFreeStrategy):
    """Data-free model stealing with zeroth-order gradients of the KL disagreement and experience replay."""

    name: ClassVar[str] = "maze"
    smoke_options: ClassVar[dict[str, Any]] = {"batch_size": 4, "latent_dim": 16, "ngf": 8, "ndirs": 2,
                                               "iter_exp": 2}
    cpu_small_options: ClassVar[dict[str, Any]] = {"batch_size": 64, "latent_dim": 64, "ngf": 16,
                                                   "replay_size": 20_000}

    batch_size: int = Field(128, ge=1, description="generator and clone batch (B)")
    latent_dim: int = Field(100, ge=1, description="generator noise dimension")
    ngf: int = Field(64, ge=1, description="generator width (conv3_gen: 128 and 64 feature maps)")
    ndirs: int = Field(10, ge=1, description="random directions per sample of the gradient estimate (m)")
    mu: float = Field(1e-3, gt=0, description="forward-difference smoothing step on the pre-activation")
    iter_gen: int = Field(1, ge=1, description="generator steps per iteration (n_G)")
    iter_clone: int = Field(5, ge=1, description="clone steps per iteration (n_S), the first on the estimate's "
                                                 "base points")
    iter_exp: int = Field(10, ge=0, description="experience-replay clone steps per iteration (n_R)")
    replay_size: int | None = Field(None, ge=1, description="replay capacity (None: unbounded, as the authors')")
    lr_clone: float = Field(0.1, gt=0)
    lr_gen: float = Field(1e-4, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["cosine", "multistep", "none"] = "cosine"

    @property
    def per_sample(self) -> int:
        """Queries per batch row of one iteration: ``n_G (m + 1) + n_S − 1``."""
        return self.iter_gen * (self.ndirs + 1) + self.iter_clone - 1

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        device = get_device()
        plan = plan_budget(budget, self.batch_size, self.per_sample)
        with bench.timer.phase("setup"):
            torch.manual_seed(bench.seed)
            clone = bench.make_model().to(device)
            generator = Generator(bench.input_shape, self.latent_dim, self.ngf, final_affine=True).to(device)
            noise = torch.Generator().manual_seed(bench.seed)
            opt_s = torch.optim.SGD(clone.parameters(), lr=self.lr_clone, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
            opt_g = torch.optim.SGD(generator.parameters(), lr=self.lr_gen, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
            factor = lr_lambda(self.scheduler, plan.iterations, (0.1, 0.3, 0.5), 0.3)
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_s, opt_g)]
            replay = ReplayBuffer(self.replay_size)
        bench.model = clone
        book = QueryBook(oracle, budget, bench, keep=False)
        report = Reporter(bench, plan.iterations, bench.train_cfg.epochs)
        counts = {"queries": 0, "generator_queries": 0, "student_queries": 0, "replay_samples": 0}
        clone.train()
        generator.train()

        def generator_step(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            """One generator update; returns its base images and their paid answers (probabilities)."""
            with bench.timer.phase("selection"):
                x_pre = generator(torch.randn(b, self.latent_dim, generator=noise).to(device))
                points, u = perturb(x_pre, self.ndirs, self.mu, noise)
                images = to_images(points)
            answer = book.ask(images)
            assert answer is not None and len(answer) == len(images), "the plan overran the budget"
            with bench.timer.phase("selection"), frozen(clone):
                probs = victim_probs(answer, device)
                with torch.no_grad():
                    values = -kl_per_sample(clone(images), probs)
                opt_g.zero_grad(set_to_none=True)
                x_pre.backward(forward_difference(values, u, self.mu))
                opt_g.step()
            report.add("generator_loss", float(values.view(b, -1)[:, 0].mean()))
            counts["generator_queries"] += len(images)
            base = torch.arange(b, device=device) * (self.ndirs + 1)
            return images[base].detach(), probs[base]

        def fresh(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            with bench.timer.phase("selection"), torch.no_grad():
                images = to_images(generator(torch.randn(b, self.latent_dim, generator=noise).to(device)))
            answer = book.ask(images)
            assert answer is not None and len(answer) == b, "the plan overran the budget"
            counts["student_queries"] += b
            return images, victim_probs(answer, device)

        def clone_step(images: torch.Tensor, probs: torch.Tensor, key: str = "train_loss") -> None:
            with bench.timer.phase("train"):
                loss, logits = fit_step([clone], opt_s, images, lambda s: kl_per_sample(s, probs).mean())
                report.add(key, loss)
                if key == "train_loss":
                    report.add("train_agreement", float((logits.argmax(1) == probs.argmax(1)).sum()), len(images))

        def replay_steps() -> None:
            for _ in range(self.iter_exp if len(replay) else 0):
                with bench.timer.phase("train"):
                    x, y = replay.sample(self.batch_size, noise)
                clone_step(x.to(device), y.to(device), key="replay_loss")
                counts["replay_samples"] += len(x)

        while book.left > 0:
            b = next_batch(book.left, self.batch_size, self.per_sample)
            if b == 0:  # the tail: fewer queries left than one row of an iteration costs
                batch = fresh(min(self.batch_size, book.left))
                clone_step(*batch)
                replay.add(*batch)
            else:
                for _ in range(self.iter_gen):
                    batch = generator_step(b)
                clone_step(*batch)  # c == 0: the last generator step's base points, already paid
                for _ in range(self.iter_clone - 1):
                    batch = fresh(b)
                    clone_step(*batch)
                replay.add(*batch)  # the last clone batch of the iteration, as the authors store it
                replay_steps()
                for s in scheds:
                    s.step()
            counts["queries"] = book.used
            if b > 0:
                report.end_iteration(counts, last=book.left == 0)
        report.flush(counts)
        clone.eval()
        bench.history = report.rows
        return Extraction(clone, book.queried, bench.history)

    def cost(self, job: CostJob) -> list[Work]:
        """Per planned iteration: ``n_G`` generator steps (the clone on the ``B (m+1)`` estimate points), ``n_S``
        clone steps (``n_S − 1`` on fresh generator images), ``n_R`` replay steps; then the tail's clone steps."""
        plan = plan_budget(job.budget, self.batch_size, self.per_sample)
        gen_rows = sum(plan.batches) * self.iter_gen
        fresh_rows = sum(plan.batches) * (self.iter_clone - 1) + sum(plan.tail)
        asks = [b * (self.ndirs + 1) for b in plan.batches for _ in range(self.iter_gen)]
        asks += [b for b in plan.batches for _ in range(self.iter_clone - 1)] + plan.tail
        return datafree_cost(job, asks, gen_flops=generator_flops(job_shape(job), self.latent_dim, self.ngf),
                             gen_train_rows=gen_rows, gen_sample_rows=fresh_rows,
                             estimate_rows=gen_rows * (self.ndirs + 1),
                             estimate_batch=self.batch_size * (self.ndirs + 1),
                             student_rows=sum(plan.batches) * self.iter_clone + sum(plan.tail),
                             student_batch=self.batch_size,
                             replay_rows=plan.iterations * self.iter_exp * self.batch_size)
