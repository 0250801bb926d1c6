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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .answer import Answer
from .attacks import ATTACKS, PHASES, QueryStrategy, Timer, Workbench
from .data.base import Normalization, Pool
from .metrics import KL_TRAIN_IMAGES, accuracy, adversarial_fidelity, fidelity
from .models import MODELS, NormalizedModel, create_model
from .oracle import Oracle
from .train import OPTIMIZERS, TrainConfig, predict_labels

log = logging.getLogger(__name__)

#: the metric names of one extraction run, in the order tables show them. ``victim_utility``, ``victim_agreement``,
#: ``victim_kl`` and ``victim_kl_train`` are the defender's side (:meth:`Evaluator.defense_cost`): top-1 accuracy of
#: the labels the API returns under its output policy, how often they agree with the undefended victim's, and how far
#: its answers are from the victim's own posterior on the test split (AdvFT's KL_test) and on training images
#: (KL_train).
SCORE_NAMES: tuple[str, ...] = ("victim_accuracy", "victim_utility", "victim_agreement", "victim_kl",
                                "victim_kl_train", "accuracy", "fidelity", "adversarial_fidelity", "queries_used")

#: the floor under an answer's scores before the KL: a label-only or top-k answer gives zeros, and the floor turns
#: them into "the answer withheld this mass" (at most ln(1/KL_FLOOR) ≈ 13.8 nats per query) instead of infinity
KL_FLOOR = 1e-6
TIME_NAMES: tuple[str, ...] = tuple(f"seconds_{p}" for p in (*PHASES, "total"))
METRIC_NAMES: tuple[str, ...] = SCORE_NAMES + TIME_NAMES

#: what a trial of a sweep varies (a sweep's grid axes; MLflow params of a trial run): the victim and its output
#: policy, then the attacker's choices: the unlabeled pool it draws queries from, then :class:`AttackSpec` fields
FACTORS: tuple[str, ...] = ("victim", "policy", "pool", "strategy", "budget", "arch", "optimizer", "lr",
                            "pretrained", "augment", "epochs", "seed")
#: attacker choices that are one value per sweep, not grid axes, but still tell results apart: MLflow params of every
#: trial run (``attack.NAME`` of the sweep spec), read by reports and the leaderboard, a run that predates one
#: counting as :class:`AttackSpec`'s default
CHOICES: tuple[str, ...] = ("targets",)


def refuse_label_targets(strategies: list[str]) -> None:
    """``targets: labels`` needs a strategy that trains on its collected answers (:meth:`Workbench.train`); a
    ValueError names the ones that do not. The one rule behind :class:`AttackSpec` and a sweep's ``attack``."""
    streaming = [s for s in strategies if not ATTACKS.get(s).trains_on_answers]
    if streaming:
        why = "; ".join(f"{s!r} trains its student on the API's scores while it queries" for s in streaming)
        raise ValueError(f"'labels' cannot apply to {', '.join(streaming)}: {why} (no training on collected answers "
                         "to switch to labels); use targets 'scores' with it, or a strategy that trains on its answers")


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
    targets: Literal["scores", "labels"] = Field(
        "scores", description="what the piracy model learns from: `scores` = the API's scores as soft targets (its "
                              "labels when it returns labels only); `labels` = the top-1 label of every answer, the "
                              "attacker's counter to defenses that bend the scores but keep the top-1 label")
    seed: int = 0
    adv_eval_samples: int | None = Field(None, gt=0, description="cap on test images used for adversarial fidelity")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        ATTACKS.get(v)
        return v

    @field_validator("targets")
    @classmethod
    def _targets_reach_the_training(cls, v: str, info: ValidationInfo) -> str:
        if v == "labels" and info.data.get("strategy") is not None:
            refuse_label_targets([info.data["strategy"]])
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


#: answers a batch of images under an output policy, in process, as the API would: (victim probabilities, answer)
PolicyAnswers = Callable[[str, torch.Tensor], tuple[np.ndarray, Answer]]


@dataclass
class DefenseCost:
    """What an output policy costs the defender (AdvFT §3's utility and KL; :meth:`Evaluator.defense_cost`)."""

    utility: float  # top-1 accuracy of the API's labels on the test split
    agreement: float  # fraction of test images whose API label is the undefended victim's
    kl_test: float  # mean KL(victim posterior ‖ answer) on the test split, nats
    kl_train: float | None  # the same on training images (None when the evaluator has none)


def answer_kl(probs: np.ndarray, answer: Answer) -> float:
    """Mean KL(victim posterior ‖ answer), the answer's scores floored at :data:`KL_FLOOR` and renormalized (a
    label-only answer is a one-hot: its KL measures the information withheld)."""
    p = np.maximum(np.asarray(probs, dtype=np.float64), 1e-12)
    if answer.scores is not None:
        q = np.asarray(answer.scores, dtype=np.float64)
    else:
        q = np.eye(p.shape[1])[np.asarray(answer.labels)]
    q = np.maximum(q, KL_FLOOR)
    q /= q.sum(axis=1, keepdims=True)
    return max(float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))), 0.0)


