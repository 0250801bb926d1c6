"""Training a victim classifier on a labeled dataset and writing its bundle.

Defaults are for the embedded task (digits, a tiny CNN, a minute on a laptop CPU). SwiftTheft's victims (paper 003
§IV.1) use CNN32 with SGD (lr 0.01, momentum 0.5) for 300 epochs; pass ``--arch cnn32 --optimizer sgd --lr 0.01``
and more epochs to follow it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..data import LabeledDataset, adapt_images, load_dataset, to_tensor
from ..errors import DmeError
from ..metrics import accuracy
from ..models import NormalizedModel, create_model
from ..train import TrainConfig, fit, predict_labels
from .bundle import META_FILE, Victim, VictimMeta, save_bundle

log = logging.getLogger(__name__)


def dataset_tensors(ds: LabeledDataset, split: str, img_size: int, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as float NCHW in [0, 1] at the victim's input size, plus labels."""
    s = getattr(ds, split)
    return to_tensor(adapt_images(s.images, img_size, in_chans)), torch.as_tensor(s.labels)


def train_victim(
    dataset: str | LabeledDataset,
    arch: str,
    out: str | Path,
    cfg: TrainConfig,
    img_size: int | None = None,
    name: str | None = None,
    root: str | None = None,
    download: bool = False,
    progress: bool = True,
    arch_kwargs: dict | None = None,
) -> tuple[Victim, Path]:
    """Train, evaluate on the test split, and save a bundle at ``out``. Returns the victim and the bundle path."""
    ds = dataset if isinstance(dataset, LabeledDataset) else load_dataset(dataset, root=root, download=download,
                                                                        seed=cfg.seed)
    h, w, c = ds.image_shape
    img_size = img_size or h
    if img_size <= 0:
        raise DmeError(f"img_size must be positive, got {img_size}")
    torch.manual_seed(cfg.seed)
    net = create_model(arch, ds.num_classes, in_chans=c, img_size=img_size, **(arch_kwargs or {}))
    model = NormalizedModel(net, ds.normalization)
    x_train, y_train = dataset_tensors(ds, "train", img_size, c)
    x_test, y_test = dataset_tensors(ds, "test", img_size, c)
    t0 = time.perf_counter()
    fit(model, x_train, y_train, cfg, progress=progress, desc=f"victim {arch} on {ds.name}")
    test_acc = accuracy(predict_labels(model, x_test), y_test)
    log.info("victim %s on %s: test accuracy %.4f (%.1fs)", arch, ds.name, test_acc, time.perf_counter() - t0)
    meta = VictimMeta(
        name=name or f"{ds.name}-{arch}",
        arch=arch,
        class_names=list(ds.class_names),
        in_chans=c,
        img_size=img_size,
        normalization=ds.normalization.to_dict(),
        dataset=_dataset_ref(dataset, ds),
        split_seed=cfg.seed,
        test_accuracy=float(test_acc),
        train_config=asdict(cfg),
        arch_kwargs=arch_kwargs or {},
    )
    path = save_bundle(out, model, meta)
    # the meta as written, with the weights' hash: the victim in hand and the same bundle loaded again must name the
    # same weights (defense kits and other caches are keyed by that hash)
    return Victim(model.eval(), VictimMeta.model_validate_json((path / META_FILE).read_text())), path


def _dataset_ref(spec: str | LabeledDataset, ds: LabeledDataset) -> str:
    """What to store so the evaluator can reload the same test split: an absolute path for files (also for a dataset
    loaded from files before, which knows its source), else the name."""
    if isinstance(spec, str):
        parts = [Path(p) for p in spec.split(",")]
        if all(p.exists() for p in parts):
            return ",".join(str(p.resolve()) for p in parts)
        return spec
    # a loaded dataset: its recorded files, else its registered name ("source" of a dataset loaded by name only
    # describes where it came from, e.g. "sklearn.datasets.load_digits", and does not load it again)
    source = str(ds.meta.get("source", ""))
    if source and all(Path(p).exists() for p in source.split(",")):
        return source
    return ds.name


def victim_test_split(victim: Victim, root: str | None = None, download: bool = False,
                      dataset: LabeledDataset | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The victim's own test split (same dataset and split seed as at training), at its input shape."""
    ds = dataset or load_dataset(victim.meta.dataset, root=root, download=download, seed=victim.meta.split_seed)
    c, s, _ = victim.input_shape
    return dataset_tensors(ds, "test", s, c)


__all__ = ["train_victim", "victim_test_split", "dataset_tensors"]
