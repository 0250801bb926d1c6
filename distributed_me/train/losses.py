"""Losses of the piracy model.

With confidence scores, MEBench trains on the victim's full output distribution (paper 004 eq. 2):
``min_θ −Σ_x f_v(x)ᵀ log f_p(x; θ)``. With labels only, this reduces to cross-entropy on the one-hot label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of −Σ_c t_c log softmax(logits)_c (paper 004 eq. 2)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def hard_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on labels: eq. 2 with one-hot targets."""
    return F.cross_entropy(logits, labels)