@dataclass
class Evaluator:
    """The benchmark's judge: the victim's unmetered top-1 and its labeled test split (never given to attacks).

    With ``policy_answers`` (how the API answers under a policy, in process) it also judges the defender's side,
    :meth:`defense_cost`; ``train_images`` add KL_train."""

    victim_labels: Callable[[torch.Tensor], torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    victim_pred: torch.Tensor | None = None
    policy_answers: PolicyAnswers | None = None
    train_images: torch.Tensor | None = None
    _cost: dict[str, DefenseCost] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.victim_pred is None:
            self.victim_pred = self.victim_labels(self.images)

    def utility(self, policy: str) -> float | None:
        """Top-1 accuracy of the labels the API returns under ``policy`` on the test split; ``None`` without
        ``policy_answers``."""
        cost = self.defense_cost(policy)
        return None if cost is None else cost.utility

    def know_cost(self, policy: str, cost: DefenseCost) -> None:
        """Take ``policy``'s cost as measured elsewhere (a sweep measures it once, in the driver)."""
        self._cost[policy] = cost

    def defense_cost(self, policy: str) -> DefenseCost | None:
        """What ``policy`` costs the defender, cached per policy (``None`` without ``policy_answers``). Seeded and
        model-carrying policies answer as :class:`~distributed_me.oracle.LocalOracle` does by default: seed 0, the
        empty client stream, the victim's defense kits."""
        if self.policy_answers is None:
            return None
        if policy not in self._cost:
            probs, answer = self.policy_answers(policy, self.images)
            labels = np.asarray(answer.labels)
            kl_train = None
            if self.train_images is not None and len(self.train_images):
                kl_train = answer_kl(*self.policy_answers(policy, self.train_images[:KL_TRAIN_IMAGES]))
            self._cost[policy] = DefenseCost(utility=accuracy(labels, self.labels.numpy()),
                                             agreement=float(np.mean(labels == self.victim_pred.numpy())),
                                             kl_test=answer_kl(probs, answer), kl_train=kl_train)
        return self._cost[policy]

    def bent_answers(self, policy: str, images: torch.Tensor) -> dict[str, float] | None:
        """What ``policy`` does to the answers for ``images`` that are not the test split, e.g. an attacker's public
        pool: the fraction whose top-1 stays the victim's (``agreement``) and KL(victim posterior ‖ answer) (``kl``).
        A defense that acts on out-of-distribution queries (AM, CIP) shows here whether it takes the pool for OOD;
        ``None`` without ``policy_answers``."""
        if self.policy_answers is None:
            return None
        probs, answer = self.policy_answers(policy, images)
        return {"agreement": float(np.mean(np.asarray(answer.labels) == np.asarray(probs).argmax(axis=1))),
                "kl": answer_kl(probs, answer)}

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
    victim_agreement: float | None = None
    victim_kl: float | None = None
    victim_kl_train: float | None = None
    history: list[dict] = field(default_factory=list)
    spec: dict = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # the piracy model
    #: the cost model's projection of this run, ``projected_seconds_*`` / ``projected_raw_seconds_*`` per phase and
    #: total (:func:`distributed_me.cost.plan.projection_metrics`), beside the actual ``seconds_*``
    projected: dict[str, float] = field(default_factory=dict)
    #: what the API's per-key detectors concluded about the attacker's key, ``detection.DETECTOR.flagged`` (0/1) and
    #: ``detection.DETECTOR.queries`` (queries until the flag), when the victim was watched (a sweep's ``detectors``)
    detection: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The run's metrics under :data:`METRIC_NAMES` (a name whose value is unknown, e.g. the utility of a remote
        policy, is left out rather than faked)."""
        values: dict[str, Any] = {k: getattr(self, k) for k in SCORE_NAMES}
        values.update({f"seconds_{k}": v for k, v in self.seconds.items()})
        out = {k: float(values[k]) for k in METRIC_NAMES if values.get(k) is not None
               and not (isinstance(values[k], float) and math.isnan(values[k]))}
        return {**out, **{k: float(v) for k, v in self.projected.items()},
                **{k: float(v) for k, v in self.detection.items()}}

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

    bench = Workbench(make_model, spec.train_config(), oracle.info.input_shape, timer, spec.seed, progress,
                      targets=spec.targets)

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
        cost = evaluator.defense_cost(policy) if policy else None
    timer.seconds["train"] -= epoch_eval.seconds["eval"]  # counted in eval, not twice
    seconds = {**timer.seconds, "total": time.perf_counter() - t_start}
    return ExtractionResult(
        victim_accuracy=evaluator.victim_accuracy,
        victim_utility=None if cost is None else cost.utility,
        victim_agreement=None if cost is None else cost.agreement,
        victim_kl=None if cost is None else cost.kl_test,
        victim_kl_train=None if cost is None else cost.kl_train,
        queries_used=oracle.queries_used - used_before,
        budget=spec.budget,
        seconds=seconds,
        history=result.history,
        spec=spec.model_dump(),
        model=result.model,
        projected=dict(projected or {}),
        **scores,
    )
