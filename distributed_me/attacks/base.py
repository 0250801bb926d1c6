"""The query-strategy base class: MEBench's GenerateQuery / QueryAPI / UpdateModel loop (paper 004 §2.3, Fig. 2).

A strategy is a small typed object (its options are pydantic fields, validated at construction), in the manner of
ART's ``ExtractionAttack.extract`` and torchattacks' ``Attack``. Its life has three steps, called alike for every
strategy by ``dme attack``, by a sweep and by a unit test:

1. :meth:`QueryStrategy.check` — cheap, before anything runs: capabilities (a strategy that needs probabilities against
   a label-only API), budget against pool and API key. Never trains or reads a whole pool.
2. :meth:`QueryStrategy.prepare` — optional, once per sweep and pool, before any trial: work every trial of the
   strategy shares (reference models, feature passes over the pool, clusters). It never queries a victim. It returns
   option overrides that the trials then receive (e.g. ``{"features": PATH}``), so a trial reads the product instead
   of recomputing it. The heavy pass over a pool goes through :attr:`PrepareContext.map_pool`, which is a plain loop
   here and a Ray Data actor pool in a sweep (the core knows no Ray).
3. :meth:`QueryStrategy.extract` — sees only an :class:`~distributed_me.oracle.Oracle`, an unlabeled
   :class:`~distributed_me.data.Pool` and a :class:`Workbench` that trains the piracy model; never the victim.

Timing is split into the phases of :data:`PHASES` for every strategy, so that strategies compare on cost as well as
on fidelity. For a strategy that makes its own queries (Jacobian augmentation, adversarial examples, a generator),
``selection`` is the *generation* time: the cost of a synthetic query is visible beside the time it waits for the API.

Queries that are not pool images go through the same :class:`~distributed_me.oracle.Oracle` as any other, so through
the same budget, the same validation (float NCHW in [0, 1] at the victim's input shape) and, behind Serve, the same
query log. :class:`QueryBook` is how such a strategy pays: it cuts a batch at the end of the budget, so a budget that
ends mid-batch ends the attack cleanly with every paid answer kept, and it records where each query came from
(:data:`GENERATED` or a pool index) for :attr:`Extraction.queried`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..answer import Answer
from ..cost import work
from ..cost.work import CostJob, Work
from ..data.base import Pool, to_tensor
from ..errors import DmeError
from ..oracle import Oracle, query_in_batches
from ..registry import Registry
from ..train import TrainConfig, fit

log = logging.getLogger(__name__)

ATTACKS: Registry[type["QueryStrategy"]] = Registry("attack strategy")


def register_attack(cls: type["QueryStrategy"]) -> type["QueryStrategy"]:
    ATTACKS.register(cls.name)(cls)
    return cls


#: the phases every extraction is timed in: ``setup`` (building the strategy and its inputs, e.g. reading prepared
#: features), ``selection`` (choosing or making queries), ``query`` (waiting for the API), ``train`` (the piracy
#: model, interim substitutes included) and ``eval`` (the benchmark's scoring)
PHASES: tuple[str, ...] = ("setup", "selection", "query", "train", "eval")

#: the source of a query that is not a pool image as-is (synthetic, adversarial, generated), in
#: :attr:`Extraction.queried`
GENERATED = -1


class Timer:
    """Accumulates wall time per phase; every phase of ``phases`` (default :data:`PHASES`) is present, zero when
    unused, and others are added as they are timed."""

    PHASES = PHASES

    def __init__(self, phases: tuple[str, ...] = PHASES) -> None:
        self.seconds: dict[str, float] = {p: 0.0 for p in phases}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class Workbench:
    """What a strategy may use besides the oracle and pool: the piracy model factory and trainer, input shape, timer.

    ``train(images, answers)`` (re)trains the piracy model on all query-response pairs so far; iterative strategies
    call it every round. ``on_epoch`` lets a sweep report per-epoch metrics.
    """

    make_model: Callable[[], nn.Module]
    train_cfg: TrainConfig
    input_shape: tuple[int, int, int]
    timer: Timer = field(default_factory=Timer)
    seed: int = 0
    progress: bool = False
    on_epoch: Callable[[int, dict], Any] | None = None
    query_batch_size: int = 256
    model: nn.Module | None = None
    history: list[dict] = field(default_factory=list)
    #: ``"scores"``: soft targets when the answers carry scores; ``"labels"``: always their top-1 labels (the
    #: attacker's choice :attr:`~distributed_me.extraction.AttackSpec.targets`; strategies need not know)
    targets: str = "scores"

    def load(self, pool: Pool, idx: np.ndarray) -> torch.Tensor:
        """Pool images at ``idx`` as float NCHW at the victim's input shape."""
        c, h, _ = self.input_shape
        return to_tensor(pool.get(idx, size=h, channels=c))

    def query(self, oracle: Oracle, images: torch.Tensor) -> Answer:
        with self.timer.phase("query"):
            return query_in_batches(oracle, images, self.query_batch_size)

    def train(self, images: torch.Tensor, answer: Answer, fresh: bool = True, epochs: int | None = None,
              interim: bool = False, fit_fn: Callable[..., list[dict]] | None = None) -> nn.Module:
        """Train the piracy model on (images, answers): soft labels if the answer has scores, else labels (and always
        labels when the attacker chose ``targets="labels"``).

        ``interim=True`` marks an intermediate substitute of an iterative strategy (ActiveThief rounds, KnockoffNets'
        loss reward): it is not reported through ``on_epoch``, whose rows (Tune results, MLflow steps) describe the
        final piracy model only, and does not replace ``history``. ``fit_fn`` replaces the supervised trainer
        (:func:`~distributed_me.train.fit`, whose signature it keeps) for a strategy that learns differently from
        the same pairs, e.g. MixMatch with its unlabeled pool; the pairs still pass through here, so what the piracy
        model is trained on stays auditable."""
        with self.timer.phase("train"):
            if fresh or self.model is None:
                torch.manual_seed(self.seed)
                self.model = self.make_model()
            soft = answer.soft_targets() if self.targets == "scores" else None
            targets = torch.from_numpy(soft) if soft is not None else torch.from_numpy(answer.labels)
            cfg = self.train_cfg if epochs is None else TrainConfig(**{**self.train_cfg.__dict__, "epochs": epochs})
            history = (fit_fn or fit)(self.model, images, targets, cfg, on_epoch=None if interim else self.on_epoch,
                                      progress=self.progress and not interim, desc="piracy")
            if not interim:
                self.history = history
            return self.model


