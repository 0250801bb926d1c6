"""Optimizers of the piracy model, registered with their MEBench defaults.

MEBench (paper 004 §3.3.1, FER setting, following Lion's paper) uses: SGD with β = (0.9, 0.999) — momentum 0.9 — and
LR 3e-2; Adam and AdamW with β = (0.9, 0.999) and LR 3e-4; Lion with β = (0.9, 0.99) and LR 3e-4. The paper gives no
weight decay; we keep torch's defaults (0 for SGD/Adam, 0.01 for AdamW) and 0 for Lion, and expose ``weight_decay``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..registry import Registry


@dataclass(frozen=True)
class OptimInfo:
    """A registered optimizer and its paper defaults (the pattern of timm's ``OptimInfo``)."""

    name: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    build: Callable[..., torch.optim.Optimizer]
    reference: str = ""


OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer")


def _register(info: OptimInfo) -> None:
    OPTIMIZERS.register(info.name)(info)


_register(OptimInfo(
    "sgd", lr=3e-2, betas=(0.9, 0.999), weight_decay=0.0,
    build=lambda p, lr, betas, wd: torch.optim.SGD(p, lr=lr, momentum=betas[0], weight_decay=wd),
    reference="Robbins & Monro 1951; MEBench §3.3.1 (momentum = β1)",
))
_register(OptimInfo(
    "sgd-m0.5", lr=1e-2, betas=(0.5, 0.999), weight_decay=0.0,
    build=lambda p, lr, betas, wd: torch.optim.SGD(p, lr=lr, momentum=betas[0], weight_decay=wd),
    reference="SwiftTheft (paper 003 §IV.1): victims and substitutes use SGD, lr 0.01, momentum 0.5",
))
_register(OptimInfo(
    "adam", lr=3e-4, betas=(0.9, 0.999), weight_decay=0.0,
    build=lambda p, lr, betas, wd: torch.optim.Adam(p, lr=lr, betas=betas, weight_decay=wd),
    reference="Kingma & Ba 2015; MEBench §3.3.1",
))
_register(OptimInfo(
    "adamw", lr=3e-4, betas=(0.9, 0.999), weight_decay=0.01,
    build=lambda p, lr, betas, wd: torch.optim.AdamW(p, lr=lr, betas=betas, weight_decay=wd),
    reference="Loshchilov & Hutter 2019; MEBench §3.3.1",
))


def _lion(p: Iterable, lr: float, betas: tuple[float, float], wd: float) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(p, lr=lr, betas=betas, weight_decay=wd)


_register(OptimInfo(
    "lion", lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0, build=_lion,
    reference="Chen et al. 2023 (EvoLved Sign Momentum); MEBench §3.3.1",
))


def create_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float | None = None,
    betas: tuple[float, float] | None = None,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """Build a registered optimizer; ``None`` arguments take the paper defaults."""
    info = OPTIMIZERS.get(name)
    return info.build(
        params,
        info.lr if lr is None else lr,
        info.betas if betas is None else tuple(betas),
        info.weight_decay if weight_decay is None else weight_decay,
    )
