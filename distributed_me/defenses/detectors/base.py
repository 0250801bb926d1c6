"""The detector contract: a typed, frozen parameter object and a mutable per-API-key state it updates.

A detector sees every request a client (an API key) makes: the images and the victim's *undefended* probabilities.
:meth:`Detector.observe` folds one request into the key's :class:`DetectorState`, query by query in order, and returns
a :class:`Verdict`. What to do with a flagged key (log it, degrade its answers, block it) is the serving layer's
choice, as is where the state lives; this module only promises that a state is

- bounded in memory, whatever the client sends (every detector documents its bound, :attr:`DetectorState.nbytes`
  measures it), and
- serializable without pickle: :meth:`DetectorState.to_bytes` writes an ``np.savez`` archive of plain arrays and
  :meth:`Detector.load_state` reads it back with ``allow_pickle=False``; the round trip is exact, so a restored key
  gets the same verdicts as one that never left memory.

Flags are sticky: once a key is flagged, every later verdict says so, with the query count and the reason of the
first flag. Spec strings follow the output policies' grammar (``"prada"``, ``"prada:0.85"``,
``"ood-rate:threshold=0.4:alpha=1e-3"``).
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ...errors import DmeError
from ...registry import Registry, parse_spec_item

log = logging.getLogger(__name__)

DETECTORS: Registry[type["Detector"]] = Registry("detector")

#: bumped when a state's archive layout changes; an archive of another version is refused, never misread
STATE_FORMAT = 1


def register_detector(cls: type["Detector"]) -> type["Detector"]:
    DETECTORS.register(cls.name)(cls)
    return cls


@dataclass(frozen=True)
class Verdict:
    """A detector's answer after one request of one key."""

    detector: str
    #: the key is flagged (sticky: stays True once raised)
    flagged: bool
    #: the detector's statistic (PRADA: Shapiro–Wilk W; ood-rate: binomial tail probability); NaN while not enough data
    score: float
    #: queries of this key the detector has seen, this request included
    queries_seen: int
    #: the 1-based query count at which the flag was first raised
    flagged_at: int | None
    #: one human-readable line
    reason: str


class Ring:
    """A bounded FIFO of numbers in a numpy array: capacity grows by doubling up to ``cap``, then the oldest entries
    are overwritten. ``values()`` is the content oldest first."""

    def __init__(self, cap: int, dtype: Any):
        self.cap, self.dtype = int(cap), np.dtype(dtype)
        self.buf = np.zeros(0, self.dtype)
        self.start = 0  # index of the oldest entry once the buffer is full and wrapping
        self.size = 0

    def push(self, values: np.ndarray) -> None:
        # requests are small batches: a loop keeps the wrap logic obvious
        for v in np.asarray(values, self.dtype).ravel()[-self.cap:]:
            if self.size < self.cap:
                if self.size == len(self.buf):
                    grown = np.zeros(min(self.cap, max(16, 2 * len(self.buf))), self.dtype)
                    grown[: self.size] = self.buf[: self.size]
                    self.buf = grown
                self.buf[self.size] = v
                self.size += 1
            else:
                self.buf[self.start] = v
                self.start = (self.start + 1) % self.cap

    def values(self) -> np.ndarray:
        if self.size < self.cap or self.start == 0:
            return self.buf[: self.size].copy()
        return np.concatenate([self.buf[self.start:], self.buf[: self.start]])

    @classmethod
    def of(cls, values: np.ndarray, cap: int, dtype: Any) -> Ring:
        ring = cls(cap, dtype)
        ring.push(values)
        return ring

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)