@dataclass
class Extraction:
    """What a strategy returns: the trained piracy model and, per query in the order sent, its source: the pool
    index of a pool image sent as-is, or :data:`GENERATED` for an image the strategy made (for audits and tests:
    ``len(queried)`` is the number of queries paid)."""

    model: nn.Module
    queried: np.ndarray
    history: list[dict]


class QueryBook:
    """Pays for an attack's queries against its budget and keeps what came back.

    :meth:`ask` sends at most what is left of ``budget`` (a batch that would overrun it is cut, and the cut rows are
    never sent), returns the answer for the rows sent, and records each row's source (a pool index or
    :data:`GENERATED`). With ``keep=True`` it also keeps every (image, answer) pair, for strategies that train on all
    pairs so far; a streaming strategy (a generator's student) keeps none. Once :attr:`left` is 0 a strategy stops
    asking and trains on what it has: the "budget ends mid-batch" case of a synthetic attack."""

    def __init__(self, oracle: Oracle, budget: int, bench: Workbench, keep: bool = True) -> None:
        self.oracle, self.budget, self.bench, self.keep = oracle, budget, bench, keep
        self._sources: list[np.ndarray] = []
        self._images: list[torch.Tensor] = []
        self._answers: list[Answer] = []
        self.used = 0

    @property
    def left(self) -> int:
        return self.budget - self.used

    def ask(self, images: torch.Tensor, sources: np.ndarray | None = None) -> Answer | None:
        """Query ``images`` (float NCHW in [0, 1]) cut to the budget left; ``None`` when nothing is left."""
        n = min(len(images), self.left)
        if n <= 0:
            return None
        images = images[:n].detach().cpu()
        answer = self.bench.query(self.oracle, images)
        self.used += n
        src = np.full(n, GENERATED, dtype=np.int64) if sources is None else np.asarray(sources[:n], dtype=np.int64)
        self._sources.append(src)
        if self.keep:
            self._images.append(images)
            self._answers.append(answer)
        return answer

    @property
    def queried(self) -> np.ndarray:
        return np.concatenate(self._sources) if self._sources else np.empty(0, dtype=np.int64)

    def pairs(self) -> tuple[torch.Tensor, Answer]:
        """Every kept (image, answer) pair so far, in query order."""
        if not self._images:
            raise DmeError("no query was answered: the budget is too small for this strategy's first batch")
        return torch.cat(self._images), Answer.concat(self._answers)


class Featurizer(Protocol):
    """Maps uint8 NHWC pool images to float32 feature rows (N, D); built once per worker by a picklable factory."""

    def features(self, images: np.ndarray) -> np.ndarray: ...


def map_pool_in_process(factory: Callable[[], Featurizer], pool: Pool, out: Path) -> dict[str, Any]:
    """The plain single-process pass over a whole pool (the default of :class:`PrepareContext`)."""
    from ..data.features import features_loop, write_features

    t0 = time.perf_counter()
    feats = features_loop(factory(), pool)
    write_features(out, pool.sample_ids(), feats)
    secs = time.perf_counter() - t0
    return {"path": str(out), "images": len(pool), "seconds": secs, "images_per_s": len(pool) / max(secs, 1e-9)}


