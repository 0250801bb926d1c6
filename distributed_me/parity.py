"""Paper parity as data: the values a paper reports for the table a sweep reproduces, and ours compared with them.

A sweep that reproduces a paper's table carries that table in a top-level ``paper:`` section of its YAML, typed here
(:class:`PaperTable`), validated with the rest of the sweep spec and stored with the sweep's parent run in MLflow, so
``dme report`` compares from MLflow alone. The shipped tables:

- ``sweeps/mebench-optimizers.yaml``: MEBench (paper 004, "Model Extraction Attacks Revisited", §3.3.1 Table 3),
  attack fidelity of the piracy model trained with Lion / AdamW / Adam / SGD.
- ``sweeps/swifttheft-vs-baselines.yaml``: SwiftTheft (paper 003, §IV.3 Fig. 3 with its values stated in the text,
  Tables 2 and 4), agreement (= our ``fidelity``) of SwiftTheft, ActiveThief and Copycat CNN at equal query budgets.

**Cells.** A :class:`PaperCell` is one number of the paper: ``where`` names the sweep factors that identify it (e.g.
``{optimizer: lion, budget: 10000}``), ``metric`` one of our result metrics, ``value`` in ``unit`` (``percent`` values
are divided by 100 before they meet our fractions), ``tolerance`` in the same unit. Our value for the cell is the mean
of ``metric`` over every result row whose factors equal all of ``where`` (factors the paper does not pin, such as the
seed, are averaged over); the difference is ``ours - paper`` in the cell's unit, and the cell is ``ok`` when
``|difference| <= tolerance``, ``outside`` otherwise, and ``missing`` when no row matches (e.g. a laptop preset that
runs other budgets) — missing is reported, never an error.

**Orderings.** Beyond the values, a paper makes ordering claims ("SGD lags behind the others", "SwiftTheft outperforms
all baselines"); these usually transfer to our smaller setting when the absolute numbers do not. An :class:`Ordering`
names one factor (``optimizer``): the cells whose ``where`` holds that factor are grouped by metric and by all their
other ``where`` entries, so each group compares the factor's levels with everything else fixed (the optimizers at
one budget). Within a group every pair of cells is judged on its own:

- the paper orders the pair when its two values differ by more than ``tie`` (in the table's unit); a pair within
  ``tie`` is a "comparable" claim of the paper and is not counted (any order of ours is consistent with it);
- the pair is compared when both cells have our value; it is *concordant* when ours differ strictly in the same
  direction (an exact tie of ours is not concordant).

A group *holds* when it has at least one compared pair and all of them are concordant (``None`` when nothing could be
compared). Overall agreement is the fraction of concordant pairs over all compared pairs of all groups — Kendall's
concordance restricted to the pairs the paper orders (1.0: the paper's ordering is reproduced everywhere). Pairs
rather than whole rankings because a paper's ranking is only a partial order (ties within noise), and one swapped
pair then costs one pair, not the whole group.

Pure code: no Ray, MLflow or pandas (this module is imported by sweep-spec validation); result rows are mappings
(``DataFrame.to_dict("records")`` or anything with ``to_dict``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .extraction import FACTORS, METRIC_NAMES

log = logging.getLogger(__name__)


Unit = Literal["fraction", "percent", "seconds", "count"]
#: how many of the unit make one of our native unit (fractions for scores, seconds for times, a count for queries)
SCALE: dict[str, float] = {"fraction": 1.0, "percent": 100.0, "seconds": 1.0, "count": 1.0}


def units_for(metric: str) -> tuple[str, ...]:
    """The units a paper value of ``metric`` may be given in."""
    if metric.startswith("seconds_"):
        return ("seconds",)
    if metric == "queries_used":
        return ("count",)
    return ("fraction", "percent")


def _norm(v: Any) -> Any:
    """A factor value in one comparable form: YAML values, MLflow params (strings) and pandas cells (floats, NaN)
    alike. Numbers become floats, booleans and their spellings ``"true"``/``"false"``, null/None/NaN ``None``."""
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return None if math.isnan(f) else f
    s = str(v).strip()
    low = s.lower()
    if low in ("", "none", "null", "nan"):
        return None
    if low in ("true", "false"):
        return low
    try:
        return float(s)
    except ValueError:
        return s


def matches(where: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
    """Whether a result row (or a grid combination) has every factor value of ``where``."""
    return all(_norm(row.get(k)) == _norm(v) for k, v in where.items())


def where_label(where: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """``"budget=10000, optimizer=lion"``: a cell's factors in FACTORS order."""
    skip = set(skip)
    return ", ".join(f"{k}={where[k]}" for k in FACTORS if k in where and k not in skip)


