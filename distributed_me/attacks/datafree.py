"""Shared pieces of the data-free attacks (DFME, MAZE, DisGUIDE): the generator, the zeroth-order gradient estimator,
the student losses, experience replay, learning-rate schedules and the budget plan. Registers no strategy.

Generator. The three papers use the same conv generator (DFME's ``GeneratorA``, cake-lab/datafree-model-extraction
``dfme/network/gan.py``, also DisGUIDE's; MAZE's ``conv3_gen``, sanjaykariyappa/MAZE ``src/models/conv3_gen.py``, is
the same net with ``ngf = 64`` and an affine last BatchNorm): ``z`` → linear to ``2·ngf`` maps of a quarter of the
image side → BN → [×2 nearest upsample → conv 3×3 → BN → LeakyReLU(0.2)] → [×2 → conv (to ``ngf``) → BN → LReLU] →
conv 3×3 to ``C`` → BN. The last BN's output is the *pre-activation* ``x_pre``: the papers apply ``tanh`` and send
images in the victim's normalized space (about [-1, 1]). Our API takes float images in [0, 1], so the query image is
``(tanh(x_pre) + 1) / 2`` (:func:`to_images`), an affine map of theirs: every perturbed point stays a valid image.
Any side works: the start size is ``max(2, ceil(H/4))`` (``W`` alike) and, when ``4·start`` is not the side, the maps
are resized (bilinear) to ``(H, W)`` before the last conv.

Zeroth-order gradient (DFME §3.3 eq. 5, MAZE §3.2 eq. 6): for a per-sample objective ``f_i`` that needs the victim,
at ``x_i`` (the generator's pre-activation of sample ``i``, ``d = C·H·W`` values) and ``m`` directions ``u_ij`` drawn
uniformly on the unit sphere (normalized Gaussians), forward differences with step ``ε``::

    ĝ_i = d / (m ε) · Σ_j (f_i(x_i + ε u_ij) − f_i(x_i)) · u_ij          (E[d · u uᵀ] = I, so ĝ_i → ∇f_i as m grows)

and the estimate of ``∇ (1/N) Σ_i f_i`` is ``ĝ_i / N`` (what :func:`forward_difference` returns; the generator then
back-propagates it from ``x_pre``). Each sample costs ``m + 1`` queries (the ``m`` perturbed points and ``x_i``
itself). This is MAZE's ``zoge_backward`` scaling exactly; DFME's ``estimate_gradient_objective`` further divides by
the number of classes, a constant factor that its Adam generator optimizer cancels (we leave it out).

Victim targets: DFME and DisGUIDE train on "logits" recovered from probabilities: ``log p − mean_k log p`` (DFME's
``logit_correction='mean'``); ``p`` is floored at :data:`PROB_FLOOR` before the log (a float32 softmax underflows to
exactly 0, and rounding defenses return zeros). MAZE uses the probabilities themselves (KL divergence).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..answer import Answer
from ..cost import work
from ..cost.work import CostJob, Work
from ..models.generator import Generator, to_images  # noqa: F401 - the strategies import them from here
from .base import QueryStrategy, Workbench

#: smallest probability fed to log() for the recovered logits (log(1e-12) ≈ −27.6)
PROB_FLOOR = 1e-12


class DataFreeStrategy(QueryStrategy):
    """What DFME, MAZE and DisGUIDE declare alike: they need the victim's probabilities (their gradient estimates and
    losses use them), draw no query from the pool (a generator makes every one, so the budget is not bounded by the
    pool), and train their student while they query (no separate final training a learning test could repeat)."""

    accepts: ClassVar[tuple[str, ...]] = ("probabilities",)
    draws_from_pool: ClassVar[bool] = False
    learning_test_budget: ClassVar[int | None] = None
    trains_on_answers: ClassVar[bool] = False


def to_grayscale(images: torch.Tensor, every: int, gen: torch.Generator) -> torch.Tensor:
    """DisGUIDE's ``img_to_grayscale``: every ``every``-th image of a 3-channel batch gets one randomly chosen
    channel copied into the other two (a no-op for other channel counts or ``every == 0``). Differentiable."""
    if every <= 0 or images.shape[1] != 3 or len(images) == 0:
        return images
    ch = int(torch.randint(3, (1,), generator=gen))
    out = images.clone()
    out[::every] = images[::every, ch : ch + 1].expand(-1, 3, -1, -1)
    return out


def generator_flops(shape: tuple[int, int, int], nz: int, ngf: int) -> float:
    """FLOPs of one generator forward pass of one image, counted on the meta device (no arithmetic done)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        g = Generator(shape, nz, ngf)
        with FlopCounterMode(display=False) as counter:
            g(torch.zeros(2, nz))
    return float(counter.get_total_flops()) / 2


