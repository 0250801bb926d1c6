"""Detectors: stateful, per API key, fed every request the ingress sees (the algorithms; where their state lives and
survives restarts is the serving layer's business). See :mod:`.base` for the contract, :mod:`.prada` (PRADA, against
synthetic query streams) and :mod:`.ood_rate` (an MSP out-of-distribution rate test, against natural-pool streams)."""

from .base import (
    DETECTORS,
    Detector,
    DetectorState,
    Verdict,
    parse_detector,
    parse_detectors,
    register_detector,
)
from .ood_rate import OodRate, OodRateState, msp_ood_scores
from .prada import Prada, PradaState

__all__ = ["DETECTORS", "Detector", "DetectorState", "OodRate", "OodRateState", "Prada", "PradaState", "Verdict",
           "msp_ood_scores", "parse_detector", "parse_detectors", "register_detector"]
