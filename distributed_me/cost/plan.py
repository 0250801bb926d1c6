"""One extraction's work, priced: the projection ``dme attack`` prints, a sweep trial logs, and a plan sums.

:func:`extraction_work` lists what :func:`~distributed_me.extraction.run_extraction` will do, phase by phase as its
:class:`~distributed_me.attacks.Timer` measures them: the strategy's own work (:meth:`QueryStrategy.cost`: queries,
interim substitutes, selection, the final piracy model), the piracy model's construction, and the benchmark's scoring
(clean predictions on the test split, per epoch when the sweep evaluates every epoch, PGD for adversarial fidelity,
the victim on the PGD images, and the defense's cost). :func:`project` prices it; :func:`projection_metrics` names
the result the way MLflow and Tune record it, beside the actual ``seconds_*``.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..metrics import PGD_STEPS
from . import work
from .rates import Rates
from .work import CostJob, Net, Projection, Work


class AttackSpec(Protocol):
    """What the cost model reads of :class:`distributed_me.extraction.AttackSpec` (a protocol: the cost model sits
    below the extraction that uses it)."""

    strategy: str
    strategy_options: dict[str, Any]
    budget: int
    arch: str
    epochs: int
    batch_size: int
    adv_eval_samples: int | None

    def build_strategy(self) -> Any: ...

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any: ...

#: metric prefixes of a projection: ``projected_seconds_PHASE`` (corrected by recorded runs: what was promised) and
#: ``projected_raw_seconds_PHASE`` (the cost model alone: what corrections learn from)
PROJECTED, PROJECTED_RAW = "projected_seconds_", "projected_raw_seconds_"


def extraction_work(spec: AttackSpec, job: CostJob, test_size: int, *, eval_every_epoch: bool = False,
                    policy: str | None = None, prepared: bool = False) -> list[Work]:
    """Everything one extraction does, as sizes; see the module docstring. ``prepared``: the strategy's
    once-per-sweep preparation ran before (its products are options of the trial, not work of it)."""
    strategy = spec.build_strategy()
    if prepared and strategy.prepares():
        job = CostJob(**{**job.__dict__, "pool": None})  # nothing of the preparation is left to the trial
    items: list[Work] = [work.build(job.piracy, phase="train", what="build the piracy model"), *strategy.cost(job)]
    if eval_every_epoch:
        items.append(work.infer(job.piracy, test_size, passes=spec.epochs, phase="eval", what="per-epoch evaluation"))
    items.append(work.infer(job.piracy, test_size, phase="eval", what="clean evaluation"))
    adv = test_size if spec.adv_eval_samples is None else min(spec.adv_eval_samples, test_size)
    items += [work.grad(job.piracy, adv, PGD_STEPS, 256, what="PGD for adversarial fidelity"),
              work.infer(job.piracy, adv, phase="eval", what="piracy model on the PGD images")]
    if job.victim is not None:
        items.append(work.infer(job.victim, adv, phase="eval", what="victim on the PGD images"))
        if policy:
            items.append(work.infer(job.victim, test_size, phase="eval", what="the defense's cost (utility, KL)"))
    return items


def project(items: list[Work], rates: Rates) -> Projection:
    return Projection([(w, rates.seconds(w)) for w in items])


def cost_job(spec: AttackSpec, input_shape: tuple[int, int, int], num_classes: int, pool, victim: Net | None,
             query_batch: int = 256) -> CostJob:
    """The sizes of one extraction of ``spec`` against a victim of ``input_shape`` from ``pool``."""
    c, size, _ = input_shape
    return CostJob(budget=spec.budget, pool_size=len(pool) if pool is not None else spec.budget,
                   piracy=Net(spec.arch, size, c, num_classes), epochs=spec.epochs, batch_size=spec.batch_size,
                   victim=victim, query_batch=query_batch, pool=pool)


def projection_metrics(raw: Projection, corrected: Projection) -> dict[str, float]:
    """``projected_seconds_*`` and ``projected_raw_seconds_*`` for every phase and the total."""
    out: dict[str, float] = {}
    for prefix, p in ((PROJECTED, corrected), (PROJECTED_RAW, raw)):
        out.update({f"{prefix}{k}": v for k, v in p.phases.items()})
        out[f"{prefix}total"] = p.total
    return out


def describe(p: Projection, title: str, top: int = 6) -> str:
    """A few lines for a console: the total, the phases, and the biggest items."""
    lines = [f"{title}: {work.human(p.total)} projected"]
    lines.append("  phases: " + ", ".join(f"{k} {work.human(v)}" for k, v in sorted(p.phases.items(),
                                                                                   key=lambda kv: -kv[1])))
    for w, s in sorted(p.items, key=lambda ws: -ws[1])[:top]:
        if s >= 0.05 * p.total:
            size = f" ({w.samples} images x {w.passes})" if w.samples else ""
            lines.append(f"  {work.human(s):>9}  {w.phase:<9} {w.what}{' ' + str(w.net) if w.net else ''}{size}")
    return "\n".join(lines)


def smaller_attack(spec: AttackSpec) -> tuple[AttackSpec, str]:
    """The ``cpu-small``-style version of ``spec`` and the flags that ask for it: the strategy's own small options
    (:attr:`QueryStrategy.cpu_small_options`), the CNN32 piracy model, at most 10 epochs."""
    strategy = spec.build_strategy()
    small = {**spec.strategy_options, **strategy.cpu_small_options}
    changes = {"strategy_options": small, "arch": "cnn32" if spec.arch != "tiny_cnn" else spec.arch,
               "epochs": min(spec.epochs, 10)}
    flags = [f"--strategy-option {k}={v}" for k, v in strategy.cpu_small_options.items()
             if spec.strategy_options.get(k) != v]
    flags += [f"--{k} {changes[k]}" for k in ("arch", "epochs") if getattr(spec, k) != changes[k]]
    return spec.model_copy(update=changes), " ".join(flags)
