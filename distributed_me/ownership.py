"""``dme verify SUSPECT --victim V``: was a suspect model extracted from V? Decided from watermark evidence.

DAWN (:mod:`distributed_me.defenses.dawn`): the API recorded, per client, the queries it answered with a wrong label.
The suspect is asked for its labels on those queries; under H0 ("not trained on V's answers") its matches with the
wrong labels are below ``Binomial(n, 1/(K − 1))`` (the module's argument), so the binomial tail is the p-value,
per client and over all clients together. The verdict is "extracted" when the p-value is below ``alpha``.

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
from .defenses.dawn import binomial_pvalue, load_watermarks
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


__all__ = ["VERIFY_ALPHA", "Evidence", "dawn_evidence", "load_suspect", "save_piracy_model", "verify_dawn"]
