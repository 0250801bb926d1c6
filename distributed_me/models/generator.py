"""The conv generator of the data-free attacks (DFME, MAZE, DisGUIDE; see :mod:`distributed_me.attacks.datafree` for
its provenance) and of AdvFT (paper 002, whose generator is unspecified; the DFME one it defends against is used). A
model, so it lives beside the classifiers: attacks and defenses both build it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """DFME's GeneratorA (:mod:`distributed_me.attacks.datafree` describes it) for any (C, H, W); :meth:`forward`
    returns the pre-activation."""

    def __init__(self, shape: tuple[int, int, int], nz: int = 256, ngf: int = 64, final_affine: bool = False):
        super().__init__()
        c, h, w = shape
        self.shape, self.nz = (int(c), int(h), int(w)), int(nz)
        self.start = (max(2, math.ceil(h / 4)), max(2, math.ceil(w / 4)))
        self.l1 = nn.Linear(nz, 2 * ngf * self.start[0] * self.start[1])
        self.bn0 = nn.BatchNorm2d(2 * ngf)
        self.block1 = nn.Sequential(nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1), nn.BatchNorm2d(2 * ngf),
                                    nn.LeakyReLU(0.2, inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(2 * ngf, ngf, 3, padding=1), nn.BatchNorm2d(ngf),
                                    nn.LeakyReLU(0.2, inplace=True))
        self.out = nn.Sequential(nn.Conv2d(ngf, c, 3, padding=1), nn.BatchNorm2d(c, affine=final_affine))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z.flatten(1)).view(len(z), -1, *self.start)
        x = self.block1(F.interpolate(self.bn0(x), scale_factor=2))
        x = self.block2(F.interpolate(x, scale_factor=2))
        if tuple(x.shape[2:]) != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return self.out(x)


def to_images(x_pre: torch.Tensor) -> torch.Tensor:
    """The query images of pre-activations: ``(tanh + 1) / 2``, in [0, 1] (the papers' tanh output, moved)."""
    return ((torch.tanh(x_pre) + 1.0) / 2.0).clamp(0.0, 1.0)