def _one_of(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    """A validator's check: ``value`` is one of ``allowed``, else the error names both."""
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")
    return value


class _Strict(BaseModel):
    """extra="forbid", with a message that lists the allowed fields."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(f"unknown field {', '.join(map(repr, unknown))} in {cls.__name__}; allowed: "
                                 f"{', '.join(cls.model_fields)}")
        return data


class PaperCell(_Strict):
    """One value the paper reports, and which of our results it is compared with."""

    where: dict[str, Any] = Field(description="sweep factor -> value that identifies the cell, e.g. "
                                              "{optimizer: lion, budget: 10000}; unpinned factors are averaged")
    metric: str = Field(description="one of our result metrics, e.g. fidelity")
    value: float = Field(description="the paper's value, in `unit`")
    unit: Unit = Field(description="unit of value and tolerance (the table's unit unless given)")
    tolerance: float = Field(ge=0, description="|ours - paper| within this counts as reproduced, in `unit` (the "
                                                "table's tolerance unless given)")
    source: str = Field("", description="the paper's table and row of this value")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _one_of("metric", v, METRIC_NAMES)

    @field_validator("where")
    @classmethod
    def _where(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = [k for k in v if k not in FACTORS]
        if unknown:
            raise ValueError(f"unknown factor {', '.join(map(repr, unknown))}; allowed: {', '.join(FACTORS)}")
        bad = {k: x for k, x in v.items() if not (x is None or isinstance(x, (str, int, float, bool)))}
        if bad:
            raise ValueError(f"factor values must be single values (one grid point), got {bad}")
        return v

    @model_validator(mode="after")
    def _unit_fits_metric(self) -> PaperCell:
        allowed = units_for(self.metric)
        if self.unit not in allowed:
            raise ValueError(f"unit {self.unit!r} does not fit metric {self.metric!r}; allowed: {', '.join(allowed)}")
        top = {"fraction": 1.0, "percent": 100.0}.get(self.unit, math.inf)
        if not 0 <= self.value <= top:
            raise ValueError(f"value {self.value} is outside [0, {top:g}] for unit {self.unit!r} (a percentage "
                             f"given as a fraction, or the other way round?)")
        return self

    def paper_native(self) -> float:
        """The paper's value in our native unit (a fraction for scores)."""
        return self.value / SCALE[self.unit]


class Ordering(_Strict):
    """An ordering claim: the cells that differ only in ``factor`` rank the same in ours as in the paper."""

    factor: str = Field(description="the factor whose levels are ranked, e.g. optimizer")
    tie: float = Field(0.0, ge=0, description="paper values this close (in the table's unit) are 'comparable': "
                                              "the pair is not counted")
    note: str = ""

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: str) -> str:
        return _one_of("factor", v, FACTORS)


