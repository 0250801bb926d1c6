"""SwiftTheft's reference models (paper 003 §III.2 "Reference model training" and "Feature mapping process").

m reference models are trained on *disjoint* subsets of labeled reference data (public data with no overlap with the
victim's training set), each from a different initialization. Each maps an image to a vector of reference-class
scores (the feature dimension equals the number of reference classes, §III.1); SwiftTheft sums the m vectors (eq. 3).

The models depend on the reference data and architecture only, never on a victim, so a set is trained once, logged
to MLflow (experiment ``dme-references``, keyed by a hash of its spec and the reference data's content) and reused
by every attack on any victim. Pool features are cached the same way, keyed by reference set and pool content.

Paper defaults (§IV.1): ResNet-34 reference models trained on ImageNet64 with Adam, learning rate 0.01, 100 epochs.
The paper's main runs do not state m; Table 4 compares 1, 8 and 16 and finds more models better below 12k queries,
so the default here is 8.

This module is core (no Ray). ``distributed_me.pools.features`` runs the same :meth:`ReferenceSet.features` in Ray Data
actors over a whole pool.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..cost import work
from ..cost.work import Net, Work
from ..data.base import Normalization, Pool, adapt_images, to_tensor
from ..data.features import features_loop, read_features, write_features
from ..data.registry import normalization_from
from ..device import get_device
from ..errors import DmeError
from ..models import NormalizedModel, create_model
from ..train import TrainConfig, fit

log = logging.getLogger(__name__)

EXPERIMENT = "dme-references"
_PAYLOAD = "reference.pt"


class ReferenceSpec(BaseModel):
    """How to build a reference set. ``data=None`` means the attack's own pool, with its labels (the paper's
    setting: ImageNet64 is both the pool and the reference data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: str | None = None
    n_models: int = Field(8, ge=1)
    arch: str = "resnet34"
    epochs: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: str = "adam"
    batch_size: int = Field(128, gt=1)
    size: int | None = Field(None, gt=0, description="input side in pixels; None: the reference data's own")
    max_images: int | None = Field(None, gt=0, description="cap on reference images used (split over the models)")
    seed: int = 0


def reference_data(spec: ReferenceSpec, pool: Pool | None) -> Pool:
    """The labeled reference data as a pool (labels required)."""
    if spec.data is None:
        if pool is None or pool.labels is None:
            raise DmeError("SwiftTheft needs labeled reference data, and this pool carries no labels: set the "
                           "strategy option reference_data to a labeled dataset (a registered name or a "
                           ".npz path) that does not overlap the victim's training data")
        return pool
    from ..data import load_pool

    ref = load_pool(spec.data)
    if ref.labels is None:
        raise DmeError(f"reference_data {spec.data!r} has no labels; SwiftTheft trains classifiers on it")
    return ref