class DetectorState:
    """A key's mutable state. Subclasses hold their arrays and implement :meth:`_payload` / :meth:`_restore`; the
    bookkeeping every detector shares (queries seen, the sticky flag, the last score) lives here."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self.queries_seen = 0
        self.flagged_at: int | None = None
        self.flag_reason = ""
        self.score = math.nan

    # ------------------------------------------------------------ subclass hooks
    def _payload(self) -> dict[str, np.ndarray]:
        """The detector's own arrays, by name (no pickled objects: numbers and fixed-width strings only)."""
        raise NotImplementedError

    def _restore(self, arrays: dict[str, np.ndarray], detector: Detector) -> None:
        """Rebuild from :meth:`_payload`'s arrays, trimmed to ``detector``'s bounds (which may be tighter than those of
        the detector that wrote them)."""
        raise NotImplementedError

    def _owned_nbytes(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    @property
    def flagged(self) -> bool:
        return self.flagged_at is not None

    def flag(self, reason: str, at: int | None = None) -> None:
        """Raise the flag at query ``at`` (default: the current one); a no-op when already flagged, so the first
        reason stays."""
        if self.flagged_at is None:
            self.flagged_at, self.flag_reason = self.queries_seen if at is None else at, reason
            log.info("%s flagged a client at query %d: %s", self.kind, self.flagged_at, reason)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the state (its arrays plus a small constant for the bookkeeping)."""
        return self._owned_nbytes() + 256 + len(self.flag_reason)

    def to_bytes(self) -> bytes:
        arrays = {
            "kind": np.array(self.kind),
            "format": np.array(STATE_FORMAT, np.int64),
            "queries_seen": np.array(self.queries_seen, np.int64),
            "flagged_at": np.array(-1 if self.flagged_at is None else self.flagged_at, np.int64),
            "flag_reason": np.array(self.flag_reason),
            "score": np.array(self.score, np.float64),
        }
        arrays.update({f"x_{k}": np.asarray(v) for k, v in self._payload().items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def _all_arrays(self) -> dict[str, np.ndarray]:
        flagged_at = -1 if self.flagged_at is None else self.flagged_at
        return {"queries_seen": np.array(self.queries_seen), "flagged_at": np.array(flagged_at),
                "flag_reason": np.array(self.flag_reason), "score": np.array(self.score), **self._payload()}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        a, b = self._all_arrays(), other._all_arrays()
        return a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
            and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)

    __hash__ = None  # type: ignore[assignment]  # mutable


class Detector(BaseModel):
    """Base class: typed parameters (pydantic fields with the paper's defaults) and the per-key algorithm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    state_class: ClassVar[type[DetectorState]]

    def new_state(self) -> DetectorState:
        return self.state_class()

    def observe(self, state: DetectorState, images: np.ndarray, probs: np.ndarray) -> Verdict:
        """Fold one request of a key into ``state`` (in place) and return the key's verdict after it.

        ``images``: float32 NCHW in [0, 1], ``(N, C, H, W)``; ``probs``: the victim's undefended probabilities,
        ``(N, K)``. ``N == 0`` changes nothing.
        """
        if not isinstance(state, self.state_class):
            raise TypeError(f"{self.name} detector given a {type(state).__name__}, "
                            f"expected {self.state_class.__name__}")
        images, probs = np.asarray(images), np.asarray(probs)
        if probs.ndim != 2:
            raise ValueError(f"probs must be (N, K), got shape {probs.shape}")
        if images.ndim < 2 or len(images) != len(probs):
            raise ValueError(f"{len(images)} images of shape {images.shape[1:]} for {len(probs)} probability rows")
        if len(probs):
            self._observe(state, images, probs)
        return self.verdict(state)

    def _observe(self, state: Any, images: np.ndarray, probs: np.ndarray) -> None:
        raise NotImplementedError

    def _status(self, state: Any) -> str:
        """The reason line while the key is not flagged."""
        raise NotImplementedError

    def verdict(self, state: DetectorState) -> Verdict:
        reason = state.flag_reason if state.flagged else self._status(state)
        return Verdict(self.name, state.flagged, float(state.score), state.queries_seen, state.flagged_at, reason)

    def load_state(self, data: bytes) -> DetectorState:
        """The state :meth:`DetectorState.to_bytes` wrote, trimmed to this detector's bounds."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DmeError(f"{self.name} detector state is unreadable ({len(data)} bytes): {e}") from None
        kind = str(arrays.get("kind", np.array("?")))
        if kind != self.name:
            raise DmeError(f"detector state written by {kind!r} cannot be loaded by the {self.name!r} detector")
        fmt = int(arrays.get("format", np.array(-1)))
        if fmt != STATE_FORMAT:
            raise DmeError(f"{self.name} detector state has format {fmt}, this version reads format {STATE_FORMAT}")
        state = self.new_state()
        state.queries_seen = int(arrays["queries_seen"])
        flagged_at = int(arrays["flagged_at"])
        state.flagged_at = None if flagged_at < 0 else flagged_at
        state.flag_reason = str(arrays["flag_reason"])
        state.score = float(arrays["score"])
        state._restore({k[2:]: v for k, v in arrays.items() if k.startswith("x_")}, self)
        return state

    def spec(self) -> str:
        return self.name + "".join(f":{k}={v}" for k, v in self.model_dump().items())


def parse_detector(text: str | Detector) -> Detector:
    """``"prada"``, ``"prada:0.85"`` (the first parameter), ``"prada:delta=0.85:max_kept=500"`` → a validated
    detector. An unknown name raises :class:`~distributed_me.errors.UnknownNameError` listing the valid ones; a bad
    parameter a :class:`~distributed_me.errors.DmeError` naming the field, the value and the parameters."""
    if isinstance(text, Detector):
        return text
    return parse_spec_item(text, DETECTORS)


def parse_detectors(spec: str | list[str | Detector] | None) -> list[Detector]:
    """Several detectors, comma-separated or as a list (``"prada,ood-rate:threshold=0.4"``); ``None`` or ``""``:
    none."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [parse_detector(s) for s in items if not isinstance(s, str) or s.strip()]
