"""What a piece of work is, before it is priced: a few primitives every step of the project reduces to.

A step (a trial's extraction, a strategy's once-per-sweep preparation, a victim's training) is described as a list of
:class:`Work` items, each one of a handful of kinds whose cost depends only on their size:

- ``train``: ``passes`` epochs of the trainer (:func:`~distributed_me.train.fit`: augmentation, forward, backward,
  optimizer step) over ``samples`` images of a :class:`Net`, in batches of ``batch_size``;
- ``grad``: ``passes`` forward+backward passes w.r.t. the input over ``samples`` images (PGD, DeepFool);
- ``infer``: one forward pass over ``samples`` images (feature passes, substitute scoring, evaluation);
- ``query``: ``samples`` images answered by the victim (its forward pass, plus the API's per-request overhead);
- ``build``: constructing a :class:`Net` (weights init, the shape check);
- ``flops``: plain array arithmetic (distances, k-center, k-means), ``flops`` floating-point operations;
- ``seconds``: a fixed, known wall time.

A strategy describes its own work (:meth:`~distributed_me.attacks.QueryStrategy.cost`), so the cost model knows no
strategy by name; :class:`~distributed_me.cost.rates.Rates` turns work into seconds on a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["train", "grad", "infer", "query", "build", "flops", "seconds"]


@dataclass(frozen=True)
class Net:
    """A model as the cost model sees it: architecture and input shape (FLOPs and throughput depend on nothing else
    that matters here; the class count only changes the last layer)."""

    arch: str
    img_size: int
    in_chans: int = 3
    num_classes: int = 10

    def __str__(self) -> str:
        return f"{self.arch}@{self.img_size}px" + (f"/{self.num_classes} classes" if self.num_classes != 10 else "")


@dataclass(frozen=True)
class Work:
    """One priced unit of a step; see the module docstring for the kinds."""

    phase: str
    kind: Kind
    what: str
    net: Net | None = None
    samples: int = 0
    passes: int = 1
    batch_size: int = 64
    flops: float = 0.0
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        """Batches processed (every pass over ``samples`` in batches of ``batch_size``)."""
        return self.passes * math.ceil(self.samples / max(1, self.batch_size)) if self.samples else 0


# ---------------------------------------------------------------------------------------------------------- builders
def train(net: Net, samples: int, epochs: int, batch_size: int = 64, phase: str = "train",
          what: str = "piracy model") -> Work:
    return Work(phase, "train", what, net, int(samples), int(epochs), int(batch_size))


def grad(net: Net, samples: int, steps: int, batch_size: int = 256, phase: str = "eval",
         what: str = "PGD on the piracy model") -> Work:
    return Work(phase, "grad", what, net, int(samples), int(steps), int(batch_size))


def infer(net: Net, samples: int, passes: int = 1, batch_size: int = 512, phase: str = "selection",
          what: str = "forward pass") -> Work:
    return Work(phase, "infer", what, net, int(samples), int(passes), int(batch_size))


def query(victim: Net | None, samples: int, batch_size: int = 256, phase: str = "query",
          what: str = "victim queries") -> Work:
    return Work(phase, "query", what, victim, int(samples), 1, int(batch_size))


def build(net: Net, phase: str = "setup", what: str = "build the model") -> Work:
    return Work(phase, "build", what, net)


def flops(n: float, phase: str = "selection", what: str = "array arithmetic") -> Work:
    return Work(phase, "flops", what, flops=float(n))


def seconds(s: float, phase: str, what: str) -> Work:
    return Work(phase, "seconds", what, seconds=float(s))


@dataclass(frozen=True)
class CostJob:
    """The sizes one extraction's cost depends on, as a strategy's :meth:`cost` receives them.

    ``piracy`` is the attacker's model at the victim's input shape; ``victim`` the served model (``None`` when the
    victim is remote and unknown: its queries are then priced at the API's overhead only)."""

    budget: int
    pool_size: int
    piracy: Net
    epochs: int
    batch_size: int = 64
    victim: Net | None = None
    query_batch: int = 256
    pool: Any = None  # the Pool itself, for strategies whose work depends on it (image size, labels, caches)


@dataclass
class Projection:
    """Work priced: seconds per phase and the items behind them (for the plan's detail lines)."""

    items: list[tuple[Work, float]] = field(default_factory=list)

    @property
    def phases(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for w, s in self.items:
            out[w.phase] = out.get(w.phase, 0.0) + s
        return out

    @property
    def total(self) -> float:
        return sum(s for _, s in self.items)

    def scaled(self, factors: dict[str, float]) -> "Projection":
        """Each item times its phase's factor (a correction learned from recorded runs); others unchanged."""
        return Projection([(w, s * factors.get(w.phase, 1.0)) for w, s in self.items])


def human(seconds: float) -> str:
    """A duration a person reads at a glance: 45 s, 12 min, 3.4 h, 7.1 days."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
