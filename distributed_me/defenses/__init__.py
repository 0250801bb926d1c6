"""Defenses. Output policies (what an API reveals of its confidence scores) are a chain applied inside the victim's
``predict``, as ART's postprocessors are; model-side defenses and detectors join here later."""

from .policies import (
    POLICIES,
    OutputPolicy,
    PolicyChain,
    parse_policy,
)

__all__ = ["POLICIES", "OutputPolicy", "PolicyChain", "parse_policy"]
