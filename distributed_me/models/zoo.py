"""The model registry and ``create_model``: one name → one image classifier, whatever library builds it.

Victims, piracy (substitute) models and reference models are all made here, so a sweep YAML can name any of them and a
test can build every one. A factory registered with ``@register_model("name", ...)`` (or plain ``@MODELS.register``)
has the signature ``factory(num_classes, in_chans, img_size, pretrained: bool, **kw) -> nn.Module`` and returns a net
mapping *normalized* float NCHW to logits ``(N, num_classes)``; :class:`NormalizedModel` puts the normalization inside
so that everything outside a model (pools, the Oracle, attacks) speaks plain [0, 1] pixels, as an MLaaS client does.

Entries and their sources:

* ``resnet18/34/50``, ``wide_resnet50_2``, ``vgg16_bn``, ``densenet121``, ``efficientnet_b0`` — timm. For small images
  (``img_size <= 64``) the ResNets use the CIFAR stem of He et al. (2016, §4.2): a 3×3 stride-1 first conv and no
  max-pool, so a 32×32 input keeps 32×32 feature maps in the first stage instead of 8×8 (the ImageNet stem throws away
  most of a CIFAR image). ``cifar_stem=True/False`` forces either. With ``pretrained=True`` the ImageNet 7×7 conv1 is
  then replaced by a freshly initialised 3×3 conv; every other layer keeps its pretrained weights.
* ``vit_{tiny,small,base,large}_patch16`` — timm ViTs built for ``img_size``. Below 64 px the patch size defaults to
  4 (a 32×32 image → 8×8 = 64 tokens, the usual CIFAR ViT setting; 16-px patches would leave 4 tokens); from 64 px on
  it is 16 as the name says. ``patch_size=`` overrides. Pretrained weights are resampled to the patch size and grid by
  timm's checkpoint filter.
* ``googlenet``, ``alexnet`` — torchvision (timm has neither). Their ImageNet weights come from torchvision's weights
  enum (download.pytorch.org, cached under ``$TORCH_HOME/hub/checkpoints``). GoogLeNet is built without auxiliary
  heads so that it always returns plain logits.
* ``cnn32`` (ActiveThief / SwiftTheft) and ``tiny_cnn`` (tests) — see :mod:`distributed_me.models.cnn32`.

``pretrained``: ``False``; ``True`` = the library's ImageNet weights (timm hub / torchvision), which needs internet or a
pre-populated cache and fails fast offline (:mod:`~distributed_me.models.pretrained`); a string = a local checkpoint
(file or folder) or an ``hf-hub:org/name`` id, loaded keeping what fits (a different classifier head is skipped).

``create_model`` ends with a dry forward pass of one zero image: an architecture that cannot take the requested shape
(AlexNet at 32 px, VGG below 32 px, …) fails there with a :class:`~distributed_me.errors.DmeError` naming the arch, the
shape and the smallest ``img_size`` that works, instead of deep inside a training loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..data.base import IMAGENET_MEAN, IMAGENET_STD, Normalization
from ..errors import DmeError
from ..registry import Registry
from .pretrained import load_pretrained_source, load_state_dict_into, read_state_dict, resolve_hf_file, resolve_url_file

logger = logging.getLogger(__name__)

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

CIFAR_STEM_MAX_SIZE = 64  # ResNets at or below this img_size get the 3×3 stride-1 stem without max-pool
VIT_SMALL_IMAGE_PATCH = 4  # ViT patch size below 64 px
_SIZE_SEARCH_LIMIT = 1024
_VIT_NORMALIZATION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's augreg ViT weights
_IMAGENET_NORMALIZATION = Normalization(IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a caller may want to know before building: the family, sizes, and where pretrained weights come from.

    ``default_img_size``: the resolution the architecture (and its hub weights) was designed for. ``size_agnostic``: a
    built net runs at any input size ≥ ``min_img_size`` (CNNs with global pooling); otherwise it is built for exactly
    ``img_size`` (ViTs, CNN32's flatten classifier). ``hub_weights``: what ``pretrained=True`` loads (``timm:<arch>``
    = that timm arch's default tag on the HF hub). ``pretrained_normalization``: the input normalization the hub
    weights were trained with, to give :class:`NormalizedModel` when fine-tuning them.
    """

    name: str
    family: str
    source: str  # "timm" | "torchvision" | "dme" | "custom"
    default_img_size: int
    min_img_size: int
    size_agnostic: bool = True
    hub_weights: str | None = None
    pretrained_normalization: Normalization | None = None