@dataclass
class PrepareContext:
    """What :meth:`QueryStrategy.prepare` may use besides the pool.

    ``map_pool(factory, pool, out)`` maps every pool sample through ``factory()`` and writes the features (Parquet,
    keyed by sample id) to ``out``; a sweep passes a Ray Data actor pool here. ``record(metrics, tags)`` keeps
    figures worth seeing (e.g. the pass's images per second) on the sweep's MLflow parent run."""

    progress: bool = False
    map_pool: Callable[[Callable[[], Featurizer], Pool, Path], dict[str, Any]] = map_pool_in_process
    record: Callable[[dict[str, float], dict[str, str]], None] = lambda metrics, tags: None


class QueryStrategy(BaseModel):
    """Base class: subclasses declare options as fields and implement :meth:`extract` (and :meth:`prepare` when
    trials share a once-per-sweep product)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    #: answer kinds the strategy can learn from; ("probabilities",) for methods that need scores
    accepts: ClassVar[tuple[str, ...]] = ("probabilities", "topk", "label")
    #: options that may hold a file path: a sweep makes relative ones absolute before trials, which run elsewhere
    path_options: ClassVar[tuple[str, ...]] = ()
    #: options that make the strategy run in about a second on tiny data (a few hundred 16 px images, a budget of
    #: tens): the registry-wide contract tests run every registered strategy with them, so a new strategy is tested
    #: by those tests as soon as it is registered
    smoke_options: ClassVar[dict[str, Any]] = {}
    #: options that make the strategy's own heavy work fit a laptop CPU (what a ``cpu-small`` preset uses): the
    #: alternative a refused projection proposes (:mod:`distributed_me.cost.guard`)
    cpu_small_options: ClassVar[dict[str, Any]] = {}
    #: whether every query is a distinct pool image (so the budget cannot exceed the pool). A strategy that makes its
    #: own queries (synthetic, data-free) sets False: its budget is bounded by the API key only
    draws_from_pool: ClassVar[bool] = True
    #: the budget at which the registry-wide learning test (``tests/test_extraction.py``) expects the strategy, trained
    #: through :meth:`Workbench.train`, to agree with the embedded victim at twice chance; ``None`` for a strategy
    #: that trains a student by streaming (data-free generators), which its own test file checks instead
    learning_test_budget: ClassVar[int | None] = 200
    #: whether the piracy model is trained on the collected (query, answer) pairs through :meth:`Workbench.train`, so
    #: the attacker's ``targets`` choice (scores or labels) applies. A data-free strategy whose student learns from the
    #: scores while it queries sets False
    trains_on_answers: ClassVar[bool] = True

    @classmethod
    def create(cls, name: str, options: dict | None = None) -> "QueryStrategy":
        klass = ATTACKS.get(name)
        try:
            return klass(**(options or {}))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise DmeError(f"attack {name!r} option {loc!r} = {err.get('input')!r}: {err['msg']} "
                           f"(options: {', '.join(klass.model_fields) or 'none'})") from None

    def check(self, oracle: Oracle, pool: Pool, budget: int) -> None:
        """Refuse before any query: capability mismatch, impossible budget."""
        if oracle.info.returns not in self.accepts:
            raise DmeError(f"attack {self.name!r} needs an API that returns {' or '.join(self.accepts)}, but this "
                           f"victim's output policy returns {oracle.info.returns!r}")
        if budget <= 0:
            raise DmeError(f"budget must be a positive number of queries, got {budget}")
        if self.draws_from_pool and budget > len(pool):
            raise DmeError(f"budget {budget} is larger than the pool {pool.name!r} ({len(pool)} images); lower "
                           "--budget or use a larger pool")
        remaining = None if oracle.budget is None else oracle.budget - oracle.queries_used
        if remaining is not None and budget > remaining:
            raise DmeError(f"budget {budget} exceeds what the API key has left ({remaining} of {oracle.budget})")

    def prepare(self, pool: Pool, ctx: PrepareContext) -> dict[str, Any]:
        """Once per sweep (and pool), before any trial; see the module docstring. Returns the option overrides every
        trial of this strategy receives; the base strategy has nothing to prepare and returns ``{}``."""
        return {}

    def cost(self, job: CostJob) -> list[Work]:
        """The work :meth:`extract` will do, as sizes (:mod:`distributed_me.cost.work`), for a plan that prices it
        before anything runs. Cheap: no training, no pass over the pool. The default is a one-shot strategy: every
        query at once, then one training of the piracy model; a strategy that does more says so here."""
        return [work.query(job.victim, job.budget, job.query_batch),
                work.train(job.piracy, job.budget, job.epochs, job.batch_size)]

    def prepare_cost(self, pool: Pool) -> list[Work]:
        """The work :meth:`prepare` will do on ``pool`` (empty when its products are cached already)."""
        return []

    @classmethod
    def prepares(cls) -> bool:
        """Whether the strategy declares a preparation step (overrides :meth:`prepare`)."""
        return cls.prepare is not QueryStrategy.prepare

    def extract(self, oracle: Oracle, pool: Pool, budget: int, bench: Workbench) -> Extraction:
        raise NotImplementedError