class PaperTable(_Strict):
    """The paper's reported values for the table a sweep reproduces; see the module docstring for the comparison."""

    source: str = Field(description='the paper and table, e.g. "paper 004 (MEBench) Table 3"')
    note: str = Field("", description="how the paper's setting maps to the sweep, and the tolerance chosen")
    unit: Unit = Field(description="the cells' unit unless a cell gives its own; also the unit of ordering ties")
    tolerance: float = Field(ge=0, description="the cells' tolerance unless a cell gives its own, in `unit`")
    cells: list[PaperCell] = Field(min_length=1)
    orderings: list[Ordering] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _cell_defaults(cls, data: Any) -> Any:
        """Cells without ``unit`` / ``tolerance`` take the table's (filled in before the cells validate)."""
        if isinstance(data, dict) and isinstance(data.get("cells"), list):
            defaults = {k: data[k] for k in ("unit", "tolerance") if k in data}
            data = {**data, "cells": [{**defaults, **c} if isinstance(c, dict) else c for c in data["cells"]]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PaperTable:
        seen: dict[tuple, int] = {}
        for i, c in enumerate(self.cells):
            key = (c.metric, tuple(sorted((k, _norm(v)) for k, v in c.where.items())))
            if key in seen:
                raise ValueError(f"cells {seen[key]} and {i} are the same cell ({c.metric} at "
                                 f"{where_label(c.where) or 'every row'}); give each (metric, where) once")
            seen[key] = i
        for o in self.orderings:
            if not any(len(g) > 1 for g in _groups(self.cells, o.factor).values()):
                raise ValueError(f"ordering over {o.factor!r}: no two cells of one metric differ only in "
                                 f"{o.factor!r}, so there is nothing to rank")
        return self

    def unmatched(self, grid: Iterable[Mapping[str, Any]]) -> list[PaperCell]:
        """The cells no grid point (one dict of factors per trial, ``SweepSpec.grid()``) matches."""
        grid = list(grid)
        return [c for c in self.cells if not any(matches(c.where, g) for g in grid)]


def _groups(cells: list[PaperCell], factor: str) -> dict[tuple, list[int]]:
    """Indices of the cells that hold ``factor``, keyed by metric and their other ``where`` entries."""
    out: dict[tuple, list[int]] = {}
    for i, c in enumerate(cells):
        if factor in c.where:
            rest = tuple(sorted((k, _norm(v)) for k, v in c.where.items() if k != factor))
            out.setdefault((c.metric, rest), []).append(i)
    return out


# ---------------------------------------------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class CellResult:
    """One paper cell next to ours. ``ours``/``ours_std`` are in the cell's unit (NaN when missing)."""

    cell: PaperCell
    n: int
    ours: float
    ours_std: float

    @property
    def label(self) -> str:
        return where_label(self.cell.where) or "all rows"

    @property
    def missing(self) -> bool:
        return self.n == 0

    @property
    def diff(self) -> float:
        """ours - paper, in the cell's unit."""
        return self.ours - self.cell.value

    @property
    def within(self) -> bool | None:
        return None if self.missing else abs(self.diff) <= self.cell.tolerance + 1e-12

    @property
    def status(self) -> str:
        return "missing" if self.missing else "ok" if self.within else "outside"

    def record(self, factors: Iterable[str] | None = None) -> dict[str, Any]:
        """One CSV row; ``factors``: the factor columns to write (default: this cell's)."""
        c = self.cell
        factors = [k for k in FACTORS if k in c.where] if factors is None else factors
        return {"metric": c.metric, "where": self.label, **{k: c.where.get(k) for k in factors},
                "unit": c.unit, "paper": c.value, "ours": self.ours, "diff": self.diff, "tolerance": c.tolerance,
                "status": self.status, "ours_std": self.ours_std, "trials": self.n, "source": c.source}


@dataclass(frozen=True)
class PairResult:
    """Two cells of a group: ``paper``/``ours`` are +1 (a above b), -1 (below) or 0 (tied); ``ours`` is ``None``
    when a cell is missing."""

    a: str
    b: str
    paper: int
    ours: int | None

    @property
    def counted(self) -> bool:
        return self.paper != 0 and self.ours is not None

    @property
    def concordant(self) -> bool | None:
        return (self.ours == self.paper) if self.counted else None


@dataclass(frozen=True)
class GroupResult:
    """One ordering group: the levels of ``factor`` at fixed values of the other factors (``fixed``)."""

    factor: str
    metric: str
    fixed: dict[str, Any]
    cells: list[CellResult]
    pairs: list[PairResult]
    tie: float  # in our native unit

    @property
    def compared(self) -> int:
        return sum(p.counted for p in self.pairs)

    @property
    def concordant(self) -> int:
        return sum(bool(p.concordant) for p in self.pairs)

    @property
    def holds(self) -> bool | None:
        return None if self.compared == 0 else self.concordant == self.compared

    @property
    def label(self) -> str:
        return f"{self.metric} by {self.factor}" + (f" at {where_label(self.fixed)}" if self.fixed else "")

    def paper_ranking(self) -> str:
        """``"lion ≈ adamw ≈ adam > sgd"``: the paper's values, highest first, ``≈`` within ``tie``."""
        pts = sorted(((r.cell.paper_native(), str(r.cell.where[self.factor])) for r in self.cells), reverse=True)
        return _ranking(pts, self.tie, "≈")

    def our_ranking(self) -> str:
        """Our values, highest first (``=`` only for exactly equal means); missing levels listed after."""
        pts = sorted(((r.ours / SCALE[r.cell.unit], str(r.cell.where[self.factor])) for r in self.cells
                      if not r.missing), reverse=True)
        gone = [str(r.cell.where[self.factor]) for r in self.cells if r.missing]
        return _ranking(pts, 0.0, "=") + (f" (missing: {', '.join(gone)})" if gone else "")

    def record(self) -> dict[str, Any]:
        return {"group": self.label, "metric": self.metric, "factor": self.factor, "fixed": where_label(self.fixed),
                "paper_ranking": self.paper_ranking(), "our_ranking": self.our_ranking(),
                "pairs_ordered_by_paper": sum(p.paper != 0 for p in self.pairs), "pairs_compared": self.compared,
                "pairs_concordant": self.concordant,
                "holds": {True: "yes", False: "no", None: "n/a"}[self.holds]}


def _ranking(pts: list[tuple[float, str]], tie: float, same: str) -> str:
    if not pts:
        return "-"
    out = pts[0][1]
    for (hi, _), (lo, name) in itertools.pairwise(pts):
        out += f" {same if hi - lo <= tie + 1e-12 else '>'} {name}"
    return out


@dataclass(frozen=True)
class ParityResult:
    table: PaperTable
    cells: list[CellResult]
    groups: list[GroupResult] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return sum(g.compared for g in self.groups)

    @property
    def concordant(self) -> int:
        return sum(g.concordant for g in self.groups)

    @property
    def agreement(self) -> float | None:
        """Fraction of concordant pairs among the compared pairs the paper orders (``None``: none compared)."""
        return self.concordant / self.compared if self.compared else None

    @property
    def ordering_holds(self) -> bool | None:
        """Whether every compared pair is concordant (``None``: nothing could be compared)."""
        return None if self.compared == 0 else self.concordant == self.compared

    def summary(self) -> str:
        """One line: cells within tolerance, and the ordering verdict."""
        n = {s: sum(r.status == s for r in self.cells) for s in ("ok", "outside", "missing")}
        line = (f"{n['ok']} of {len(self.cells)} cells within tolerance ({n['outside']} outside, "
                f"{n['missing']} missing)")
        if self.table.orderings:
            verdict = {True: "holds", False: "does NOT hold", None: "could not be checked"}[self.ordering_holds]
            line += (f"; the paper's ordering {verdict}: {self.concordant} of {self.compared} pairs concordant"
                     + (f" ({self.agreement:.0%})" if self.agreement is not None else ""))
        return line

    def cell_records(self) -> list[dict[str, Any]]:
        """One row per cell, with a column for every factor any cell pins (empty where a cell does not)."""
        factors = [k for k in FACTORS if any(k in r.cell.where for r in self.cells)]
        return [r.record(factors) for r in self.cells]

    def group_records(self) -> list[dict[str, Any]]:
        return [g.record() for g in self.groups]


def _rows(rows: Any) -> list[Mapping[str, Any]]:
    return rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def compare_cell(cell: PaperCell, rows: list[Mapping[str, Any]]) -> CellResult:
    vals = [x for r in rows if matches(cell.where, r) and (x := _number(r.get(cell.metric))) is not None]
    if not vals:
        return CellResult(cell, 0, math.nan, math.nan)
    a = np.asarray(vals) * SCALE[cell.unit]
    return CellResult(cell, len(vals), float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def _sign(x: float, tie: float = 0.0) -> int:
    return 0 if abs(x) <= tie + 1e-12 else (1 if x > 0 else -1)


def compare(table: PaperTable, rows: Any) -> ParityResult:
    """Our results (``rows``: one mapping per trial with factor and metric columns, or a DataFrame) beside the paper's
    table: one :class:`CellResult` per cell, one :class:`GroupResult` per ordering group."""
    rows = _rows(rows)
    cells = [compare_cell(c, rows) for c in table.cells]
    tie_scale = SCALE[table.unit]
    groups = []
    for o in table.orderings:
        for (metric, _), idx in _groups(table.cells, o.factor).items():
            if len(idx) < 2:
                continue
            members = [cells[i] for i in idx]
            pairs = []
            for a, b in itertools.combinations(members, 2):
                paper = _sign(a.cell.paper_native() - b.cell.paper_native(), o.tie / tie_scale)
                ours = None if a.missing or b.missing else _sign(a.ours / SCALE[a.cell.unit] -
                                                                 b.ours / SCALE[b.cell.unit])
                pairs.append(PairResult(str(a.cell.where[o.factor]), str(b.cell.where[o.factor]), paper, ours))
            fixed = {k: v for k, v in members[0].cell.where.items() if k != o.factor}
            groups.append(GroupResult(o.factor, metric, fixed, members, pairs, o.tie / tie_scale))
    result = ParityResult(table, cells, groups)
    log.info("paper parity (%s): %s", table.source, result.summary())
    return result
