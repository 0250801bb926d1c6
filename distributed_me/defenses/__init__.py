"""Defenses. Output policies (what an API reveals of its confidence scores) are a chain applied inside the victim's
``predict``, as ART's postprocessors are; detectors are stateful per API key (their state lives in the serving
layer); MAD, adaptive misinformation and CIP are the math of the model-carrying output defenses."""

from .detectors import DETECTORS, Detector, DetectorState, Verdict, parse_detector, parse_detectors
from .policies import (
    POLICIES,
    OutputPolicy,
    PolicyChain,
    parse_policy,
)

__all__ = ["DETECTORS", "POLICIES", "Detector", "DetectorState", "OutputPolicy", "PolicyChain", "Verdict",
           "parse_detector", "parse_detectors", "parse_policy"]
