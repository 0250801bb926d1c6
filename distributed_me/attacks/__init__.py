"""Query strategies. Importing this package registers every built-in strategy in :data:`ATTACKS`."""

from . import activethief as _activethief  # noqa: F401  (registers "activethief-*")
from . import knockoff as _knockoff  # noqa: F401  (registers "knockoff")
from . import random as _random  # noqa: F401  (registers "random")
from . import swifttheft as _swifttheft  # noqa: F401  (registers "swifttheft")
from .base import (
    ATTACKS,
    PHASES,
    Extraction,
    Featurizer,
    PrepareContext,
    QueryStrategy,
    Timer,
    Workbench,
    register_attack,
)

__all__ = ["ATTACKS", "PHASES", "Extraction", "Featurizer", "PrepareContext", "QueryStrategy", "Timer", "Workbench",
           "register_attack"]
