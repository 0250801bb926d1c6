"""The one victim resolver: what ``--victim``, a Serve victim's ``source`` and a sweep's ``victims[].source`` mean.

A source is, in this order: empty or ``embedded`` (the embedded digits victim, trained and cached on first use), an
existing bundle folder, an MLflow model URI (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/...``), or a
registered model name (its latest version). ``dme attack``, the Serve deployment and sweeps all call
:func:`load_victim` / :func:`victim_bundle_path`, so a source means the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Victim, load_bundle
from .embedded import EMBEDDED_VICTIM, embedded_victim
from .store import resolve_bundle_path


def is_embedded(source: str | None) -> bool:
    return source in (None, "", EMBEDDED_VICTIM)


def victim_bundle_path(source: str | None, progress: bool = False) -> Path:
    """The local bundle folder of ``source`` (absolute); MLflow models are downloaded into the cache once."""
    if is_embedded(source):
        return embedded_victim(progress=progress)[1].resolve()
    return resolve_bundle_path(str(source)).resolve()


def load_victim(source: str | None, progress: bool = False) -> Victim:
    """The victim ``source`` names, loaded (see the module docstring for what a source may be)."""
    if is_embedded(source):
        return embedded_victim(progress=progress)[0]
    return load_bundle(resolve_bundle_path(str(source)))
