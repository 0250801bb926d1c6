"""Training loop for piracy models (and victims): soft labels when the API gave scores, labels otherwise.

Deterministic on CPU for a given seed: data order and augmentation draw from one explicit generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import get_device
from .augment import random_crop_resize
from .losses import hard_cross_entropy, soft_cross_entropy
from .optimizers import create_optimizer

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. ``lr``/``weight_decay`` ``None`` = the optimizer's paper default."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    augment: bool = True
    hflip: bool = False
    seed: int = 0
    cosine: bool = True


def optimizer_and_schedule(model: nn.Module, cfg: TrainConfig, n_samples: int
                           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer of ``cfg`` and, with ``cfg.cosine``, a cosine schedule stepped once per batch over all epochs of
    ``n_samples`` (every learner of a piracy model takes the same number of steps for the same answers)."""
    opt = create_optimizer(cfg.optimizer, model.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * ((n_samples + cfg.batch_size - 1) // cfg.batch_size))
    return opt, (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cfg.cosine else None)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
    desc: str = "train",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``images`` (float NCHW in [0, 1]) and ``targets``.

    ``targets`` of shape (N, C) are soft labels (paper 004 eq. 2); of shape (N,) integer class labels (cross-entropy).
    ``on_epoch(epoch, metrics)`` is called after every epoch, e.g. to report to Tune or to evaluate fidelity.
    ``loss_fn(logits, targets)`` replaces the cross-entropy (e.g. AM's misinformation loss).
    Returns the per-epoch history.
    """
    if len(images) == 0:
        raise ValueError("cannot train on zero samples")
    device = get_device()
    soft = targets.ndim == 2
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    opt, sched = optimizer_and_schedule(model, cfg, len(images))
    loss_fn = loss_fn or (soft_cross_entropy if soft else hard_cross_entropy)
    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False, unit="epoch")
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(images), generator=gen)
        total, seen, correct = 0.0, 0, 0
        for start in range(0, len(images), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            if len(idx) < 2 and len(images) > 1:
                continue  # batch norm cannot train on a single sample
            xb, yb = images[idx], targets[idx]
            if cfg.augment:
                xb = random_crop_resize(xb, gen, hflip=cfg.hflip)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            hard = yb.argmax(1) if soft else yb
            correct += (logits.argmax(1) == hard).sum().item()
        row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "train_agreement": correct / max(seen, 1)}
        if on_epoch is not None:
            extra = on_epoch(epoch + 1, row)
            if isinstance(extra, dict):
                row.update(extra)
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on float NCHW images, in batches, on the chosen device; returned on the CPU."""
    device = get_device()
    model.eval().to(device)
    outs = [model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The one softmax every answer goes through (in process and behind Serve alike, so answers are bitwise equal)."""
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Softmax outputs of ``model`` on float NCHW images, in batches; returned on the CPU."""
    logits = predict_logits(model, images, batch_size)
    return probs_from_logits(logits) if len(logits) else logits


def predict_labels(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return predict_probs(model, images, batch_size).argmax(dim=1)