# ---------------------------------------------------------------------------------------- zeroth-order gradient
def sphere_directions(n: int, m: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """``(n, m, *shape)`` directions, each uniform on the unit sphere of ``prod(shape)`` dimensions."""
    u = torch.randn(n, m, int(np.prod(shape)), generator=gen)
    return (u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)).view(n, m, *shape)


def perturb(x: torch.Tensor, m: int, epsilon: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The points where the objective is evaluated: per sample, ``x_i`` then ``x_i + ε u_ij`` for ``j < m``, as one
    ``(n·(m+1), ...)`` batch in that order, and the directions ``u`` ``(n, m, ...)`` (on ``x``'s device)."""
    x = x.detach()
    u = sphere_directions(len(x), m, tuple(x.shape[1:]), gen).to(x.device, x.dtype)
    points = torch.cat([x.unsqueeze(1), x.unsqueeze(1) + epsilon * u], dim=1)
    return points.flatten(0, 1), u


def forward_difference(values: torch.Tensor, u: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The estimate of the gradient of the batch mean ``(1/n) Σ_i f_i`` at the base points, from ``values``
    ``(n·(m+1),)`` = ``f`` at :func:`perturb`'s points (same order) and its directions ``u`` (see module docstring)."""
    n, m = u.shape[:2]
    d = int(np.prod(u.shape[2:]))
    v = values.detach().reshape(n, m + 1).to(u.dtype)
    diff = (v[:, 1:] - v[:, :1]).view(n, m, *([1] * (u.dim() - 2)))
    return (d / (m * epsilon)) * (diff * u).sum(dim=1) / n


def estimate_gradient(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, epsilon: float, m: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`perturb` → ``objective`` (per-point values, no gradient needed) → :func:`forward_difference`. Returns
    the estimate for ``∇ mean_i f_i(x_i)`` and ``f`` at the base points. The strategies call the two halves apart,
    to time the victim's queries apart from the estimate."""
    points, u = perturb(x, m, epsilon, gen)
    with torch.no_grad():
        values = objective(points)
    return forward_difference(values, u, epsilon), values.reshape(len(x), m + 1)[:, 0]


# ------------------------------------------------------------------------------------------------------- losses
def victim_probs(answer: Answer, device: torch.device) -> torch.Tensor:
    """The API's probabilities, clipped at 0 and renormalized (:meth:`Answer.soft_targets`), on ``device``."""
    soft = answer.soft_targets()
    if soft is None:
        raise ValueError("data-free attacks need probability answers")
    return torch.from_numpy(soft).float().to(device)


def recovered_logits(probs: torch.Tensor) -> torch.Tensor:
    """DFME's logit estimate from probabilities: ``log p − mean_k log p`` (``p`` floored at :data:`PROB_FLOOR`)."""
    logp = probs.clamp_min(PROB_FLOOR).log()
    return logp - logp.mean(dim=1, keepdim=True)


def l1_per_sample(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over classes, per sample (DFME's ``F.l1_loss(reduction='none').mean(1)``)."""
    return (student_logits - target_logits).abs().mean(dim=1)


def kl_per_sample(student_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``KL(victim ‖ student) = Σ_k p_k (log p_k − log s_k)`` per sample (0·log 0 = 0), MAZE's forward KL."""
    logs = F.log_softmax(student_logits, dim=1)
    plogp = torch.where(probs > 0, probs * probs.clamp_min(PROB_FLOOR).log(), torch.zeros_like(probs))
    return (plogp - probs * logs).sum(dim=1)


class SoftVote(nn.Module):
    """An ensemble's soft vote: log of the mean of its members' softmax outputs (DisGUIDE's reported model)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([F.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return p.clamp_min(PROB_FLOOR).log()


def fit_step(models: list[nn.Module], opt: torch.optim.Optimizer, x: torch.Tensor,
             loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """One optimizer step of ``models`` on the batch ``x``: the sum of ``loss_fn(logits)`` over models. A batch of
    one sample runs with BatchNorm in eval mode (batch statistics of one sample are undefined for BatchNorm1d and
    meaningless otherwise). Returns the mean loss and the first model's logits (detached)."""
    opt.zero_grad(set_to_none=True)
    total, first = 0.0, None
    for model in models:
        model.train(len(x) > 1)
        logits = model(x)
        loss = loss_fn(logits)
        loss.backward()
        total += float(loss.detach())
        first = logits.detach() if first is None else first
        model.train()
    opt.step()
    return total / len(models), first  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------- replay
class ReplayBuffer:
    """Experience replay of paid (image, victim probabilities) pairs on the CPU: a FIFO ring of ``capacity``
    (DisGUIDE's ``ClassicalMemory``), unbounded when ``capacity`` is None (MAZE keeps every stored batch)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.size = self.head = 0

    def __len__(self) -> int:
        return self.size

    def add(self, images: torch.Tensor, probs: torch.Tensor) -> None:
        images, probs = images.detach().cpu(), probs.detach().cpu()
        if self.capacity is None:
            self._x.append(images)
            self._y.append(probs)
            self.x = self.y = None  # concatenated lazily at the next sample
            self.size += len(images)
            return
        if self.x is None:
            self.x = torch.zeros(self.capacity, *images.shape[1:])
            self.y = torch.zeros(self.capacity, probs.shape[1])
        for img, p in zip(images.split(self.capacity), probs.split(self.capacity)):
            idx = (self.head + torch.arange(len(img))) % self.capacity
            self.x[idx], self.y[idx] = img, p  # type: ignore[index]
            self.head = int(idx[-1] + 1) % self.capacity
            self.size = min(self.capacity, self.size + len(img))

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored pair (unordered for a full ring)."""
        if self.capacity is None:
            if self.x is None and self._x:
                self.x, self.y = torch.cat(self._x), torch.cat(self._y)
                self._x, self._y = [self.x], [self.y]
        if self.x is None:
            return torch.empty(0), torch.empty(0)
        return self.x[: self.size], self.y[: self.size]  # type: ignore[index]

    def sample(self, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(k, len)`` pairs uniformly without replacement."""
        x, y = self.contents()
        idx = torch.randperm(self.size, generator=gen)[: min(k, self.size)]
        return x[idx], y[idx]


# ------------------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class BudgetPlan:
    """How a budget is spent in iterations that cost ``per_sample`` queries per batch row: ``full`` iterations at
    ``batch``, then one iteration at ``partial`` rows (``budget // per_sample`` of what is left, possibly 0), then
    student-only ``tail`` batches (each at most ``batch``) of the last queries, fewer than ``per_sample``·… left:
    every query is paid and every answer used."""

    full: int
    batch: int
    partial: int
    tail: list[int] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return self.full + (1 if self.partial else 0)

    @property
    def batches(self) -> list[int]:
        """The batch size of each iteration, in order."""
        return [self.batch] * self.full + ([self.partial] if self.partial else [])


def plan_budget(budget: int, batch: int, per_sample: int) -> BudgetPlan:
    full, left = divmod(budget, batch * per_sample)
    partial, left = divmod(left, per_sample)
    tail = [batch] * (left // batch) + ([left % batch] if left % batch else [])
    return BudgetPlan(full, batch, partial, tail)


def next_batch(left: int, batch: int, per_sample: int) -> int:
    """The batch of the next iteration with ``left`` queries left: ``batch``, or what still fits (0: tail only)."""
    return min(batch, left // per_sample)


def lr_lambda(kind: str, total: int, steps: tuple[float, ...] = (), scale: float = 1.0) -> Callable[[int], float]:
    """Learning-rate factor per iteration for ``LambdaLR``: ``multistep`` (× ``scale`` at each fraction of
    ``steps`` of the ``total`` iterations, DFME/DisGUIDE's ``MultiStepLR``), ``cosine`` (MAZE's
    ``CosineAnnealingLR(T_max=total)``) or ``none``."""
    total = max(1, total)
    if kind == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
    if kind == "multistep":
        marks = sorted(int(s * total) for s in steps)
        return lambda it: scale ** sum(1 for mk in marks if it >= mk)
    return lambda it: 1.0


# ------------------------------------------------------------------------------------------------------ reports
@dataclass
class Reporter:
    """Per-chunk history rows of a streamed student: the run's iterations are reported ``chunks`` times (the
    Workbench's ``epochs``, so a sweep's per-epoch rows and their count mean the same for every strategy), each row
    with the student's mean loss and agreement with the victim's top-1 on fresh batches, the generator's loss and
    the queries paid so far. ``on_epoch`` is called inside the ``train`` phase, as :func:`~distributed_me.train.fit`
    does (the harness subtracts its evaluations from that phase)."""

    bench: Workbench
    total_iterations: int
    chunks: int
    rows: list[dict] = field(default_factory=list)
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _iteration: int = 0

    def add(self, key: str, value: float, count: int = 1) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + count

    def mean(self, key: str) -> float:
        return self._sums.get(key, 0.0) / max(1, self._counts.get(key, 0))

    def end_iteration(self, counters: dict[str, float], last: bool = False) -> None:
        self._iteration += 1
        every = max(1, math.ceil(self.total_iterations / max(1, self.chunks)))
        if last or self._iteration % every == 0:
            self.flush(counters)

    def flush(self, counters: dict[str, float]) -> None:
        if not self._counts:
            return
        row = {"epoch": len(self.rows) + 1, **{k: self.mean(k) for k in self._counts},
               **{k: float(v) for k, v in counters.items()}}
        self._sums, self._counts = {}, {}
        if self.bench.on_epoch is not None:
            with self.bench.timer.phase("train"):
                extra = self.bench.on_epoch(row["epoch"], row)
            if isinstance(extra, dict):
                row.update(extra)
        self.rows.append(row)


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """``models`` in eval mode with no parameter gradients, restored after (the students during a generator step)."""
    saved = [(m.training, [p.requires_grad for p in m.parameters()]) for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, (training, flags) in zip(models, saved):
            m.train(training)
            for p, f in zip(m.parameters(), flags):
                p.requires_grad_(f)


# ------------------------------------------------------------------------------------------------------- cost
def job_shape(job: CostJob) -> tuple[int, int, int]:
    return (job.piracy.in_chans, job.piracy.img_size, job.piracy.img_size)


def datafree_cost(job: CostJob, asks: list[int], *, gen_flops: float, gen_train_rows: int, gen_sample_rows: int,
                  estimate_rows: int, estimate_batch: int, student_rows: int, student_batch: int,
                  replay_rows: int = 0, students: int = 1) -> list[Work]:
    """The work of a data-free attack from its counts: queries in ``asks`` (one per ``book.ask``, each split into
    requests of ``query_batch``); the generator (forward+backward ≈ 3× forward FLOPs on ``gen_train_rows``, forward
    only on ``gen_sample_rows``) and the student's forward passes on the estimate points, in ``selection``; the
    student's training steps on fresh answers and replayed pairs (``students`` models each), in ``train``."""
    requests = sum(-(-a // max(1, job.query_batch)) for a in asks if a > 0)
    items = [work.query(job.victim, job.budget, -(-job.budget // max(1, requests)) if requests else job.query_batch)]
    items.append(work.flops(gen_flops * (3.0 * gen_train_rows + gen_sample_rows), what="generator forward/backward"))
    if estimate_rows:
        items.append(work.infer(job.piracy, estimate_rows, batch_size=estimate_batch,
                                what="student on the gradient-estimate points"))
    if student_rows:
        items.append(work.train(job.piracy, student_rows, students, student_batch, what="piracy model"))
    if replay_rows:
        items.append(work.train(job.piracy, student_batch, students * int(np.ceil(replay_rows / student_batch)),
                                student_batch, what="piracy model on replayed pairs"))
    return items
