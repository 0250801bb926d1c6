"""User plugins: modules that register attacks, defenses, models, … from outside the package.

Adding an attack is one file with a ``@register_attack`` class. To use it without touching the package, a sweep (or
``dme attack --plugin``) names the file or module under ``plugins``; it is imported before the spec is validated, in
the driver, and again in every trial worker (on any node), so the registries there know the new name too. A file is
imported under a name derived from its absolute path, once per process: importing it twice would register twice.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

from .errors import DmeError

log = logging.getLogger(__name__)


def _module_name(path: Path) -> str:
    return f"dme_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


def load_plugin(ref: str) -> str:
    """Import one plugin: a ``.py`` file path or a dotted module name. Returns the module's name in ``sys.modules``."""
    if ref.endswith(".py"):
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise DmeError(f"plugin file {ref!r} not found (relative paths are read from {Path.cwd()})")
        name = _module_name(path)
        if name in sys.modules:
            return name
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise DmeError(f"plugin file {ref!r} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]
            raise
        log.info("plugin %s loaded from %s", name, path)
        return name
    try:
        importlib.import_module(ref)
    except ModuleNotFoundError as e:
        raise DmeError(f"plugin module {ref!r} cannot be imported ({e}); give a .py file path or a module on "
                       "PYTHONPATH") from None
    return ref


def load_plugins(refs: list[str] | tuple[str, ...]) -> list[str]:
    return [load_plugin(r) for r in refs]
