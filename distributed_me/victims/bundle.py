"""The victim bundle: a trained classifier plus everything needed to serve it, as a folder.

``victim.json`` (metadata: architecture, classes, input shape, normalization, data split seed, test accuracy, weights
hash) and ``weights.pt`` (state dict of the normalized model). The hash makes a truncated or swapped weights file a
clear error instead of a silently different victim.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from pydantic import BaseModel, ValidationError

from ..data.base import Normalization
from ..errors import BundleError
from ..models import NormalizedModel, create_model

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE, WEIGHTS_FILE = "victim.json", "weights.pt"


class VictimMeta(BaseModel):
    name: str
    arch: str
    class_names: list[str]
    in_chans: int
    img_size: int
    normalization: dict
    dataset: str
    split_seed: int
    test_accuracy: float
    train_config: dict = {}
    arch_kwargs: dict = {}
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class Victim:
    """A loaded victim. Only the serving side (LocalOracle, Serve deployment, evaluator) holds one; attacks never do."""

    def __init__(self, model: NormalizedModel, meta: VictimMeta):
        self.model, self.meta = model.eval(), meta

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.meta.in_chans, self.meta.img_size, self.meta.img_size)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw logits: for the serving side's defenses that score energies (CIP); never sent to a client."""
        from ..train import predict_logits

        return predict_logits(self.model, x)

    @torch.no_grad()
    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        from ..train import predict_probs

        return predict_probs(self.model, x)

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_probs(x).argmax(dim=1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(path: str | Path, model: NormalizedModel, meta: VictimMeta) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    meta = meta.model_copy(update={"weights_sha256": _sha256(path / WEIGHTS_FILE)})
    (path / META_FILE).write_text(json.dumps(meta.model_dump(), indent=2))
    log.info("victim bundle written to %s", path)
    return path


def load_bundle(path: str | Path) -> Victim:
    """Load a bundle folder; any missing, unreadable or inconsistent piece is a :class:`BundleError`."""
    path = Path(path)
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise BundleError(f"victim bundle {path} does not exist or is not a folder (expected {META_FILE} and "
                          f"{WEIGHTS_FILE} inside; create one with `dme train-victim`)")
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise BundleError(f"victim bundle {path} is incomplete: {p.name} is missing")
    try:
        meta = VictimMeta.model_validate_json(meta_path.read_text())
    except (ValidationError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"victim bundle {path}: {META_FILE} is unreadable or invalid: {e}") from None
    if meta.format_version > FORMAT_VERSION:
        raise BundleError(f"victim bundle {path} has format {meta.format_version}; this version reads up to "
                          f"{FORMAT_VERSION}: upgrade distributed_me")
    if meta.weights_sha256 and _sha256(weights_path) != meta.weights_sha256:
        raise BundleError(f"victim bundle {path}: {WEIGHTS_FILE} does not match the hash in {META_FILE} "
                          f"(truncated or replaced file); retrain or re-download the bundle")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net = create_model(meta.arch, meta.num_classes, meta.in_chans, meta.img_size, **meta.arch_kwargs)
        model = NormalizedModel(net, Normalization.from_dict(meta.normalization))
        model.load_state_dict(state)
    except BundleError:
        raise
    except Exception as e:  # corrupt pickle, wrong shapes, ...
        raise BundleError(f"victim bundle {path}: cannot load weights ({type(e).__name__}: {e})") from None
    return Victim(model, meta)
