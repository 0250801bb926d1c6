"""Metrics of an extraction (MEBench, paper 004 §3.1).

- accuracy (eq. 3): piracy model vs ground truth on the victim's test split;
- fidelity (eq. 4): piracy model vs victim top-1 on the same inputs;
- adversarial fidelity (eq. 5): agreement of victim and piracy model on adversarial examples crafted by PGD *against
  the piracy model* — ε = 4/255, α = 2/255, 7 steps, random start (the PGD setting of §3.3.3) — i.e. how well the
  stolen model predicts the victim where the stolen model is weakest.

The evaluator plays the benchmark, not the attacker: it may query the victim without budget (``victim_labels`` is a
plain function, typically the victim's unmetered top-1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import get_device

LabelFn = Callable[[torch.Tensor], torch.Tensor]


#: PGD steps of adversarial fidelity (eq. 5), also what the cost model prices
PGD_STEPS = 7

#: training images the defender's KL_train is measured on (a fixed prefix of the split: model-carrying defenses run
#: a model per image, and the mean settles well before 2,000)
KL_TRAIN_IMAGES = 2000

def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(a)


def accuracy(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    pred, labels = _as_tensor(pred), _as_tensor(labels)
    if len(pred) != len(labels) or len(pred) == 0:
        raise ValueError(f"need equal, non-zero lengths, got {len(pred)} and {len(labels)}")
    return (pred.cpu() == labels.cpu()).float().mean().item()


def fidelity(pred_piracy: np.ndarray | torch.Tensor, pred_victim: np.ndarray | torch.Tensor) -> float:
    """Fraction of inputs on which victim and piracy model name the same class (eq. 4)."""
    return accuracy(pred_piracy, pred_victim)


def kl_divergence(p_victim: torch.Tensor, p_piracy: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean KL(victim ‖ piracy) over a batch of probability vectors."""
    p, q = p_victim.clamp_min(eps), p_piracy.clamp_min(eps)
    return (p * (p.log() - q.log())).sum(dim=1).mean().item()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 4 / 255,
    alpha: float = 2 / 255,
    steps: int = PGD_STEPS,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted L∞ PGD (Madry et al. 2018) on float images in [0, 1]; returns adversarial images on x's device."""
    model.eval()
    x = x.detach()
    adv = x.clone()
    if random_start:
        noise = torch.empty(x.shape).uniform_(-eps, eps, generator=generator).to(x.device)
        adv = (adv + noise).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def adversarial_fidelity(
    piracy: nn.Module,
    victim_labels: LabelFn,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 4 / 255,
    alpha: float = 2 / 255,
    steps: int = PGD_STEPS,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Eq. 5: PGD examples against the piracy model (from the test images and their true labels), then agreement."""
    device = get_device()
    piracy.to(device).eval()
    gen = torch.Generator().manual_seed(seed)
    agree, total = 0, 0
    for i in range(0, len(images), batch_size):
        xb = images[i : i + batch_size].to(device)
        yb = _as_tensor(labels[i : i + batch_size]).long().to(device)
        adv = pgd(piracy, xb, yb, eps, alpha, steps, True, gen)
        with torch.no_grad():
            p = piracy(adv).argmax(1).cpu()
        v = victim_labels(adv.cpu()).cpu()
        agree += (p == v).sum().item()
        total += len(xb)
    if total == 0:
        raise ValueError("adversarial fidelity needs at least one image")
    return agree / total
