"""DFME: Truong, Maini, Walls, Papernot, "Data-Free Model Extraction", CVPR 2021 (§3, Alg. 1), as the attack of the
AdvFT defense paper (002, §3.1: MNIST/LeNet 6M, FMNIST/ResNet-18 8M, CIFAR-10/ResNet-18 15M queries).

Threat model: black box, no data at all (the pool is ignored); the API must return probabilities (the attack trains
on logits recovered from them and estimates gradients from their changes), so a top-k or label-only API is refused
at :meth:`check`. The attacker's images come from a generator trained to *maximize* the student–victim disagreement,
the student to minimize it, in turns (a data-free adversarial distillation, after DFAD):

* generator step (``n_g`` per iteration): ``B`` images from noise ``z ~ N(0, I_nz)``; the disagreement
  ``L(x) = mean_k |s_k(x) − t_k(x)|`` (student logits ``s``, victim logits recovered as ``t = log p − mean_k log p``)
  has no victim gradient, so its gradient w.r.t. the generator's pre-activation is estimated by forward differences
  along ``m`` random unit directions with step ``ε`` (:mod:`distributed_me.attacks.datafree`, DFME eq. 5) and
  back-propagated through the generator, which descends ``−L`` with Adam;
* student step (``n_s`` per iteration): ``B`` fresh generator images (generator not updated), queried, and one SGD
  step on the L1 loss ``mean |s − t|``.

What counts as a query: every image sent to the API, the ``m`` perturbed points of the gradient estimate included.
One iteration costs ``B · (n_g · (m + 1) + n_s)`` queries (the authors' ``cost_per_iteration``): 256 · 7 = 1,792 with
the defaults. Every query is a generated image (:data:`~distributed_me.attacks.base.GENERATED`). When what is left of
the budget is less than a full iteration, one last iteration runs at the batch that still fits
(``left // (n_g·(m+1) + n_s)`` rows), then what remains (fewer than a row's cost) is spent on student-only batches:
exactly ``budget`` queries are paid and every answer is used (the authors stop at the last *full* iteration instead).

Defaults: the authors' CIFAR-10 run (cake-lab/datafree-model-extraction ``run_cifar_dfme.sh`` and ``dfme/train.py``):
batch 256, ``nz`` 256, generator GeneratorA (``ngf`` 64, last BatchNorm without affine), ``m = 1``, ``ε = 1e-3``,
``n_g = 1``, ``n_s = 5``, L1 loss with mean logit correction, student SGD (lr 0.1, momentum 0.9, weight decay 5e-4),
generator Adam lr 5e-4 (the run script's; ``train.py`` defaults to 1e-4), both decayed ×0.3 at 10%, 30% and 50% of
training (``MultiStepLR``; ``scheduler="cosine"`` is their alternative). The paper's CIFAR-10 budget is 20M queries.

Choices where the sources leave room: images are ``(tanh(x_pre) + 1) / 2`` in [0, 1] (the papers send tanh outputs in
the normalized space; this is the same image, affinely moved, and the student sees it through its own normalization).
Learning rates step per iteration at fractions of the planned iterations (the authors step per "epoch" of 50
iterations). The student is evaluated in eval mode during the gradient estimate, as the authors do; the generator
stays in train mode (BatchNorm batch statistics) throughout, as theirs does. The victim's probabilities are floored at
1e-12 before the log. The estimator omits DFME's extra division by the class count (a constant its Adam cancels).
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
    Reporter,
    datafree_cost,
    fit_step,
    forward_difference,
    frozen,
    generator_flops,
    job_shape,
    l1_per_sample,
    lr_lambda,
    next_batch,
    perturb,
    plan_budget,
    recovered_logits,
    to_images,
    victim_probs,
)

log = logging.getLogger(__name__)


@register_attack
class DFME(DataFreeStrategy):
    """Data-free model extraction: a generator against the student, victim gradients by forward differences."""

    name: ClassVar[str] = "dfme"
    smoke_options: ClassVar[dict[str, Any]] = {"batch_size": 4, "nz": 16, "ngf": 8}
    cpu_small_options: ClassVar[dict[str, Any]] = {"batch_size": 64, "nz": 64, "ngf": 16}

    batch_size: int = Field(256, ge=1, description="generator and student batch (B)")
    nz: int = Field(256, ge=1, description="generator noise dimension")
    ngf: int = Field(64, ge=1, description="generator width (2·ngf and ngf feature maps)")
    grad_m: int = Field(1, ge=1, description="random directions per sample of the gradient estimate (m)")
    grad_epsilon: float = Field(1e-3, gt=0, description="forward-difference step on the pre-activation (ε)")
    g_iter: int = Field(1, ge=1, description="generator steps per iteration (n_G)")
    s_iter: int = Field(5, ge=1, description="student steps per iteration (n_S)")
    lr_student: float = Field(0.1, gt=0)
    lr_generator: float = Field(5e-4, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["multistep", "cosine", "none"] = "multistep"
    steps: tuple[float, ...] = (0.1, 0.3, 0.5)
    scale: float = Field(0.3, gt=0, description="multistep learning-rate factor")

    @property
    def per_sample(self) -> int:
        """Queries per batch row of one iteration: ``n_G (m + 1) + n_S``."""
        return self.g_iter * (self.grad_m + 1) + self.s_iter

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        self.check(oracle, pool, budget)
        device = get_device()
        plan = plan_budget(budget, self.batch_size, self.per_sample)
        with bench.timer.phase("setup"):
            torch.manual_seed(bench.seed)
            student = bench.make_model().to(device)
            generator = Generator(bench.input_shape, self.nz, self.ngf).to(device)
            noise = torch.Generator().manual_seed(bench.seed)
            opt_s = torch.optim.SGD(student.parameters(), lr=self.lr_student, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
            opt_g = torch.optim.Adam(generator.parameters(), lr=self.lr_generator)
            factor = lr_lambda(self.scheduler, plan.iterations, self.steps, self.scale)
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_s, opt_g)]
        log.info("dfme: budget %d = %d iterations of %d queries (+%d, tail %s)", budget, plan.full,
                 self.batch_size * self.per_sample, plan.partial * self.per_sample, plan.tail)
        bench.model = student  # the piracy model as it trains (a harness may evaluate it at each report)
        book = QueryBook(oracle, budget, bench, keep=False)
        report = Reporter(bench, plan.iterations, bench.train_cfg.epochs)
        counts = {"queries": 0, "generator_queries": 0, "student_queries": 0}
        student.train()
        generator.train()

        def sample(n: int) -> torch.Tensor:
            return torch.randn(n, self.nz, generator=noise).to(device)

        def generator_step(b: int) -> None:
            with bench.timer.phase("selection"):
                x_pre = generator(sample(b))
                points, u = perturb(x_pre, self.grad_m, self.grad_epsilon, noise)
                images = to_images(points)
            answer = book.ask(images)
            assert answer is not None and len(answer) == len(images), "the plan overran the budget"
            with bench.timer.phase("selection"), frozen(student):
                with torch.no_grad():
                    values = -l1_per_sample(student(images), recovered_logits(victim_probs(answer, device)))
                opt_g.zero_grad(set_to_none=True)
                x_pre.backward(forward_difference(values, u, self.grad_epsilon))
                opt_g.step()
            report.add("generator_loss", float(values.view(b, -1)[:, 0].mean()))
            counts["generator_queries"] += len(images)

        def student_step(b: int) -> None:
            with bench.timer.phase("selection"), torch.no_grad():
                images = to_images(generator(sample(b)))
            answer = book.ask(images)
            assert answer is not None and len(answer) == b, "the plan overran the budget"
            with bench.timer.phase("train"):
                probs = victim_probs(answer, device)
                target = recovered_logits(probs)
                loss, logits = fit_step([student], opt_s, images, lambda s: l1_per_sample(s, target).mean())
                report.add("train_loss", loss)
                report.add("train_agreement", float((logits.argmax(1) == probs.argmax(1)).sum()), b)
            counts["student_queries"] += b

        while book.left > 0:
            b = next_batch(book.left, self.batch_size, self.per_sample)
            if b == 0:  # the tail: fewer queries left than one row of an iteration costs
                student_step(min(self.batch_size, book.left))
            else:
                for _ in range(self.g_iter):
                    generator_step(b)
                for _ in range(self.s_iter):
                    student_step(b)
                for s in scheds:
                    s.step()
            counts["queries"] = book.used
            if b > 0:
                report.end_iteration(counts, last=book.left == 0)
        report.flush(counts)
        student.eval()
        bench.model, bench.history = student, report.rows
        return Extraction(student, book.queried, bench.history)

    def cost(self, job: CostJob) -> list[Work]:
        """Per planned iteration (:func:`~distributed_me.attacks.datafree.plan_budget`): ``n_G`` generator steps
        (generator forward + backward, the student on the ``B (m+1)`` estimate points) and ``n_S`` student steps
        (generator forward, one training step); then the tail's student steps. Queries: exactly the budget, in
        API requests of at most ``query_batch`` per ask."""
        plan = plan_budget(job.budget, self.batch_size, self.per_sample)
        gen_rows = sum(plan.batches) * self.g_iter
        student_rows = sum(plan.batches) * self.s_iter + sum(plan.tail)
        asks = [b * (self.grad_m + 1) for b in plan.batches for _ in range(self.g_iter)]
        asks += [b for b in plan.batches for _ in range(self.s_iter)] + plan.tail
        return datafree_cost(job, asks, gen_flops=generator_flops(job_shape(job), self.nz, self.ngf),
                             gen_train_rows=gen_rows, gen_sample_rows=student_rows,
                             estimate_rows=gen_rows * (self.grad_m + 1), estimate_batch=self.batch_size *
                             (self.grad_m + 1), student_rows=student_rows, student_batch=self.batch_size)

