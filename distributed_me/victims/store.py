"""Victims in MLflow: registering a bundle as a model version, and resolving ``--victim`` to a loaded victim.

A bundle is logged as an MLflow pyfunc model whose artifact is the bundle folder, so a registered victim is both a
dme bundle (``models:/NAME/VERSION``) and a model MLflow itself can load and ``predict`` with.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import BundleError
from ..tracking import tracking_uri
from .bundle import META_FILE, load_bundle

log = logging.getLogger(__name__)

def _pyfunc_model():
    """The MLflow pyfunc wrapper of a bundle: ``predict`` takes float32 NCHW in [0, 1] and returns the victim's class
    probabilities. Built on first use, so that importing the victims package (every Serve replica and trial worker
    does) does not import MLflow (about a second per process)."""
    import mlflow.pyfunc

    # MLflow warns, when a PythonModel subclass is created, that `predict` has no type hints (and forces that warning
    # through its own filter): its hint-based validation does not know NCHW float tensors, so the signature stays
    # untyped and the warning is recorded here and dropped, off the user's terminal
    with warnings.catch_warnings(record=True):

        class VictimPyfunc(mlflow.pyfunc.PythonModel):
            def load_context(self, context) -> None:
                self.victim = load_bundle(context.artifacts["bundle"])

            def predict(self, context, model_input, params=None):  # noqa: ARG002 - MLflow's signature
                import torch

                return self.victim.predict_probs(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()

    return VictimPyfunc()


def cache_dir() -> Path:
    from ..tracking import dme_home

    return dme_home()


def register_victim(bundle: str | Path, name: str, experiment: str = "dme-victims", *,
                    version_tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                    history: dict[str, list[float]] | None = None, run_name: str | None = None) -> str:
    """Log the bundle as a run + registered model version; returns the ``models:/NAME/VERSION`` URI.

    A model-side defense registers its protected model as the next version of the victim's name with
    ``version_tags`` (its lineage and parameters), ``metrics`` (what it costs) and ``history`` (per-epoch curves)."""
    import mlflow
    import torch
    from mlflow.entities import Metric

    from ..tracking import mlflow_run

    victim = load_bundle(bundle)
    with mlflow_run(experiment, run_name or f"train-victim {name}",
                    tags={"dme.kind": "victim", "dme.victim": name, **(version_tags or {})}) as run:
        mlflow.log_params({"arch": victim.meta.arch, "dataset": victim.meta.dataset,
                           "img_size": victim.meta.img_size, "split_seed": victim.meta.split_seed,
                           **{f"train.{k}": v for k, v in victim.meta.train_config.items()
                              if not isinstance(v, dict)}})
        mlflow.log_metric("test_accuracy", victim.meta.test_accuracy)
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        if history:
            now = int(time.time() * 1000)
            mlflow.MlflowClient(tracking_uri()).log_batch(run.info.run_id, metrics=[
                Metric(k, float(v), now, step) for k, values in history.items() for step, v in enumerate(values)])
        info = mlflow.pyfunc.log_model(
            name="victim",
            python_model=_pyfunc_model(),
            artifacts={"bundle": str(Path(bundle).resolve())},
            registered_model_name=name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        )
    version = info.registered_model_version
    if version_tags:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri())
        for k, v in version_tags.items():
            client.set_model_version_tag(name, str(version), k, v)
    uri = f"models:/{name}/{version}"
    log.info("registered victim %s", uri)
    return uri


def _latest_version(name: str) -> str:
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri()).search_model_versions(f"name = '{name}'")
    if not versions:
        raise BundleError(f"no registered victim named {name!r} in the MLflow store {tracking_uri()}; "
                          "train one with `dme train-victim --name NAME`, or pass a bundle path or models:/ URI")
    return str(max(int(v.version) for v in versions))


def canonical_model_uri(spec: str) -> str:
    """``models:/NAME/VERSION`` for a registered name (its latest version) or an alias (``models:/NAME@ALIAS``, the
    version it points to now); other URIs as given. An alias moves, a version does not: caches and records keep the
    version."""
    if ":/" not in spec:
        return f"models:/{spec}/{_latest_version(spec)}"
    if spec.startswith("models:/") and "@" in spec:
        from mlflow import MlflowClient

        name, alias = spec[len("models:/"):].split("@", 1)
        try:
            version = MlflowClient(tracking_uri()).get_model_version_by_alias(name, alias).version
        except Exception as e:  # mlflow raises several exception types for an unknown name or alias
            raise BundleError(f"no version of registered victim {name!r} has the alias {alias!r} in the MLflow store "
                              f"{tracking_uri()} ({type(e).__name__}); set one with `dme defense ... --alias {alias}` "
                              "when the version is made, or MlflowClient().set_registered_model_alias, or name a "
                              "version: models:/NAME/VERSION") from None
        return f"models:/{name}/{version}"
    return spec


def parse_model_version(spec: str) -> tuple[str, int] | None:
    """``(NAME, VERSION)`` of a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` source (aliases resolved), else
    ``None`` (a bundle path, the embedded victim, a run URI)."""
    if not spec.startswith("models:/"):
        return None
    parts = canonical_model_uri(spec)[len("models:/"):].split("/")
    return (parts[0], int(parts[1])) if len(parts) == 2 and parts[1].isdigit() else None


def _cache_key(uri: str, store: str) -> str:
    """The cache folder name of an MLflow model: the URI, plus what tells two models behind the same URI apart (the
    store, and a registered version's creation time, which changes when a deleted name is registered again), so a
    cached bundle is never a different model's."""
    key = uri.replace(":/", "_").replace("/", "_")
    stamp = ""
    parsed = parse_model_version(uri)
    if parsed is not None:
        from mlflow import MlflowClient

        try:
            stamp = str(MlflowClient(store).get_model_version(parsed[0], str(parsed[1])).creation_timestamp)
        except Exception as e:  # mlflow raises several exception types for a missing model
            raise BundleError(f"cannot fetch victim {uri} from MLflow ({store}): {e}") from None
    digest = hashlib.sha256(f"{store}|{stamp}".encode()).hexdigest()[:12]
    return f"{key}_{digest}"


def resolve_bundle_path(spec: str) -> Path:
    """The local bundle folder of a victim given as a bundle path, an MLflow model URI (``models:/NAME/VERSION``,
    ``runs:/...``) or a registered name (latest version); MLflow models are downloaded into the cache once."""
    path = Path(spec)
    if path.exists():
        return path
    if "://" not in spec and ":/" not in spec and ("/" in spec or spec.endswith((".json", ".pt"))):
        raise BundleError(f"victim bundle {spec} does not exist")
    import mlflow

    from ..tracking import use_store

    store = use_store()
    uri = canonical_model_uri(spec)
    dst = cache_dir() / "victims" / "mlflow" / _cache_key(uri, store)
    if not any(dst.rglob(META_FILE)):
        dst.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store)
        except Exception as e:  # mlflow raises several exception types for a missing model
            raise BundleError(f"cannot fetch victim {uri} from MLflow ({store}): {e}") from None
    found = sorted(dst.rglob(META_FILE))
    if not found:
        raise BundleError(f"MLflow model {uri} holds no dme victim bundle ({META_FILE} not found)")
    return found[0].parent


__all__ = ["cache_dir", "canonical_model_uri", "parse_model_version", "register_victim", "resolve_bundle_path"]
