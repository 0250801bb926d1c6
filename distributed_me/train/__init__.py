"""The piracy trainer (MEBench's UpdateModel, paper 004 §2.3): losses, optimizers (SGD/Adam/AdamW/Lion),
augmentation."""

from .losses import hard_cross_entropy, soft_cross_entropy
from .optimizers import OPTIMIZERS, OptimInfo, create_optimizer
from .trainer import TrainConfig, fit, predict_labels, predict_logits, predict_probs, probs_from_logits

__all__ = [
    "OPTIMIZERS",
    "OptimInfo",
    "TrainConfig",
    "create_optimizer",
    "fit",
    "hard_cross_entropy",
    "predict_labels",
    "predict_logits",
    "predict_probs",
    "probs_from_logits",
    "soft_cross_entropy",
]