def reference_key(spec: ReferenceSpec, data: Pool) -> str:
    blob = json.dumps({**spec.model_dump(exclude={"data"}), "data": data.content_key()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ReferenceSet:
    """m trained reference models; :meth:`features` is the summed feature of eq. 3."""

    def __init__(self, payload: dict[str, Any]):
        self.payload = payload
        self.key: str = payload["key"]
        self.size: int = payload["size"]
        self.num_classes: int = payload["num_classes"]
        norm = Normalization.from_dict(payload["normalization"])
        self.models = []
        for state in payload["states"]:
            net = create_model(payload["arch"], self.num_classes, in_chans=3, img_size=self.size)
            model = NormalizedModel(net, norm)
            model.load_state_dict(state)
            self.models.append(model.eval())
        self._device: torch.device | None = None

    def __len__(self) -> int:
        return len(self.models)

    def factory(self) -> functools.partial["ReferenceSet"]:
        """A picklable recipe for this set (its payload): what a Ray Data actor builds its own copy from."""
        return functools.partial(ReferenceSet, self.payload)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 NHWC images (any size/channels; adapted here) → float32 (N, classes): the sum over the m models of
        their softmax outputs (paper 003 eqs. 2–3)."""
        device = get_device()
        if self._device != device:
            self.models = [m.to(device) for m in self.models]
            self._device = device
        x = adapt_images(images, size=self.size, channels=3)
        out = np.zeros((len(x), self.num_classes), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            xb = to_tensor(x[start : start + batch_size]).to(device)
            acc = torch.zeros(len(xb), self.num_classes, device=device)
            for m in self.models:
                acc += torch.softmax(m(xb).float(), dim=1)
            out[start : start + len(xb)] = acc.cpu().numpy()
        return out


def train_reference_set(spec: ReferenceSpec, data: Pool, progress: bool = False) -> ReferenceSet:
    """Train m models on disjoint, seeded subsets of ``data`` with different initializations (seed + j)."""
    labels = np.asarray(data.labels)
    classes = int(labels.max()) + 1
    n = len(data) if spec.max_images is None else min(len(data), spec.max_images)
    if n < spec.n_models:
        raise DmeError(f"{n} reference images cannot be split over {spec.n_models} models")
    size = spec.size or int(data.get(np.array([0])).shape[1])
    perm = np.random.default_rng(spec.seed).permutation(len(data))[:n]
    parts = np.array_split(perm, spec.n_models)
    norm = None
    states = []
    for j, part in enumerate(parts):
        part = np.sort(part)
        images = data.get(part, size=size, channels=3)
        if norm is None:
            norm = normalization_from(images)
        torch.manual_seed(spec.seed + j)  # a different initialization per model (paper 003 §III.2)
        model = NormalizedModel(create_model(spec.arch, classes, in_chans=3, img_size=size), norm)
        cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, optimizer=spec.optimizer, lr=spec.lr,
                          augment=True, hflip=True, seed=spec.seed + j)
        hist = fit(model, to_tensor(images), torch.from_numpy(labels[part]), cfg, progress=progress,
                   desc=f"reference {j + 1}/{spec.n_models}")
        log.info("reference model %d/%d: %d images, final train loss %.3f, train accuracy %.3f", j + 1,
                 spec.n_models, len(part), hist[-1]["train_loss"], hist[-1]["train_agreement"])
        states.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return ReferenceSet({"key": reference_key(spec, data), "spec": spec.model_dump(), "arch": spec.arch,
                         "size": size, "num_classes": classes, "normalization": norm.to_dict(),  # type: ignore
                         "states": states, "data": data.name, "images": n})


def _cache_dir() -> Path:
    from ..tracking import dme_home

    return dme_home() / "references"


def _load_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _from_mlflow(key: str, dst: Path) -> Path | None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from ..tracking import use_store

    use_store()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = MlflowClient().search_runs([exp.experiment_id], f"tags.`dme.reference_key` = '{key}' and "
                                      "attributes.status = 'FINISHED'", max_results=1)
    if not runs:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    got = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path=_PAYLOAD, dst_path=str(dst))
    log.info("reference set %s loaded from MLflow run %s", key, runs[0].info.run_id)
    return Path(got)


def _to_mlflow(ref: ReferenceSet, path: Path) -> str:
    import mlflow

    from ..tracking import mlflow_run

    spec = ref.payload["spec"]
    with mlflow_run(EXPERIMENT, f"reference-{ref.key}", tags={"dme.kind": "reference",
                                                              "dme.reference_key": ref.key}) as run:
        mlflow.log_params({**{k: str(v) for k, v in spec.items()}, "reference_data": ref.payload["data"],
                           "images": ref.payload["images"], "size": ref.size, "classes": ref.num_classes})
        mlflow.log_artifact(str(path))
        return run.info.run_id


def get_reference_set(spec: ReferenceSpec, pool: Pool | None = None, progress: bool = False,
                      log_mlflow: bool = True) -> ReferenceSet:
    """The reference set for ``spec``: from the local cache, else from MLflow, else trained now (and stored in both)."""
    data = reference_data(spec, pool)
    key = reference_key(spec, data)
    path = _cache_dir() / key / _PAYLOAD
    if path.is_file():
        return ReferenceSet(_load_payload(path))
    if log_mlflow:
        got = _from_mlflow(key, path.parent)
        if got is not None:
            return ReferenceSet(_load_payload(got))
    log.info("training reference set %s: %d x %s on %s", key, spec.n_models, spec.arch, data.name)
    ref = train_reference_set(spec, data, progress=progress)
    _save_atomic(ref.payload, path)
    if log_mlflow:
        _to_mlflow(ref, path)
    return ref


def reference_work(spec: ReferenceSpec, pool: Pool, phase: str = "prepare") -> list[Work]:
    """What :func:`get_reference_set` plus the feature pass over ``pool`` will do (nothing for a product already in
    the local cache): ``n_models`` trainings on their share of the reference data, then every pool image through
    every model. Cheap: reads labels and one image, never trains."""
    data = reference_data(spec, pool)
    key = reference_key(spec, data)
    labels = np.asarray(data.labels)
    size = spec.size or int(data.get(np.array([0])).shape[1])
    net = Net(spec.arch, size, 3, int(labels.max()) + 1)
    items: list[Work] = []
    if not (_cache_dir() / key / _PAYLOAD).is_file():
        n = len(data) if spec.max_images is None else min(len(data), spec.max_images)
        share = -(-n // spec.n_models)
        items += [work.train(net, share, spec.epochs, spec.batch_size, phase=phase,
                             what=f"reference model {j + 1}/{spec.n_models}") for j in range(spec.n_models)]
    from ..tracking import dme_home

    if not (dme_home() / "features" / f"{key}-{pool.content_key()}.parquet").is_file():
        items.append(work.infer(net, len(pool), passes=spec.n_models, batch_size=256, phase=phase,
                                what="feature pass over the pool"))
    return items


# ----------------------------------------------------------------------------------------- feature files


def feature_cache_path(ref: ReferenceSet, pool: Pool) -> Path:
    from ..tracking import dme_home

    return dme_home() / "features" / f"{ref.key}-{pool.content_key()}.parquet"  # reference_work checks the same


def pool_features(ref: ReferenceSet, pool: Pool, progress: bool = False) -> np.ndarray:
    """Cached features of ``pool`` (written by a Ray Data pass or an earlier run), else computed here and cached."""
    path = feature_cache_path(ref, pool)
    if path.is_file():
        log.info("pool features from cache %s", path)
        return read_features(path, pool)
    feats = features_loop(ref, pool, progress=progress)
    write_features(path, pool.sample_ids(), feats)
    return feats
