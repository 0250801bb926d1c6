"""MixMatch training of the piracy model (Berthelot et al., "MixMatch: A Holistic Approach to Semi-Supervised
Learning", NeurIPS 2019, Algorithm 1 and eqs. 2-5), as MEBench's semi-supervised ME attack uses it (paper 004 §3.3.3).

The labeled set is the queried images with the API's answers (soft labels when it gave scores, labels otherwise); the
unlabeled set is images the attacker has but never sent. Each step, a labeled batch ``X`` of ``b`` images is paired
with an unlabeled batch ``U`` of the same size (paper 004 Table 7: "each labeled batch is paired with an equal-sized
unlabeled batch"), and:

1. ``X̂`` = one stochastic augmentation of each labeled image; ``Û`` = ``K`` augmentations of each unlabeled image;
2. label guessing: ``q̄_b`` = the model's softmax averaged over the ``K`` views of ``u_b`` (no gradient), then
   ``q_b = Sharpen(q̄_b, T)``, ``Sharpen(p, T)_i = p_i^(1/T) / Σ_j p_j^(1/T)`` (eq. 7);
3. mixup: ``W = Shuffle(Concat(X̂, Û))``; every row ``i`` of ``Concat(X̂, Û)`` is mixed with ``W_i``:
   ``λ ~ Beta(α, α)``, ``λ' = max(λ, 1 - λ)``, ``x' = λ' x_1 + (1 - λ') x_2`` and the same for the targets (eqs. 8-11),
   so each mixed row stays closer to its own source and the first ``b`` rows remain "labeled";
4. loss ``L = H(p, model(x'))`` averaged over the ``b`` mixed labeled rows (cross-entropy against soft targets,
   eq. 4) ``+ λ_U(t) ·`` the mean over the ``K·b`` mixed unlabeled rows and the ``L`` classes of
   ``(q - softmax(model(u')))²`` (eq. 5: the squared L2 distance divided by ``L``), with ``λ_U(t)`` ramped up linearly
   from 0.

Choices where the paper leaves room, taken from the two reference implementations (google-research/mixmatch and the
popular YU1ut/MixMatch-pytorch): one ``λ`` per batch; label guessing in training mode (batch statistics), without
gradient; one forward pass over the whole mixed batch (so batch norm sees labeled and unlabeled rows together, which is
what the reference code's "interleave" emulates across its separate passes). An epoch is one pass over the labeled set
(as :func:`~distributed_me.train.fit`), so MixMatch takes the same number of optimizer steps as the basic attack and
sees ``epochs × n_labeled`` unlabeled images in all, drawn as a stream of fresh permutations of the unlabeled set.

The ramp: the paper ramps ``λ_U`` up over its first 16,000 of ~1M steps; piracy models here train for hundreds or
thousands of steps, so the ramp is a fraction ``rampup`` of the run's steps (default 1.0: over the whole run, as
YU1ut/MixMatch-pytorch does). ``λ_U(step) = λ_U · min(1, step / (rampup · total_steps))`` with ``step`` counted from 0.

Augmentation: the project's random crop-and-resize (:func:`~distributed_me.train.augment.random_crop_resize`, with
``cfg.hflip``) is MixMatch's stochastic augmentation; ``cfg.augment = False`` makes it the identity (label guessing
then averages ``K`` identical views). Optimizer, cosine schedule, seeding and device follow
:func:`~distributed_me.train.fit`. An EMA of the weights (the paper evaluates one, decay 0.999) is optional
(``ema_decay``); when set, the averaged weights replace the model's at the end of training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..device import get_device
from .augment import random_crop_resize
from .losses import soft_cross_entropy
from .trainer import EpochCallback, TrainConfig, optimizer_and_schedule

log = logging.getLogger(__name__)

#: a stochastic augmentation of a float NCHW batch, drawing from the given generator
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class MixMatchConfig:
    """MixMatch's own hyper-parameters; defaults are Berthelot et al.'s (§4, "we use T = 0.5, K = 2, α = 0.75,
    λ_U = 100"). ``rampup`` is the fraction of the run over which λ_U ramps up (see the module docstring)."""

    k: int = 2
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 100.0
    rampup: float = 1.0
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.k < 1 or self.temperature <= 0 or self.alpha <= 0 or self.lambda_u < 0 or self.rampup < 0:
            raise ValueError(f"invalid MixMatch configuration {self}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class UnlabeledSet:
    """The unlabeled images as a size and a loader: ``load(positions)`` returns float NCHW images in [0, 1] for
    positions in ``[0, size)``. A loader (rather than a tensor) lets a large pool be decoded one batch at a time."""

    size: int
    load: Callable[[np.ndarray], torch.Tensor]

    @classmethod
    def from_tensor(cls, images: torch.Tensor) -> "UnlabeledSet":
        return cls(len(images), lambda pos: images[torch.from_numpy(np.asarray(pos, dtype=np.int64))])


# ------------------------------------------------------------------ the pieces of Algorithm 1 (unit-tested) --------

def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 7: ``p_i^(1/T) / Σ_j p_j^(1/T)`` per row; T → 0 approaches the one-hot argmax (entropy minimisation)."""
    # computed in log space (divide log p by T, then softmax), so tiny probabilities and small T cannot underflow
    return torch.softmax(torch.log(p.clamp_min(1e-30)) / temperature, dim=1)


@torch.no_grad()
def guess_labels(model: nn.Module, views: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Label guessing: ``views`` holds the ``K`` augmentations of ``b`` unlabeled images, view-major (rows
    ``j·b .. (j+1)·b - 1`` are view ``j``); returns ``Sharpen(mean_j softmax(model(view_j)), T)``, shape (b, C)."""
    probs = torch.softmax(model(views), dim=1)
    return sharpen(probs.reshape(k, len(views) // k, -1).mean(0), temperature)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's mixup (eqs. 8-11): row ``i`` mixed with row ``perm[i]`` at weight ``λ' = max(λ, 1 - λ) ≥ 0.5`` on
    row ``i``, so every mixed row stays closer to its own source (and keeps its labeled/unlabeled role)."""
    lam = max(lam, 1.0 - lam)
    return lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm]


def rampup_weight(step: int, total_steps: int, lambda_u: float, rampup: float) -> float:
    """``λ_U · min(1, step / (rampup · total_steps))``: 0 at the first step, ``λ_U`` once ``rampup`` of the run is
    done (at once for ``rampup = 0``)."""
    length = rampup * total_steps
    if length <= 0:
        return float(lambda_u)
    return float(lambda_u) * float(np.clip(step / length, 0.0, 1.0))


def mixmatch_loss(logits: torch.Tensor, targets: torch.Tensor, n_labeled: int, weight: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L_X + weight · L_U, L_X, L_U)``: soft cross-entropy over the first ``n_labeled`` (mixed labeled) rows, and
    the mean squared error between softmax and target over the other rows and all classes (eq. 5's ``1/(L|U'|)``);
    ``L_U`` is 0 when there are no unlabeled rows."""
    lx = soft_cross_entropy(logits[:n_labeled], targets[:n_labeled])
    if len(logits) > n_labeled:
        lu = ((torch.softmax(logits[n_labeled:], dim=1) - targets[n_labeled:]) ** 2).mean()
    else:
        lu = logits.new_zeros(())
    return lx + weight * lu, lx, lu


def mixmatch_batch(model: nn.Module, x: torch.Tensor, p: torch.Tensor, u: torch.Tensor | None, k: int,
                   temperature: float, lam: float, augment: Augment, gen: torch.Generator, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on one batch: labeled ``x`` (b, ...) with target distributions ``p`` (b, C), unlabeled ``u``
    (b', ...) or ``None``. Returns the mixed inputs and targets, the ``b`` labeled rows first, on ``device``."""
    xs = augment(x, gen).to(device, non_blocking=True)
    targets = p.to(device, non_blocking=True)
    if u is not None and len(u):
        views = torch.cat([augment(u, gen) for _ in range(k)]).to(device, non_blocking=True)
        q = guess_labels(model, views, k, temperature)
        xs = torch.cat([xs, views])
        targets = torch.cat([targets, q.repeat(k, 1)])  # view-major, as ``views``
    perm = torch.randperm(len(xs), generator=gen).to(device)
    return mixup(xs, targets, lam, perm)


# ---------------------------------------------------------------------------------------------- the training loop --

class _UnlabeledStream:
    """Positions of the unlabeled set, one fresh permutation after another, ``take(n)`` at a time."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.order, self.at = rng.permutation(size), 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.at == self.size:
                self.order, self.at = self.rng.permutation(self.size), 0
            chunk = self.order[self.at : self.at + n]
            parts.append(chunk)
            self.at += len(chunk)
            n -= len(chunk)
        return np.concatenate(parts)


def default_augment(cfg: TrainConfig) -> Augment:
    """The project's augmentation as MixMatch's stochastic augmentation (identity when ``cfg.augment`` is off)."""
    if not cfg.augment:
        return lambda x, gen: x
    return lambda x, gen: random_crop_resize(x, gen, hflip=cfg.hflip)


def mixmatch_fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
    desc: str = "train",
    *,
    unlabeled: UnlabeledSet,
    options: MixMatchConfig | None = None,
    augment: Augment | None = None,
) -> list[dict]:
    """Train ``model`` in place with MixMatch; the signature of :func:`~distributed_me.train.fit` plus the unlabeled
    set and MixMatch's options (bind them with ``functools.partial`` to get a ``fit_fn`` for
    :meth:`~distributed_me.attacks.Workbench.train`).

    ``targets`` (N, C) are soft labels, (N,) class labels (made one-hot). History rows carry ``fit``'s keys
    (``epoch``, ``train_loss`` = the MixMatch loss per labeled row, ``train_agreement`` = argmax agreement on the
    mixed labeled rows with their mixed targets' argmax) plus ``loss_x``, ``loss_u`` and ``lambda_u`` (the weight at
    the epoch's last step); ``on_epoch(epoch, row)`` may return a dict merged into the row, as with ``fit``.
    """
    if len(images) == 0:
        raise ValueError("cannot train on zero samples")
    opts = options or MixMatchConfig()
    augment = augment or default_augment(cfg)
    device = get_device()
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.to(device)
    opt, sched = optimizer_and_schedule(model, cfg, len(images))
    steps_per_epoch = (len(images) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    stream = _UnlabeledStream(unlabeled.size, rng) if unlabeled.size else None
    if stream is None:
        log.warning("MixMatch has no unlabeled images: training on mixup of the labeled set alone")
    ema = [t.detach().clone() for t in model.state_dict().values()] if opts.ema_decay is not None else None
    if targets.ndim == 2:
        num_classes = targets.shape[1]
    else:  # labels only: the class count is the model's output width (eval mode: no batch-norm statistics touched)
        with torch.no_grad():
            num_classes = model.eval()(images[:1].to(device)).shape[1]
    history: list[dict] = []
    step = 0
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total = total_x = total_u = 0.0
        seen, correct, weight = 0, 0, 0.0
        for start in range(0, len(images), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            b = len(idx)
            u = None
            if stream is not None:
                u = unlabeled.load(np.sort(stream.take(b)))  # sorted: pools read faster in index order
            if b + (0 if u is None else opts.k * len(u)) < 2:
                continue  # batch norm cannot train on a single sample
            yb = targets[idx]
            if yb.ndim == 1:
                yb = F.one_hot(yb.long(), num_classes).float()
            lam = float(rng.beta(opts.alpha, opts.alpha))
            mixed_x, mixed_y = mixmatch_batch(model, images[idx], yb.float(), u, opts.k, opts.temperature, lam,
                                              augment, gen, device)
            weight = rampup_weight(step, total_steps, opts.lambda_u, opts.rampup)
            logits = model(mixed_x)
            loss, lx, lu = mixmatch_loss(logits, mixed_y, b, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if ema is not None:
                with torch.no_grad():
                    for avg, cur in zip(ema, model.state_dict().values()):
                        if avg.dtype.is_floating_point:
                            avg.mul_(opts.ema_decay).add_(cur.detach(), alpha=1 - opts.ema_decay)
                        else:
                            avg.copy_(cur)
            step += 1
            total += loss.item() * b
            total_x += lx.item() * b
            total_u += lu.item() * b
            seen += b
            correct += (logits[:b].argmax(1) == mixed_y[:b].argmax(1)).sum().item()
        n = max(seen, 1)
        row = {"epoch": epoch + 1, "train_loss": total / n, "train_agreement": correct / n, "loss_x": total_x / n,
               "loss_u": total_u / n, "lambda_u": weight}
        if on_epoch is not None:
            extra = on_epoch(epoch + 1, row)
            if isinstance(extra, dict):
                row.update(extra)
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    if ema is not None:
        model.load_state_dict(dict(zip(model.state_dict().keys(), ema)))
    model.eval()
    return history
