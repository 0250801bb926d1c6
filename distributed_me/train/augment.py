"""Batched data augmentation on float NCHW tensors in [0, 1].

MEBench applies "random cropping and resizing" by default in vision because it raises fidelity in most cases (paper 004
§3.1, Table 2). We implement it as one random affine warp per image (translation up to ±``shift`` of the side, scale
in ``scale``), drawn from an explicit generator so training stays deterministic. Horizontal flips are opt-in: they are
wrong for tasks such as digits or traffic signs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_resize(
    x: torch.Tensor,
    generator: torch.Generator,
    shift: float = 0.125,
    scale: tuple[float, float] = (0.9, 1.1),
    hflip: bool = False,
) -> torch.Tensor:
    n = x.shape[0]
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    t = torch.empty(n, 2).uniform_(-2 * shift, 2 * shift, generator=generator)  # grid coordinates span [-1, 1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0 / s
    theta[:, 1, 1] = 1.0 / s
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        theta[flip, 0, 0] *= -1
    theta[:, :, 2] = t
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
