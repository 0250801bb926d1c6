"""Query strategies. Importing this package imports every module in it, and so registers every built-in strategy in
:data:`ATTACKS`: adding a strategy is one file here (with ``@register_attack``) plus its test, and the registry-wide
contract tests in ``tests/test_extraction.py`` pick it up by themselves."""

import importlib
import pkgutil

from .base import (
    ATTACKS,
    GENERATED,
    PHASES,
    Extraction,
    Featurizer,
    PrepareContext,
    QueryBook,
    QueryStrategy,
    Timer,
    Workbench,
    register_attack,
)

__all__ = ["ATTACKS", "GENERATED", "PHASES", "Extraction", "Featurizer", "PrepareContext", "QueryBook", "QueryStrategy",
           "Timer", "Workbench", "register_attack"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
