"""Image classifiers by name: victims, piracy models and reference models.

``create_model(name, num_classes, in_chans, img_size, pretrained)`` builds any entry of ``MODELS`` (timm, torchvision or
our own CNN32 / tiny_cnn); ``NormalizedModel`` puts the input normalization inside the model so that everything outside
it speaks [0, 1] pixels. Pretrained weights come from the hub when online, from local checkpoints always, and fail fast
with a useful message offline. No Ray here.
"""

from . import cnn32 as _cnn32  # noqa: F401  (registers cnn32 and tiny_cnn)
from .cnn32 import CNN32, TinyCNN
from .pretrained import LoadReport, clear_offline_cache, is_offline, load_checkpoint, offline_reason
from .zoo import MODELS, ModelInfo, NormalizedModel, create_model, model_info, register_model

__all__ = [
    "CNN32",
    "MODELS",
    "LoadReport",
    "ModelInfo",
    "NormalizedModel",
    "TinyCNN",
    "clear_offline_cache",
    "create_model",
    "is_offline",
    "load_checkpoint",
    "model_info",
    "offline_reason",
    "register_model",
]
