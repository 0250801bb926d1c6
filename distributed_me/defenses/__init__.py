"""Defenses. Output policies (what an API reveals of its confidence scores) are a chain applied inside the victim's
``predict``, as ART's postprocessors are; detectors are stateful per API key (their state lives in the serving
layer). MAD, adaptive misinformation and CIP are output policies that carry their own models and calibration data,
a *kit* per victim (``kits.py``, built by ``dme defense train``)."""

from . import cip, dawn, mad, misinformation, modelguard  # noqa: F401 - registers the model-carrying policies and kits
from .detectors import DETECTORS, Detector, DetectorState, Verdict, parse_detector, parse_detectors
from .kits import KITS, bind_kits, find_kit, load_kit, train_kit
from .policies import (
    POLICIES,
    OutputPolicy,
    PolicyChain,
    parse_policy,
)

__all__ = ["DETECTORS", "KITS", "POLICIES", "Detector", "DetectorState", "OutputPolicy", "PolicyChain", "Verdict",
           "bind_kits", "find_kit", "load_kit", "parse_detector", "parse_detectors", "parse_policy", "train_kit"]