_INFO: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    family: str,
    source: str,
    default_img_size: int,
    min_img_size: int,
    size_agnostic: bool = True,
    hub_weights: str | None = None,
    pretrained_normalization: Normalization | None = None,
) -> Callable[[ModelFactory], ModelFactory]:
    """``MODELS.register(name)`` plus the entry's :class:`ModelInfo`. A duplicate name raises ``ValueError``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        MODELS.register(name)(factory)
        _INFO[name] = ModelInfo(
            name, family, source, default_img_size, min_img_size, size_agnostic, hub_weights, pretrained_normalization
        )
        return factory

    return deco


def _info(name: str) -> ModelInfo:
    MODELS.get(name)  # UnknownNameError listing the valid names
    return _INFO.get(name) or ModelInfo(name, family="custom", source="custom", default_img_size=32, min_img_size=1)


def model_info(name: str) -> dict[str, Any]:
    """Metadata of a registered model as plain data (normalization as ``{"mean": [...], "std": [...]}``)."""
    info = _info(name)
    d = asdict(info)
    d["pretrained_normalization"] = info.pretrained_normalization.to_dict() if info.pretrained_normalization else None
    return d


# ----------------------------------------------------------------------------------------------------------------------
# normalization inside the model
# ----------------------------------------------------------------------------------------------------------------------


class NormalizedModel(nn.Module):
    """``net`` preceded by ``(x - mean) / std``: takes float NCHW in [0, 1], returns ``net``'s logits.

    Why inside the model: the Oracle, the pools and every attack then handle raw pixels only, exactly what an MLaaS
    client sends, and a victim bundle carries its own normalization (``mean``/``std`` are buffers, so they are part of
    ``state_dict`` and follow ``.to(device)``). A 1-channel normalization broadcasts over any channel count.
    """

    def __init__(self, net: nn.Module, normalization: Normalization):
        super().__init__()
        if len(normalization.mean) != len(normalization.std) or not normalization.mean:
            raise DmeError(f"normalization needs as many means as stds, got {normalization}")
        if any(s <= 0 for s in normalization.std):
            raise DmeError(f"normalization std must be > 0, got {normalization.std}")
        self.net = net
        self.normalization = normalization
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[1]
        if c != 1 and x.shape[1] != c:
            raise DmeError(f"model expects {c}-channel input (its normalization has {c} values), got shape "
                           f"{tuple(x.shape)}")
        return self.net((x - self.mean) / self.std)


# ----------------------------------------------------------------------------------------------------------------------
# create_model
# ----------------------------------------------------------------------------------------------------------------------


def _parse_pretrained(pretrained: bool | str | os.PathLike | None) -> tuple[bool, str | None]:
    """→ (use the library's hub weights, local path or hf-hub id). Strings "true"/"false" come from CLIs and YAML."""
    if pretrained is None or isinstance(pretrained, bool):
        return bool(pretrained), None
    s = os.fspath(pretrained).strip()
    if s.lower() in {"", "false", "0", "no", "none"}:
        return False, None
    if s.lower() in {"true", "1", "yes"}:
        return True, None
    return False, s


def _forward_ok(model: nn.Module, in_chans: int, size: int) -> bool:
    try:
        model(torch.zeros(1, in_chans, size, size))
        return True
    except (RuntimeError, ValueError, AssertionError, IndexError):
        return False


def _smallest_size(model: nn.Module, in_chans: int, failed: int) -> int | None:
    """Smallest square size the (size-agnostic) ``model`` runs at, above ``failed``: doubling, then bisection."""
    lo, hi = failed, max(2 * failed, 8)
    while not _forward_ok(model, in_chans, hi):
        lo, hi = hi, 2 * hi
        if hi > _SIZE_SEARCH_LIMIT:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _forward_ok(model, in_chans, mid) else (mid, hi)
    return hi


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _shape_error(name: str, in_chans: int, img_size: int, err: BaseException, smallest: int | None) -> DmeError:
    hint = (
        f"smallest img_size that works: {smallest}"
        if smallest
        else f"no img_size up to {_SIZE_SEARCH_LIMIT} works with in_chans={in_chans}"
    )
    return DmeError(
        f"model {name!r} cannot take input shape (N, {in_chans}, {img_size}, {img_size}): {_first_line(err)}; {hint}"
    )


def _dry_run(model: nn.Module, name: str, num_classes: int, in_chans: int, img_size: int) -> None:
    """One zero image through the net in eval mode (BatchNorm statistics untouched, no dropout, no autograd)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = model(torch.zeros(1, in_chans, img_size, img_size))
            except (RuntimeError, ValueError, AssertionError, IndexError) as e:
                info = _info(name)
                smallest = _smallest_size(model, in_chans, img_size) if info.size_agnostic else info.min_img_size
                raise _shape_error(name, in_chans, img_size, e, smallest) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DmeError(f"model {name!r} returned {got} for one image, expected logits of shape (1, {num_classes})")


def create_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int = 32,
    pretrained: bool | str | os.PathLike = False,
    *,
    check: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name`` for ``num_classes`` classes and ``in_chans``×``img_size``×``img_size`` input.

    ``kwargs`` go to the factory; ``None`` values are dropped first (as timm does) so that unset CLI flags and YAML
    nulls never override a factory default. ``check=False`` skips the dry forward pass (only for callers that have
    already validated the shape and build many models). Returns the bare net (expects normalized input); wrap it in
    :class:`NormalizedModel` to feed [0, 1] pixels.
    """
    factory = MODELS.get(name)
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DmeError(f"create_model({name!r}): {arg} must be a positive integer, got {value!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    use_hub, source = _parse_pretrained(pretrained)
    try:
        model = factory(num_classes=num_classes, in_chans=in_chans, img_size=img_size, pretrained=use_hub, **kwargs)
    except DmeError:
        raise
    except TypeError as e:
        raise DmeError(f"model {name!r} does not accept these options {sorted(kwargs)}: {_first_line(e)}") from e
    except (RuntimeError, ValueError, AssertionError) as e:
        raise _shape_error(name, in_chans, img_size, e, _info(name).min_img_size) from e
    if check:
        _dry_run(model, name, num_classes, in_chans, img_size)
    if source is not None:
        load_pretrained_source(model, source, what=f"pretrained={source!r} for {name!r}")
    logger.debug("built %s: %d classes, %d×%d×%d input, %.2fM parameters", name, num_classes, in_chans, img_size,
                 img_size, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# timm entries
# ----------------------------------------------------------------------------------------------------------------------


def _timm_create(arch: str, name: str, num_classes: int, in_chans: int, pretrained: bool, **kw: Any) -> nn.Module:
    """``timm.create_model`` whose hub download goes through the offline-aware resolver first.

    The weights file is resolved (cache when offline, download when online) before timm sees it, and handed over as
    ``pretrained_cfg_overlay={"file": ...}``; timm then does the adaptation it knows (head, in_chans, ViT grid).
    """
    import timm

    if pretrained:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not cfg.hf_hub_id:  # not the case for any entry here; let timm try its URL
            logger.warning("no hub id for %s pretrained weights; timm will try %s", arch, getattr(cfg, "url", None))
        else:
            filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
            file = resolve_hf_file(cfg.hf_hub_id, filenames, what=f"pretrained=True for {name!r}")
            kw["pretrained_cfg_overlay"] = {**kw.get("pretrained_cfg_overlay", {}), "file": str(file)}
    return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw)


def _cifar_stem(model: nn.Module, in_chans: int, name: str, pretrained: bool) -> None:
    """Replace a timm ResNet's 7×7/2 conv + max-pool by a 3×3/1 conv (He et al. 2016, §4.2, CIFAR-10 setting)."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d):
        raise DmeError(f"{name}: cifar_stem needs the default single-conv stem; pass cifar_stem=False")
    conv = nn.Conv2d(in_chans, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv
    model.maxpool = nn.Identity()
    if pretrained:
        logger.info("%s: CIFAR stem for small images: conv1 re-initialised (3×3/1), other layers pretrained", name)


def _make_resnet(name: str, arch: str) -> ModelFactory:
    def factory(
        num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained: bool = False,
        cifar_stem: bool | None = None, **kw: Any,
    ) -> nn.Module:
        model = _timm_create(arch, name, num_classes, in_chans, pretrained, **kw)
        use_cifar_stem = img_size <= CIFAR_STEM_MAX_SIZE if cifar_stem is None else cifar_stem
        if use_cifar_stem:
            _cifar_stem(model, in_chans, name, pretrained)
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"timm {arch}; CIFAR stem (3×3/1 conv, no max-pool) when img_size <= {CIFAR_STEM_MAX_SIZE} "
                       "unless cifar_stem= says otherwise. Other options go to timm (drop_rate, drop_path_rate, …).")
    return factory


def _make_timm(name: str, arch: str) -> ModelFactory:
    def factory(
        num_classes: int, in_chans: int = 3, img_size: int = 32, pretrained: bool = False, **kw: Any
    ) -> nn.Module:
        return _timm_create(arch, name, num_classes, in_chans, pretrained, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"timm {arch} (any img_size above its minimum; options go to timm)."
    return factory


def _make_vit(name: str, arch: str) -> ModelFactory:
    def factory(
        num_classes: int, in_chans: int = 3, img_size: int = 224, pretrained: bool = False,
        patch_size: int | None = None, **kw: Any,
    ) -> nn.Module:
        patch = patch_size or (VIT_SMALL_IMAGE_PATCH if img_size < 64 else 16)
        if img_size < patch:
            raise DmeError(
                f"model {name!r} cannot take input shape (N, {in_chans}, {img_size}, {img_size}): smaller than one "
                f"{patch}×{patch} patch; smallest img_size that works: {patch} (or pass a smaller patch_size)"
            )
        return _timm_create(arch, name, num_classes, in_chans, pretrained, img_size=img_size, patch_size=patch, **kw)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"timm {arch} built for img_size; patch_size {VIT_SMALL_IMAGE_PATCH} below 64 px, else 16 "
                       "(patch_size= overrides).")
    return factory


_RESNETS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2")  # registry name = timm name
for _name in _RESNETS:
    register_model(
        _name, family="resnet", source="timm", default_img_size=224, min_img_size=1,
        hub_weights=f"timm:{_name}", pretrained_normalization=_IMAGENET_NORMALIZATION,
    )(_make_resnet(_name, _name))

# min_img_size: measured with create_model's size search (5 stride-2 stages; VGG/DenseNet pool without padding).
_TIMM_CNNS = (("vgg16_bn", "vgg", 32), ("densenet121", "densenet", 29), ("efficientnet_b0", "efficientnet", 1))
for _name, _family, _min in _TIMM_CNNS:
    register_model(
        _name, family=_family, source="timm", default_img_size=224, min_img_size=_min,
        hub_weights=f"timm:{_name}", pretrained_normalization=_IMAGENET_NORMALIZATION,
    )(_make_timm(_name, _name))

for _size in ("tiny", "small", "base", "large"):
    register_model(
        f"vit_{_size}_patch16", family="vit", source="timm", default_img_size=224, min_img_size=VIT_SMALL_IMAGE_PATCH,
        size_agnostic=False, hub_weights=f"timm:vit_{_size}_patch16_224", pretrained_normalization=_VIT_NORMALIZATION,
    )(_make_vit(f"vit_{_size}_patch16", f"vit_{_size}_patch16_224"))


# ----------------------------------------------------------------------------------------------------------------------
# torchvision entries
# ----------------------------------------------------------------------------------------------------------------------


def _load_torchvision_weights(model: nn.Module, weights: Any, name: str) -> None:
    """ImageNet weights from torchvision's enum, through the offline-aware cache/download, loaded keeping what fits."""
    file = resolve_url_file(weights.url, what=f"pretrained=True for {name!r}")
    load_state_dict_into(model, read_state_dict(file), source=f"torchvision {weights} ({file})")


@register_model(
    "googlenet", family="inception", source="torchvision", default_img_size=224, min_img_size=15,
    hub_weights="torchvision:GoogLeNet_Weights.IMAGENET1K_V1", pretrained_normalization=_IMAGENET_NORMALIZATION,
)
def googlenet(
    num_classes: int, in_chans: int = 3, img_size: int = 224, pretrained: bool = False, **kw: Any
) -> nn.Module:
    """torchvision GoogLeNet without auxiliary heads (so the output is always logits).

    With ImageNet weights and 3 channels, ``transform_input`` is on as torchvision does: the weights expect inputs
    normalized with 0.5/0.5, and the net converts from ImageNet normalization itself.
    """
    from torchvision.models import GoogLeNet_Weights
    from torchvision.models import googlenet as tv_googlenet

    if kw.pop("aux_logits", False):
        raise DmeError("googlenet: aux_logits=True would make the net return a tuple; it must return logits")
    kw.setdefault("transform_input", bool(pretrained) and in_chans == 3)
    kw.setdefault("init_weights", True)
    model = tv_googlenet(weights=None, num_classes=num_classes, aux_logits=False, **kw)
    if in_chans != 3:
        conv = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.01, a=-2, b=2)
        model.conv1.conv = conv
    if pretrained:
        _load_torchvision_weights(model, GoogLeNet_Weights.DEFAULT, "googlenet")
    return model


@register_model(
    "alexnet", family="alexnet", source="torchvision", default_img_size=224, min_img_size=63,
    hub_weights="torchvision:AlexNet_Weights.IMAGENET1K_V1", pretrained_normalization=_IMAGENET_NORMALIZATION,
)
def alexnet(num_classes: int, in_chans: int = 3, img_size: int = 224, pretrained: bool = False, **kw: Any) -> nn.Module:
    """torchvision AlexNet (needs img_size >= 63: an 11×11/4 conv and three 3×3/2 max-pools). Option: ``dropout``."""
    from torchvision.models import AlexNet_Weights
    from torchvision.models import alexnet as tv_alexnet

    model = tv_alexnet(weights=None, num_classes=num_classes, **kw)
    if in_chans != 3:
        model.features[0] = nn.Conv2d(in_chans, 64, kernel_size=11, stride=4, padding=2)
    if pretrained:
        _load_torchvision_weights(model, AlexNet_Weights.DEFAULT, "alexnet")
    return model
