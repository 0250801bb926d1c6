"""The Oracle: the API boundary between an attack and a victim (MEBench's QueryAPI, paper 004 §2.3).

An attack holds an :class:`Oracle` and nothing else of the victim: it sends a batch of images and gets back exactly what
an MLaaS API would return under its output policy (full probabilities, top-k, or a label). The oracle counts every image
it answers against the budget and refuses — answering nothing — a batch that would exceed it.

Implementations: :class:`LocalOracle` (in process, here), and in ``serving/`` a Serve-handle oracle and an HTTP
oracle, all drop-in for each other.

Images are sent as float32 NCHW in [0, 1] (or uint8 NHWC, converted here), the victim's own input shape.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from .answer import Answer, AnswerKind
from .data.base import to_tensor
from .defenses import PolicyChain, bind_kits, parse_policy
from .errors import BudgetExhausted, DmeError
from .train import probs_from_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OracleInfo:
    """Public metadata a client can read from the API: never weights or file paths."""

    name: str
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    returns: AnswerKind
    policy: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["input_dtype"] = "float32 in [0, 1] (NCHW) or uint8 (NHWC)"
        return d


@runtime_checkable
class Oracle(Protocol):
    """What every oracle offers. ``budget`` is ``None`` for an unmetered oracle."""

    info: OracleInfo

    @property
    def queries_used(self) -> int: ...

    @property
    def budget(self) -> int | None: ...

    def query(self, images: np.ndarray | torch.Tensor) -> Answer: ...


def validate_batch(images: np.ndarray | torch.Tensor, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert a query batch to float NCHW in [0, 1] and check it is one the API can take (shape, finite values)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4:
            raise DmeError(f"uint8 queries must be NHWC with 4 dimensions, got shape {images.shape}")
    x = to_tensor(images)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise DmeError(
            f"query batch has shape {tuple(x.shape)} but this victim takes (N, {', '.join(map(str, input_shape))}) "
            f"float32 in [0, 1] (or uint8 NHWC); resize with data.adapt_images"
        )
    if x.shape[0] == 0:
        raise DmeError("empty query batch: send at least one image")
    if not torch.isfinite(x).all():
        raise DmeError("query batch contains NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise DmeError(f"float query images must lie in [0, 1] (got values in [{x.min():.3g}, {x.max():.3g}]); "
                       "send pixels divided by 255, or uint8 NHWC")
    return x


class Meter:
    """Thread-safe query accounting: grants a whole batch or none of it."""

    def __init__(self, budget: int | None):
        if budget is not None and budget < 0:
            raise DmeError(f"budget must be >= 0, got {budget}")
        self.budget, self.used = budget, 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> None:
        with self._lock:
            if self.budget is not None and self.used + n > self.budget:
                raise BudgetExhausted(n, self.budget - self.used, self.budget)
            self.used += n

    def release(self, n: int) -> None:
        """Give back a reservation whose batch could not be answered (nothing answered is ever charged)."""
        with self._lock:
            self.used -= n

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used


class LocalOracle:
    """An in-process oracle over a victim model, its output policy and a budget.

    ``victim`` is anything with ``predict_probs(x: Tensor) -> Tensor`` plus ``class_names`` and ``input_shape``
    (a :class:`~distributed_me.victims.Victim`). The attack never receives the victim itself.

    ``watermarks``: where a watermarking policy (DAWN) records what it marked, a
    :class:`~distributed_me.defenses.dawn.FolderSink` root (default ``$DME_HOME/watermarks/NAME``; ``False``: marks
    are made, nothing is recorded).
    """

    def __init__(
        self,
        victim,
        policy: PolicyChain | str | None = None,
        budget: int | None = None,
        name: str = "victim",
        seed: int = 0,
        stream: str = "",
        watermarks: str | Path | Literal[False] | None = None,
    ):
        self._victim = victim
        self._policy = bind_kits(parse_policy(policy, seed=seed), victim)  # a missing kit fails here, not mid-attack
        if self._policy.needs_sink and watermarks is not False:
            from .defenses.dawn import FolderSink
            from .tracking import dme_home

            self._policy.bind_sink(FolderSink(watermarks or dme_home() / "watermarks" / name))
        self._stream = stream  # the client's name in randomized policies' draws (Serve uses the key's fingerprint)
        self._meter = Meter(budget)
        self.info = OracleInfo(
            name=name,
            class_names=list(victim.class_names),
            input_shape=tuple(victim.input_shape),
            returns=self._policy.returns,
            policy=self._policy.describe(),
        )

    @property
    def queries_used(self) -> int:
        return self._meter.used

    @property
    def budget(self) -> int | None:
        return self._meter.budget

    @property
    def remaining(self) -> int | None:
        return self._meter.remaining

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        x = validate_batch(images, self.info.input_shape)
        self._meter.reserve(len(x))
        try:
            if hasattr(self._victim, "predict_logits"):
                logits = self._victim.predict_logits(x).cpu()
                probs, raw = probs_from_logits(logits).numpy(), logits.numpy()
            else:
                probs, raw = self._victim.predict_probs(x).cpu().numpy(), None
            return self._policy(probs, queries=x.numpy(), stream=self._stream, logits=raw)
        except BaseException:
            self._meter.release(len(x))
            raise


def query_in_batches(oracle: Oracle, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> Answer:
    """Send ``images`` in API-sized batches and join the answers."""
    parts = [oracle.query(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return Answer.concat(parts)


class RecordingOracle:
    """Wraps any oracle and keeps every batch sent through it, in order: an audit trail of exactly what an attack
    asked the victim (the budget contract: only selected samples, never more than the budget)."""

    def __init__(self, inner: Oracle):
        self.inner, self.info = inner, inner.info
        self.sent: list[torch.Tensor] = []

    @property
    def queries_used(self) -> int:
        return self.inner.queries_used

    @property
    def budget(self) -> int | None:
        return self.inner.budget

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        self.sent.append(to_tensor(images).clone())
        return self.inner.query(images)

    def images(self) -> torch.Tensor:
        """All images sent so far, concatenated (float NCHW)."""
        return torch.cat(self.sent) if self.sent else torch.empty(0)
