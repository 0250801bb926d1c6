"""Field types shared by every user-written spec (serve configs, sweeps): validated once, with the same message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from .defenses import parse_detector, parse_policy
from .errors import DmeError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _safe_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-' (names appear in URLs and paths)")
    return v


def _policy(v: str) -> str:
    try:
        parse_policy(v)
    except DmeError as e:  # pydantic reports a ValueError with the field's name and value
        raise ValueError(str(e)) from None
    return v


def _detector(v: str) -> str:
    try:
        parse_detector(v)
    except DmeError as e:
        raise ValueError(str(e)) from None
    return v


SafeName = Annotated[str, AfterValidator(_safe_name)]
"""A name that can be part of a URL or a folder: victims, sweeps."""

PolicySpec = Annotated[str, AfterValidator(_policy)]
"""An output-policy chain such as ``"round:2,topk:1"``, checked against the policy registry."""

DetectorSpec = Annotated[str, AfterValidator(_detector)]
"""A detector such as ``"prada:delta=0.9"``, checked against the detector registry."""


def read_yaml_mapping(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; a missing file, bad YAML or another shape is one clear DmeError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DmeError(f"{what} {path} not found; see {example} for an example")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DmeError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise DmeError(f"{what} {path} must hold a mapping of fields, as {example} does")
    return doc
