"""``dme verify SUSPECT --victim V``: was a suspect model extracted from V? Decided from watermark evidence.

DAWN (:mod:`distributed_me.defenses.dawn`): the API recorded, per client, the queries it answered with a wrong label.
The suspect is asked for its labels on those queries; under H0 ("not trained on V's answers") its matches with the
wrong labels are below ``Binomial(n, 1/(K − 1))`` (the module's argument), so the binomial tail is the p-value,
per client and over all clients together. The verdict is "extracted" when the p-value is below ``alpha``.

EWE (:mod:`distributed_me.defenses.ewe`): the watermarked version's bundle carries its trigger set, target class and
``p0`` (calibrated when the watermark was made). The suspect is asked for its labels on the triggers; under H0 it
answers each with the target with probability at most ``p0``, so ``P(Binomial(n, p0) ≥ matches)`` is one p-value;
a one-sided Fisher exact test of the suspect's target answers on the triggers against its answers on the evidence's
control images is the other (a suspect that answers any such image with the target shows nothing); the verdict's
p-value is the larger one.

A suspect is a piracy model file as sweeps and ``dme attack`` store it (``piracy_model.pt``, local or
``runs:/RUN/piracy_model.pt``) or anything a victim can be (bundle folder, registered name, ``models:/`` URI).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.base import Normalization
from .defenses.dawn import binomial_pvalue, binomial_tail, load_watermarks
from .defenses.ewe import EVIDENCE_FILE
from .errors import DmeError
from .models import NormalizedModel, create_model
from .train import predict_probs

log = logging.getLogger(__name__)

#: the verdict's significance level (ours: one false accusation in a thousand independent models)
VERIFY_ALPHA = 1e-3

Predict = Callable[[torch.Tensor], np.ndarray]


def save_piracy_model(model: torch.nn.Module, arch: str, num_classes: int, input_shape: tuple[int, int, int],
                      path: str | Path) -> Path:
    """A piracy model as sweeps store it (``piracy_model.pt``: state dict, arch, classes, input shape), what
    :func:`load_suspect` reads back."""
    torch.save({"state_dict": model.state_dict(), "arch": arch, "num_classes": int(num_classes),
                "input_shape": [int(v) for v in input_shape]}, path)
    return Path(path)


def load_suspect(spec: str) -> Predict:
    """A suspect's label function on float NCHW images in [0, 1] (module docstring for what ``spec`` may be)."""
    path = Path(spec)
    if spec.startswith("runs:/") or spec.startswith("mlflow-artifacts:/"):
        import mlflow

        from .tracking import use_store

        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=use_store()))
        except Exception as e:  # mlflow raises several exception types for a missing artifact
            raise DmeError(f"cannot fetch suspect {spec} from MLflow: {e}") from None
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            c, size, _ = saved["input_shape"]
            net = create_model(saved["arch"], int(saved["num_classes"]), in_chans=int(c), img_size=int(size))
            model = NormalizedModel(net, Normalization((0.5,) * c, (0.5,) * c))  # what attacks train
            model.load_state_dict(saved["state_dict"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise DmeError(f"suspect {spec} is not a piracy model file (state_dict, arch, num_classes, input_shape): "
                           f"{type(e).__name__}: {e}") from None
        model.eval()
        return lambda x: predict_probs(model, x).argmax(1).numpy()
    from .victims import load_victim

    victim = load_victim(spec)
    return lambda x: victim.predict_labels(x).numpy()


@dataclass
class Evidence:
    """One client's watermark set (or ``"all"`` of them) judged against a suspect."""

    stream: str
    samples: int
    matches: int
    p_value: float
    extracted: bool

    @property
    def agreement(self) -> float:
        return self.matches / self.samples if self.samples else float("nan")


WatermarkSets = dict[str, tuple[np.ndarray, np.ndarray]]


def dawn_evidence(evidence: str | Path) -> WatermarkSets:
    """The watermark sets DAWN recorded under ``evidence`` (a ``FolderSink`` root: ``<query_log>/watermarks/<victim>``
    behind Serve); none is an error that says where they come from."""
    sets = load_watermarks(evidence)
    if not sets:
        raise DmeError(f"no DAWN watermark records under {evidence}: serve the victim with output_policy 'dawn' "
                       "(records land in <query_log>/watermarks/<victim name>/) and pass that folder as --evidence")
    return sets


def verify_dawn(predict: Predict, sets: WatermarkSets, num_classes: int,
                alpha: float = VERIFY_ALPHA) -> list[Evidence]:
    """Per client stream, then ``"all"``: the suspect's matches with the wrong labels of :func:`dawn_evidence`."""
    rows, total_n, total_m = [], 0, 0
    for stream, (images, labels) in sets.items():
        matches = int((predict(torch.from_numpy(images)) == labels).sum())
        total_n, total_m = total_n + len(labels), total_m + matches
        p = binomial_pvalue(matches, len(labels), num_classes)
        rows.append(Evidence(stream, len(labels), matches, p, p < alpha))
    p = binomial_pvalue(total_m, total_n, num_classes)
    rows.append(Evidence("all", total_n, total_m, p, p < alpha))
    log.info("DAWN verification: %d of %d watermark labels matched, p = %.3g", total_m, total_n, p)
    return rows


@dataclass(frozen=True)
class EWEEvidence:
    """An EWE watermark as the owner keeps it (:data:`~distributed_me.defenses.ewe.EVIDENCE_FILE`)."""

    trigger: np.ndarray
    control: np.ndarray
    target: int
    p0: float
    info: dict


def ewe_evidence(path: str | Path) -> EWEEvidence:
    """The EWE evidence in ``path``: the file itself or a victim bundle folder that holds it."""
    import json

    path = Path(path)
    file = path / EVIDENCE_FILE if path.is_dir() else path
    if not file.is_file():
        raise DmeError(f"no EWE evidence at {path}: expected {EVIDENCE_FILE} (written into the bundle by "
                       "`dme defense ewe`) or the bundle folder holding it")
    try:
        with np.load(file, allow_pickle=False) as z:
            return EWEEvidence(z["trigger"].astype(np.float32), z["control"].astype(np.float32), int(z["target"]),
                               float(z["p0"]), json.loads(str(z["info"])))
    except (KeyError, ValueError, OSError) as e:
        raise DmeError(f"{file} is not EWE evidence (trigger, target, p0, info): {type(e).__name__}: {e}") from None


@dataclass
class EWEVerdict(Evidence):
    """:class:`Evidence` on the triggers, with the two p-values behind ``p_value`` (their maximum)."""

    control_samples: int = 0
    control_matches: int = 0
    p_reference: float = float("nan")
    p_control: float = float("nan")


def verify_ewe(predict: Predict, evidence: EWEEvidence, alpha: float = VERIFY_ALPHA) -> EWEVerdict:
    """The suspect's target answers on the triggers, against ``Binomial(n, p0)`` and against its own answers on the
    controls (one-sided Fisher exact test); the p-value is the larger of the two (module docstring)."""
    from scipy.stats import fisher_exact

    on_trigger = predict(torch.from_numpy(evidence.trigger)) == evidence.target
    on_control = predict(torch.from_numpy(evidence.control)) == evidence.target
    n, m = len(on_trigger), int(on_trigger.sum())
    nc, mc = len(on_control), int(on_control.sum())
    p_ref = binomial_tail(m, n, evidence.p0)
    p_ctrl = float(fisher_exact([[m, n - m], [mc, nc - mc]], alternative="greater")[1]) if n and nc else 1.0
    p = max(p_ref, p_ctrl)
    log.info("EWE verification: %d of %d triggers and %d of %d controls answered with class %d, p = %.3g "
             "(against p0 %.3g; against the controls %.3g)", m, n, mc, nc, evidence.target, p, p_ref, p_ctrl)
    return EWEVerdict("ewe", n, m, p, p < alpha, nc, mc, p_ref, p_ctrl)


__all__ = ["VERIFY_ALPHA", "EWEEvidence", "EWEVerdict", "Evidence", "binomial_tail", "dawn_evidence", "ewe_evidence",
           "load_suspect", "save_piracy_model", "verify_dawn", "verify_ewe"]
