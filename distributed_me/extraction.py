"""One extraction, end to end: strategy → oracle → piracy model → metrics. The body of `dme attack` and of a sweep
trial alike; it knows nothing of Ray, so the same code runs in a unit test, on the command line and in Tune.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .attacks import ATTACKS, QueryStrategy, Timer, Workbench
from .data.base import Pool
from .metrics import accuracy, adversarial_fidelity, fidelity
from .models import NormalizedModel, create_model, MODELS
from .oracle import Oracle
from .data.base import Normalization
from .train import OPTIMIZERS, TrainConfig, predict_labels

log = logging.getLogger(__name__)


class AttackSpec(BaseModel):
    """The attacker's choices for one extraction, validated before anything runs."""

    model_config = ConfigDict(extra="forbid")
    strategy: str = "random"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    budget: int = Field(1000, gt=0)
    arch: str = "tiny_cnn"
    pretrained: bool | str = False
    optimizer: str = "adam"
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(64, gt=1)
    augment: bool = True
    seed: int = 0
    adv_eval_samples: int | None = Field(None, gt=0, description="cap on test images used for adversarial fidelity")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        ATTACKS.get(v)
        return v

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        MODELS.get(v)
        return v

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        OPTIMIZERS.get(v)
        return v

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           weight_decay=self.weight_decay, augment=self.augment, seed=self.seed)

    def build_strategy(self) -> QueryStrategy:
        return QueryStrategy.create(self.strategy, self.strategy_options)


@dataclass
class Evaluator:
    """The benchmark's judge: the victim's unmetered top-1 and its labeled test split (never given to attacks)."""

    victim_labels: Callable[[torch.Tensor], torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    victim_pred: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.victim_pred is None:
            self.victim_pred = self.victim_labels(self.images)

    @property
    def victim_accuracy(self) -> float:
        return accuracy(self.victim_pred, self.labels)

    def clean(self, model: torch.nn.Module) -> dict[str, float]:
        pred = predict_labels(model, self.images)
        return {"accuracy": accuracy(pred, self.labels), "fidelity": fidelity(pred, self.victim_pred)}

    def full(self, model: torch.nn.Module, seed: int = 0, adv_samples: int | None = None) -> dict[str, float]:
        out = self.clean(model)
        n = len(self.images) if adv_samples is None else min(adv_samples, len(self.images))
        out["adversarial_fidelity"] = adversarial_fidelity(model, self.victim_labels, self.images[:n],
                                                           self.labels[:n], seed=seed)
        return out


@dataclass
class ExtractionResult:
    victim_accuracy: float
    accuracy: float
    fidelity: float
    adversarial_fidelity: float
    queries_used: int
    budget: int
    seconds: dict[str, float]
    history: list[dict] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # the piracy model

    def to_dict(self) -> dict:
        d = asdict(replace(self, model=None))  # replace first: asdict would deep-copy the model
        del d["model"]
        return d


def run_extraction(
    oracle: Oracle,
    pool: Pool,
    spec: AttackSpec,
    evaluator: Evaluator,
    progress: bool = False,
    on_epoch: Callable[[int, dict], Any] | None = None,
    eval_every_epoch: bool = False,
) -> ExtractionResult:
    """Run one extraction and score it. ``on_epoch(epoch, row)`` receives per-epoch rows (plus clean fidelity and
    accuracy when ``eval_every_epoch``), e.g. for Tune or MLflow."""
    strategy = spec.build_strategy()
    strategy.check(oracle, pool, spec.budget)
    t_start = time.perf_counter()
    c, size, _ = oracle.info.input_shape
    timer = Timer()
    num_classes = oracle.info.num_classes

    def make_model() -> torch.nn.Module:
        net = create_model(spec.arch, num_classes, in_chans=c, img_size=size, pretrained=spec.pretrained)
        # the attacker does not know the victim's normalization: a neutral one, documented as such
        return NormalizedModel(net, Normalization((0.5,) * c, (0.5,) * c))

    bench = Workbench(make_model, spec.train_config(), oracle.info.input_shape, timer, spec.seed, progress)

    def epoch_hook(epoch: int, row: dict) -> dict | None:
        extra = None
        if eval_every_epoch:
            with timer.phase("eval"):
                extra = evaluator.clean(bench.model)  # type: ignore[arg-type]
            row = {**row, **extra}
        if on_epoch is not None:
            on_epoch(epoch, row)
        return extra

    bench.on_epoch = epoch_hook if (on_epoch or eval_every_epoch) else None
    used_before = oracle.queries_used
    result = strategy.extract(oracle, pool, spec.budget, bench)
    with timer.phase("eval"):
        scores = evaluator.full(result.model, seed=spec.seed, adv_samples=spec.adv_eval_samples)
    seconds = {**timer.seconds, "total": time.perf_counter() - t_start}
    return ExtractionResult(
        victim_accuracy=evaluator.victim_accuracy,
        queries_used=oracle.queries_used - used_before,
        budget=spec.budget,
        seconds=seconds,
        history=result.history,
        spec=spec.model_dump(),
        model=result.model,
        **scores,
    )
