"""Defense kits: the models and calibration data a model-carrying output defense needs, trained once per victim.

MAD needs a surrogate whose Jacobians it perturbs along, AM a misinformation model and the victim's in-distribution
scores to set its threshold from, CIP the victim's in-distribution energies for its two thresholds. A *kit* holds them
for one victim: ``dme defense train --victim V --defense NAME`` builds it, and the victim deployment (or a
:class:`~distributed_me.oracle.LocalOracle`) loads it when its output policy names that defense.

Where a kit lives, so that a victim never meets another victim's kit:

- on disk, ``$DME_HOME/defenses/<victim weights sha256, 16 hex>/<kit>/`` (``kit.json``, ``*.pt`` state dicts,
  ``*.npy`` arrays), keyed by the victim's *weights*, not its name: a retrained victim gets new kits;
- in MLflow, a run of the experiment ``dme-defenses`` tagged ``dme.kind=defense-kit``, ``dme.kit``,
  ``dme.victim_sha``, with the kit folder as its ``kit/`` artifacts. When the victim came from the model registry
  (``models:/NAME/VERSION``), that version gets the tag ``dme.defense.<kit> = runs:/<run>/kit``: the kit sits beside
  the version it protects. A machine without the disk copy fetches the kit from MLflow by the victim's hash.

A kit is built from the defender's own data: the victim's training and test splits (``victim.meta.dataset``).
Builders are registered in :data:`KITS` by name; each output policy that needs one names it (``needs_kit``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DmeError
from ..registry import Registry

log = logging.getLogger(__name__)

KIT_FILE = "kit.json"
KIT_EXPERIMENT = "dme-defenses"
#: bumped when what a kit holds changes, so an old kit is rebuilt rather than misread
KIT_FORMAT = 1


@dataclass
class KitInputs:
    """What a builder may use: the victim (to query its logits) and the defender's data, float NCHW in [0, 1]."""

    victim: Any  # distributed_me.victims.Victim
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    seed: int = 0
    epochs: int | None = None
    progress: bool = False


#: a builder writes its files into the folder it is given and returns the kit's metadata (JSON-able)
KitBuilder = Callable[[KitInputs, Path], dict]
KITS: Registry[KitBuilder] = Registry("defense kit")


@dataclass
class DefenseKit:
    """A loaded kit: ``meta`` from ``kit.json``, models and arrays loaded on first use."""

    name: str
    path: Path
    meta: dict
    victim_meta: Any = None  # VictimMeta, to rebuild the kit's models with the victim's architecture
    _cache: dict[str, Any] = field(default_factory=dict)

    def array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = np.load(self.path / f"{key}.npy", allow_pickle=False)
        return self._cache[key]

    def blob(self, filename: str) -> bytes:
        """A file of the kit as bytes (DAWN's secret)."""
        if filename not in self._cache:
            self._cache[filename] = (self.path / filename).read_bytes()
        return self._cache[filename]

    def model(self, key: str) -> nn.Module:
        """A model of the victim's architecture (and normalization) with the kit's weights ``key.pt``, eval mode."""
        if key not in self._cache:
            self._cache[key] = load_model_like(self.victim_meta, self.path / f"{key}.pt")
        return self._cache[key]


def new_model_like(victim_meta: Any, seed: int) -> nn.Module:
    """A freshly initialized model of the victim's architecture behind the victim's input normalization."""
    from ..data.base import Normalization
    from ..models import NormalizedModel, create_model

    m = victim_meta
    torch.manual_seed(seed)
    net = create_model(m.arch, m.num_classes, m.in_chans, m.img_size, **m.arch_kwargs)
    return NormalizedModel(net, Normalization.from_dict(m.normalization))


