"""Small from-scratch CNNs: CNN32 (the ActiveThief/SwiftTheft victim and substitute) and ``tiny_cnn`` (tests).

CNN32 follows Pal et al., "ActiveThief: Model extraction using active learning and unannotated public data" (AAAI 2020,
experimental setup, image classifier): ``l`` convolution blocks, block ``i`` being two [3×3 conv (padding 1) →
BatchNorm → ReLU] layers with ``32·2^i`` filters followed by 2×2 max-pooling, and a fully connected layer producing the
logits; with ``l = 3`` that is 32, 64 and 128 filters. SwiftTheft (Chinese Journal of Electronics 2024, §IV.1
"Experimental setup", /work/shared/papers/003_c24eae3ab042d1f7.txt) uses it "following ActiveThief and InverseNet" for
both the victims (GTSRB, CIFAR-10, VGG-Flower) and the substitute models, trained with SGD (lr 0.01, momentum 0.5).

As in the original, the classifier sees the *flattened* last feature map (128·(s/8)² features for an s×s input), so
the net is built for one input size; ``pool="avg"`` swaps in global average pooling for a size-agnostic variant.
``dropout`` (default 0: off) is applied before the classifier.

Both nets follow timm's ``forward_features`` / ``forward_head(pre_logits=True)`` split so that attacks needing
representations (ActiveThief k-center, SwiftTheft reference models) treat them like timm models.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..errors import DmeError
from .zoo import register_model

CNN32_WIDTHS = (32, 64, 128)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN32(nn.Module):
    """ActiveThief's conv net (see module docstring). Input: float NCHW, already normalized; output: logits."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        img_size: int = 32,
        widths: tuple[int, ...] = CNN32_WIDTHS,
        dropout: float = 0.0,
        pool: Literal["flatten", "avg"] = "flatten",
    ):
        super().__init__()
        min_size = 2 ** len(widths)
        if img_size < min_size:
            raise DmeError(
                f"model 'cnn32' cannot take input shape (N, {in_chans}, {img_size}, {img_size}): its {len(widths)} "
                f"2×2 max-pools need img_size >= {min_size}; smallest img_size that works: {min_size}"
            )
        if pool not in ("flatten", "avg"):
            raise DmeError(f"cnn32 pool must be 'flatten' or 'avg', got {pool!r}")
        layers: list[nn.Module] = []
        cin = in_chans
        for width in widths:
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width) + [nn.MaxPool2d(2)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.pool = pool
        side = img_size // min_size
        self.num_features = cin * side * side if pool == "flatten" else cin
        self.global_pool = nn.Flatten(1) if pool == "flatten" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TinyCNN(nn.Module):
    """Two convs (8, 16 channels) → global average pool → linear: ~1.5k parameters, for unit tests and the
    embedded default where speed matters more than accuracy. No BatchNorm, so batches of 1 train fine."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.num_classes = num_classes
        self.num_features = 2 * width
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _no_hub_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise DmeError(
            f"{name} has no published pretrained weights; train one (e.g. a victim) and pass "
            f"pretrained=/path/to/checkpoint.pth"
        )


@register_model("cnn32", family="cnn", source="dme", default_img_size=32, min_img_size=8, size_agnostic=False)
def cnn32(num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained: bool = False, **kw: Any) -> nn.Module:
    """ActiveThief/SwiftTheft CNN32. Options: ``dropout`` (0), ``pool`` ("flatten" | "avg"), ``widths`` (32,64,128)."""
    _no_hub_weights("cnn32", pretrained)
    return CNN32(num_classes, in_chans, img_size, **kw)


@register_model("tiny_cnn", family="cnn", source="dme", default_img_size=32, min_img_size=2, size_agnostic=True)
def tiny_cnn(num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained: bool = False, **kw: Any) -> nn.Module:
    """Test-sized CNN (any img_size ≥ 2). Option: ``width`` (8)."""
    _no_hub_weights("tiny_cnn", pretrained)
    return TinyCNN(num_classes, in_chans, **kw)
