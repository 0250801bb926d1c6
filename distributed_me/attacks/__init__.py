"""Query strategies. Importing this package registers every built-in strategy in :data:`ATTACKS`."""

from . import random as _random  # noqa: F401  (registers "random")
from .base import ATTACKS, Extraction, QueryStrategy, Timer, Workbench, register_attack

__all__ = ["ATTACKS", "Extraction", "QueryStrategy", "Timer", "Workbench", "register_attack"]
