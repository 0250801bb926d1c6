"""One extraction, end to end: strategy → oracle → piracy model → metrics. The body of `dme attack` and of a sweep
trial alike; it knows nothing of Ray, so the same code runs in a unit test, on the command line and in Tune.

Two things are defined here once and imported everywhere else:

- :class:`AttackSpec` owns the attacker's defaults. Callers that were not given a value (an unset CLI flag, a sweep
  factor left out) drop it rather than repeat a default — see :meth:`AttackSpec.from_given`, the way timm's
  ``create_model`` drops ``None`` kwargs.
- The result schema: :data:`METRIC_NAMES`, the flat metric names of one run (``dme attack --json``, Tune reports,
  MLflow metrics, ``dme report``, ``dme bench``), produced by :meth:`ExtractionResult.metrics`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .attacks import ATTACKS, PHASES, QueryStrategy, Timer, Workbench
from .data.base import Normalization, Pool
from .defenses import parse_policy
from .metrics import accuracy, adversarial_fidelity, fidelity
from .models import MODELS, NormalizedModel, create_model
from .oracle import Oracle
from .train import OPTIMIZERS, TrainConfig, predict_labels

log = logging.getLogger(__name__)

#: the metric names of one extraction run, in the order tables show them. ``victim_utility`` and ``victim_kl`` are
#: the defender's side: top-1 accuracy of the labels the API returns under its output policy, and how far its answers
#: are from the victim's own posterior (:meth:`Evaluator.defense_cost`), on the victim's test split.
SCORE_NAMES: tuple[str, ...] = ("victim_accuracy", "victim_utility", "victim_kl", "accuracy", "fidelity",
                                "adversarial_fidelity", "queries_used")

#: the floor under an answer's scores before the KL: a label-only or top-k answer gives zeros, and the floor turns
#: them into "the answer withheld this mass" (at most ln(1/KL_FLOOR) ≈ 13.8 nats per query) instead of infinity
KL_FLOOR = 1e-6
TIME_NAMES: tuple[str, ...] = tuple(f"seconds_{p}" for p in (*PHASES, "total"))
METRIC_NAMES: tuple[str, ...] = SCORE_NAMES + TIME_NAMES

#: what a trial of a sweep varies (a sweep's grid axes; MLflow params of a trial run): the victim and its output
#: policy, then the attacker's choices: the unlabeled pool it draws queries from, then :class:`AttackSpec` fields
FACTORS: tuple[str, ...] = ("victim", "policy", "pool", "strategy", "budget", "arch", "optimizer", "lr",
                            "pretrained", "augment", "epochs", "seed")


class AttackSpec(BaseModel):
    """The attacker's choices for one extraction, validated before anything runs. The defaults here are the only
    attacker defaults in the project; ``lr=None`` is the optimizer's paper default (see ``train/optimizers.py``)."""

    model_config = ConfigDict(extra="forbid")
    strategy: str = "random"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    budget: int = Field(1000, gt=0)
    arch: str = "cnn32"
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

    @classmethod
    def from_given(cls, **given: Any) -> "AttackSpec":
        """A spec from the values a caller was given; ``None`` means "not given" and falls back to the default here
        (for ``lr``, whose default is ``None``, that is the same thing)."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer, lr=self.lr,
                           weight_decay=self.weight_decay, augment=self.augment, seed=self.seed)

    def build_strategy(self) -> QueryStrategy:
        return QueryStrategy.create(self.strategy, self.strategy_options)


@dataclass
class Evaluator:
    """The benchmark's judge: the victim's unmetered top-1 and its labeled test split (never given to attacks).

    With ``victim_probs`` it also judges the defender's side: :meth:`utility` of an output policy."""

    victim_labels: Callable[[torch.Tensor], torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    victim_pred: torch.Tensor | None = None
    victim_probs: Callable[[torch.Tensor], torch.Tensor] | None = None
    _cost: dict[str, tuple[float, float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.victim_pred is None:
            self.victim_pred = self.victim_labels(self.images)

    def utility(self, policy: str) -> float | None:
        """Top-1 accuracy of the labels the API returns under ``policy`` on the test split; ``None`` without
        ``victim_probs``."""
        cost = self.defense_cost(policy)
        return None if cost is None else cost[0]

    def defense_cost(self, policy: str) -> tuple[float, float] | None:
        """What ``policy`` costs the defender on the test split, cached per policy: (utility, KL) with utility the
        top-1 accuracy of the labels the API returns and KL the mean KL(victim posterior ‖ answer), the answer's
        scores floored at :data:`KL_FLOOR` and renormalized (a label-only answer is a one-hot: its KL measures the
        information withheld). ``None`` without ``victim_probs``. Seeded policies (noise) use seed 0 and the empty
        client stream, as :class:`~distributed_me.oracle.LocalOracle` does by default."""
        if self.victim_probs is None:
            return None
        if policy not in self._cost:
            probs = self.victim_probs(self.images).numpy().astype(np.float64)
            answer = parse_policy(policy, seed=0)(probs.astype(np.float32))
            if answer.scores is not None:
                q = np.asarray(answer.scores, dtype=np.float64)
            else:
                q = np.eye(probs.shape[1])[np.asarray(answer.labels)]
            q = np.maximum(q, KL_FLOOR)
            q /= q.sum(axis=1, keepdims=True)
            p = np.maximum(probs, 1e-12)
            kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
            self._cost[policy] = (accuracy(np.asarray(answer.labels), self.labels.numpy()), max(kl, 0.0))
        return self._cost[policy]

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
    """One run's outcome. :meth:`metrics` is the result schema (:data:`METRIC_NAMES`); ``seconds`` holds every phase
    of :data:`PHASES` plus ``total``."""

    victim_accuracy: float
    accuracy: float
    fidelity: float
    adversarial_fidelity: float
    queries_used: int
    budget: int
    seconds: dict[str, float]
    victim_utility: float | None = None
    victim_kl: float | None = None
    history: list[dict] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # the piracy model
    #: the cost model's projection of this run, ``projected_seconds_*`` / ``projected_raw_seconds_*`` per phase and
    #: total (:func:`distributed_me.cost.plan.projection_metrics`), beside the actual ``seconds_*``
    projected: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The run's metrics under :data:`METRIC_NAMES` (a name whose value is unknown, e.g. the utility of a remote
        policy, is left out rather than faked)."""
        values: dict[str, Any] = {k: getattr(self, k) for k in SCORE_NAMES}
        values.update({f"seconds_{k}": v for k, v in self.seconds.items()})
        out = {k: float(values[k]) for k in METRIC_NAMES if values.get(k) is not None
               and not (isinstance(values[k], float) and math.isnan(values[k]))}
        return {**out, **{k: float(v) for k, v in self.projected.items()}}

    def to_dict(self) -> dict:
        """The JSON form (``dme attack --json``): the metrics, the budget, the spec and the per-epoch history."""
        return {**self.metrics(), "budget": self.budget, "spec": self.spec, "history": self.history}


def run_extraction(
    oracle: Oracle,
    pool: Pool,
    spec: AttackSpec,
    evaluator: Evaluator,
    progress: bool = False,
    on_epoch: Callable[[int, dict], Any] | None = None,
    eval_every_epoch: bool = False,
    policy: str | None = None,
    projected: dict[str, float] | None = None,
) -> ExtractionResult:
    """Run one extraction and score it. ``on_epoch(epoch, row)`` receives per-epoch rows (plus clean fidelity and
    accuracy when ``eval_every_epoch``), e.g. for Tune or MLflow. ``policy``, the output policy the oracle applies
    when the caller knows it, adds the defender's utility to the result. ``projected`` (the cost model's figures for
    this run) is carried into the result's metrics beside the actual times.

    The phases are disjoint: per-epoch evaluation runs inside training but counts as ``eval`` only, so the phases sum
    to the total (up to the strategy's untimed bookkeeping) and each compares with its projection."""
    t_start = time.perf_counter()
    timer = Timer()
    with timer.phase("setup"):
        strategy = spec.build_strategy()
        strategy.check(oracle, pool, spec.budget)
    c, size, _ = oracle.info.input_shape
    num_classes = oracle.info.num_classes

    def make_model() -> torch.nn.Module:
        net = create_model(spec.arch, num_classes, in_chans=c, img_size=size, pretrained=spec.pretrained)
        # the attacker does not know the victim's normalization: a neutral one, documented as such
        return NormalizedModel(net, Normalization((0.5,) * c, (0.5,) * c))

    bench = Workbench(make_model, spec.train_config(), oracle.info.input_shape, timer, spec.seed, progress)

    epoch_eval = Timer(phases=("eval",))

    def epoch_hook(epoch: int, row: dict) -> dict | None:
        extra = None
        if eval_every_epoch:
            with timer.phase("eval"), epoch_eval.phase("eval"):
                extra = evaluator.clean(bench.model)  # type: ignore[arg-type]
            row = {**row, **extra}
        if on_epoch is not None:
            on_epoch(epoch, row)
        return extra

    bench.on_epoch = epoch_hook if (on_epoch or eval_every_epoch) else None
    used_before = oracle.queries_used
    result = strategy.extract(oracle, pool, spec.budget, bench)  # its own check again is cheap by contract
    with timer.phase("eval"):
        scores = evaluator.full(result.model, seed=spec.seed, adv_samples=spec.adv_eval_samples)
        utility, kl = (evaluator.defense_cost(policy) or (None, None)) if policy else (None, None)
    timer.seconds["train"] -= epoch_eval.seconds["eval"]  # counted in eval, not twice
    seconds = {**timer.seconds, "total": time.perf_counter() - t_start}
    return ExtractionResult(
        victim_accuracy=evaluator.victim_accuracy,
        victim_utility=utility,
        victim_kl=kl,
        queries_used=oracle.queries_used - used_before,
        budget=spec.budget,
        seconds=seconds,
        history=result.history,
        spec=spec.model_dump(),
        model=result.model,
        projected=dict(projected or {}),
        **scores,
    )