def load_model_like(victim_meta: Any, path: Path) -> nn.Module:
    model = new_model_like(victim_meta, 0)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def save_model(model: nn.Module, path: Path) -> None:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def victim_key(victim: Any) -> str:
    """16 hex digits naming the victim's weights (its bundle hash; for a bundle without one, a hash of the state)."""
    sha = getattr(victim.meta, "weights_sha256", "")
    if not sha:
        h = hashlib.sha256()
        for k, v in sorted(victim.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        sha = h.hexdigest()
    return sha[:16]


def kit_dir(victim: Any, name: str) -> Path:
    from ..tracking import dme_home

    return dme_home() / "defenses" / victim_key(victim) / name


def _read(path: Path, name: str, victim: Any) -> DefenseKit | None:
    meta_file = path / KIT_FILE
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != KIT_FORMAT:
        log.warning("defense kit %s has format %s (this version reads %s): ignored", path, meta.get("format"),
                    KIT_FORMAT)
        return None
    return DefenseKit(name, path, meta, victim.meta)


def _fetch_from_mlflow(victim: Any, name: str, dst: Path) -> bool:
    """Download the newest kit for this victim from MLflow into ``dst``; False when MLflow has none."""
    try:
        import mlflow

        from ..tracking import use_store

        use_store()
        exp = mlflow.get_experiment_by_name(KIT_EXPERIMENT)
        if exp is None:
            return False
        runs = mlflow.search_runs([exp.experiment_id], output_format="list", max_results=1,
                                  filter_string=f"tags.`dme.kit` = '{name}' and tags.`dme.victim_sha` = "
                                                f"'{victim_key(victim)}' and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            return False
        tmp = dst.with_name(f"{dst.name}.fetch")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="kit", dst_path=str(tmp))
        shutil.rmtree(dst, ignore_errors=True)
        (tmp / "kit").replace(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    except Exception as e:  # an unreachable store is "no kit here", reported by the caller with the fix
        log.warning("could not look for a %s kit in MLflow: %s", name, e)
        return False


def find_kit(victim: Any, name: str) -> DefenseKit | None:
    """The kit ``name`` for this victim, from disk or else from MLflow; ``None`` when neither has it."""
    KITS.get(name)  # an unknown kit name is an error listing the known ones
    path = kit_dir(victim, name)
    kit = _read(path, name, victim)
    if kit is None and _fetch_from_mlflow(victim, name, path):
        kit = _read(path, name, victim)
    return kit


def missing_kit_error(victim: Any, name: str, policy: str | None = None) -> DmeError:
    who = f"output policy {policy!r}" if policy else f"defense {name!r}"
    return DmeError(f"{who} needs the {name!r} defense models for victim {victim.meta.name!r} (weights "
                    f"{victim_key(victim)}), and none exist: train them with `dme defense train --victim "
                    f"SOURCE --defense {name}` (SOURCE: the victim's bundle path, registered name or models:/ URI)")


def load_kit(victim: Any, name: str, policy: str | None = None) -> DefenseKit:
    kit = find_kit(victim, name)
    if kit is None:
        raise missing_kit_error(victim, name, policy)
    return kit


def bind_kits(chain: Any, victim: Any) -> Any:
    """Load the kits ``chain`` (a :class:`~distributed_me.defenses.policies.PolicyChain`) needs for ``victim`` and
    bind them; a chain that needs none is returned as is."""
    needed = chain.kits_needed()
    if needed:
        chain.bind({k: load_kit(victim, k, policy) for k, policy in needed.items()})
    return chain


def _defender_data(victim: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..data import load_dataset
    from ..victims.train import dataset_tensors

    try:
        ds = load_dataset(victim.meta.dataset, seed=victim.meta.split_seed)
    except Exception as e:
        raise DmeError(f"the defender's data for victim {victim.meta.name!r} ({victim.meta.dataset}) cannot be "
                       f"loaded: {e}") from None
    c, s, _ = victim.input_shape
    return (*dataset_tensors(ds, "train", s, c), *dataset_tensors(ds, "test", s, c))


def train_kit(victim: Any, name: str, *, source: str | None = None, seed: int = 0, epochs: int | None = None,
              progress: bool = False, track: bool = True) -> DefenseKit:
    """Build kit ``name`` for ``victim`` (replacing any on disk), log it to MLflow when ``track``, and return it.

    ``source`` is how the user named the victim: a ``models:/NAME/VERSION`` URI (or a registered name) also gets the
    version tag pointing at the kit."""
    builder = KITS.get(name)
    x_train, y_train, x_test, y_test = _defender_data(victim)
    inputs = KitInputs(victim, x_train, y_train, x_test, y_test, seed=seed, epochs=epochs, progress=progress)
    dst = kit_dir(victim, name)
    tmp = dst.with_name(f"{dst.name}.build")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    meta = builder(inputs, tmp)
    meta = {"format": KIT_FORMAT, "kit": name, "victim": victim.meta.name, "victim_sha": victim_key(victim),
            "victim_source": source, "seed": seed, "build_seconds": round(time.perf_counter() - t0, 2), **meta}
    (tmp / KIT_FILE).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.replace(dst)
    log.info("defense kit %s for victim %s built in %.1fs: %s", name, victim.meta.name, meta["build_seconds"], dst)
    if track:
        _log_kit(victim, name, dst, meta, source)
    return DefenseKit(name, dst, meta, victim.meta)


def _log_kit(victim: Any, name: str, path: Path, meta: dict, source: str | None) -> None:
    import mlflow

    from ..tracking import mlflow_run

    tags = {"dme.kind": "defense-kit", "dme.kit": name, "dme.victim": victim.meta.name,
            "dme.victim_sha": victim_key(victim)}
    with mlflow_run(KIT_EXPERIMENT, f"defense {name} for {victim.meta.name}", tags=tags) as run:
        mlflow.log_params({k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k != "format"})
        mlflow.log_metrics({k: float(v) for k, v in meta.get("metrics", {}).items()})
        mlflow.log_artifacts(str(path), artifact_path="kit")
        run_id = run.info.run_id
    version = _registered_version(source)
    if version is not None:
        from mlflow import MlflowClient

        from ..tracking import use_store

        client = MlflowClient(use_store())
        client.set_model_version_tag(version[0], version[1], f"dme.defense.{name}", f"runs:/{run_id}/kit")
        log.info("models:/%s/%s tagged dme.defense.%s", version[0], version[1], name)


def _registered_version(source: str | None) -> tuple[str, str] | None:
    """(name, version) when ``source`` is ``models:/NAME/VERSION`` or a registered name (latest version)."""
    if not source or Path(source).exists():
        return None
    if source.startswith("models:/"):
        parts = source[len("models:/"):].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and parts[1].isdigit() else None
    if "/" in source or ":" in source:
        return None
    from ..victims.store import _latest_version

    try:
        return source, _latest_version(source)
    except Exception:
        return None


def register_kit(name: str) -> Callable[[KitBuilder], KitBuilder]:
    return KITS.register(name)


__all__ = ["KITS", "DefenseKit", "KitInputs", "bind_kits", "find_kit", "kit_dir", "load_kit", "missing_kit_error",
           "register_kit", "train_kit", "victim_key"]
