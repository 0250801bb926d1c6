"""Victims: training, the bundle format, MLflow registration and resolution, and the embedded default."""

from .bundle import Victim, VictimMeta, load_bundle, save_bundle
from .embedded import EMBEDDED_VICTIM, embedded_victim
from .resolve import is_embedded, load_victim, victim_bundle_path
from .store import cache_dir, register_victim
from .train import train_victim, victim_test_split

__all__ = [
    "EMBEDDED_VICTIM",
    "Victim",
    "VictimMeta",
    "cache_dir",
    "embedded_victim",
    "load_bundle",
    "register_victim",
    "is_embedded",
    "load_victim",
    "victim_bundle_path",
    "save_bundle",
    "train_victim",
    "victim_test_split",
]
