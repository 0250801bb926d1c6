"""How far off the cost model was, in ``dme report``: each trial's projection beside what it took. MLflow only.

A projection is only trusted if it is checked: a plan that promised an hour and took five refuses (or lets through)
the wrong sweeps. Every trial run records ``projected_seconds_PHASE`` (corrected by earlier runs: what the plan
promised) and ``projected_raw_seconds_PHASE`` (the cost model alone: what corrections learn from) beside its actual
``seconds_PHASE``; the parent run records the plan's sweep-level figures (``sweep_projected_*``, and
``prepare.STEP.projected_seconds`` per preparation step) beside ``sweep_seconds_*`` and ``prepare.STEP.seconds``.

Ratios are always actual / projected (2.0: the trial took twice what was promised). A trial's "worst" ratio is the one
furthest from 1 on a log scale, so a 5x underestimate and a 5x overestimate count alike. A sweep from before
projections were logged gets no section at all (:func:`projection_report` returns ``None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cost.plan import PROJECTED, PROJECTED_RAW
from ..cost.work import human
from ..extraction import PHASES

PLOT = "projection_vs_actual.png"
CSV = "projection.csv"
TOTAL, RAW_TOTAL, ACTUAL = f"{PROJECTED}total", f"{PROJECTED_RAW}total", "seconds_total"
#: sweep phases that run beside the others (the Serve deployment in the background): not part of the wall time
CONCURRENT = ("deploy_background",)
_KEYS = ("victim", "policy", "pool", "strategy", "budget", "arch", "optimizer", "seed")


@dataclass
class ProjectionReport:
    """Tables as numbers (seconds, ratios, shares); :meth:`markdown` and :meth:`text` format them."""

    strategies: pd.DataFrame  # per strategy and "all": trials, medians, worst ratio, share within ×2
    phases: pd.DataFrame  # per strategy and "all", per phase: sums projected / actual and their ratio
    sweep: pd.DataFrame  # the plan's steps: trials phase, total wall, preparations
    within2: float
    trials: int
    plot: Path
    csv: Path

    def headline(self) -> str:
        return f"{self.within2:.0%} of {self.trials} trials took within a factor of 2 of their projection"

    def markdown(self, plot_dir: str = "") -> str:
        """The section of ``report.md``; ``plot_dir`` is where the plot sits relative to it (``plots/`` in MLflow)."""
        return "\n".join([
            "## Projection vs reality", "",
            "Ratio = actual / projected (corrected projection; *raw* = the cost model alone). Worst: the trial "
            f"furthest from its projection. **{self.headline()}**. Per-trial figures in `{CSV}`.", "",
            _md(_show(self.strategies)), "", "### Per phase (sums over trials)", "", _md(_show(self.phases)), "",
            *(["### Sweep", "", _md(_show(self.sweep)), ""] if len(self.sweep) else []),
            f"![{Path(PLOT).stem}]({plot_dir}{PLOT})", ""])

    def text(self) -> str:
        """The console version: the per-strategy table and the sweep's steps."""
        lines = ["Projection vs reality (ratio = actual / projected; raw = the cost model alone):",
                 _show(self.strategies).to_string(index=False), self.headline() + "."]
        if len(self.sweep):
            lines += [_show(self.sweep).to_string(index=False)]
        return "\n".join(lines)


def _ratio(actual: Any, projected: Any) -> Any:
    """actual / projected where both are positive, else nan (no projection, or a phase not timed)."""
    a, p = np.asarray(actual, dtype=float), np.asarray(projected, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((a > 0) & (p > 0), a / p, np.nan)


def worst(ratios: pd.Series) -> float:
    """The ratio furthest from 1 on a log scale (0.2 and 5 are equally bad), or nan."""
    r = ratios.dropna()
    return float(r.iloc[int(np.argmax(np.abs(np.log(r.to_numpy()))))]) if len(r) else math.nan


def within(ratios: pd.Series, factor: float = 2.0) -> float:
    """Share of ratios in [1/factor, factor]."""
    r = ratios.dropna()
    return float(((r >= 1 / factor) & (r <= factor)).mean()) if len(r) else math.nan


def trial_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The trials that carry a projection, with ``ratio`` / ``raw_ratio`` of their totals; empty when none does."""
    if TOTAL not in df:
        return df.iloc[:0]
    t = df[df[TOTAL].notna()].copy()
    t["ratio"] = _ratio(t[ACTUAL], t[TOTAL])
    t["raw_ratio"] = _ratio(t[ACTUAL], t[RAW_TOTAL]) if RAW_TOTAL in t else np.nan
    return t


def phases_of(t: pd.DataFrame) -> list[str]:
    """The benchmark's phases, then any a strategy projected besides, then the total."""
    extra = sorted({c[len(PROJECTED):] for c in t if c.startswith(PROJECTED)} - {*PHASES, "total"})
    return [*PHASES, *extra, "total"]


def strategy_table(t: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, then all trials: medians of projected and actual totals, and of the ratios."""
    rows = []
    for name, g in [*t.groupby("strategy", dropna=False), ("all", t)]:
        rows.append({"strategy": str(name), "trials": len(g), "projected": g[TOTAL].median(),
                     "actual": g[ACTUAL].median(), "ratio": g["ratio"].median(), "worst ratio": worst(g["ratio"]),
                     "raw ratio": g["raw_ratio"].median(), "within ×2": within(g["ratio"])})
    return pd.DataFrame(rows)


def phase_table(t: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and phase: projected and actual seconds summed over trials (a phase missing from a projection
    was projected zero), and the ratio of the sums."""
    rows = []
    groups = list(t.groupby("strategy", dropna=False))
    for name, g in groups + ([("all", t)] if len(groups) > 1 else []):  # one strategy: "all" would repeat it
        for p in phases_of(t):
            proj = g[f"{PROJECTED}{p}"].fillna(0).sum() if f"{PROJECTED}{p}" in g else 0.0
            act = g[f"seconds_{p}"].sum(min_count=1) if f"seconds_{p}" in g else math.nan
            if proj > 0 or act > 0:  # a phase neither projected nor taken (a strategy without selection) is noise
                rows.append({"strategy": str(name), "phase": p, "projected": proj, "actual": act,
                             "ratio": float(_ratio(act, proj))})
    return pd.DataFrame(rows)


def actual_wall(parent: Any) -> float:
    """The sweep's wall time: the parent run's duration once it ended, else the sum of its timed phases (nan when
    neither is recorded: a report published while the sweep still runs)."""
    info, m = parent.info, parent.data.metrics
    if getattr(info, "end_time", None) and getattr(info, "status", "FINISHED") != "RUNNING":
        return (info.end_time - info.start_time) / 1000
    parts = [v for k, v in m.items() if k.startswith("sweep_seconds_") and k[14:] not in CONCURRENT]
    return float(sum(parts)) if parts else math.nan


def sweep_table(parent: Any) -> pd.DataFrame:
    """The plan's sweep-level steps beside what they took: the trials phase, the whole sweep, each preparation."""
    m = parent.data.metrics
    nan = math.nan
    rows = [("trials phase", m.get("sweep_projected_seconds_trials", nan),
             m.get("sweep_projected_raw_seconds_trials", nan), m.get("sweep_seconds_trials", nan)),
            ("sweep wall", m.get("sweep_projected_seconds_total", nan), nan, actual_wall(parent))]
    steps = sorted({k.rsplit(".", 1)[0] for k in m if k.startswith("prepare.") and k.endswith(".seconds")})
    rows += [(f"{s.replace('.', ' ', 1)}", m.get(f"{s}.projected_seconds", nan),
              m.get(f"{s}.projected_raw_seconds", nan), m[f"{s}.seconds"]) for s in steps]
    out = pd.DataFrame(rows, columns=["step", "projected", "raw projected", "actual"])
    out = out[out[["projected", "actual"]].notna().any(axis=1)].reset_index(drop=True)
    out["ratio"] = _ratio(out["actual"], out["projected"])
    out["raw ratio"] = _ratio(out["actual"], out["raw projected"])
    return out


def plot_projected_vs_actual(groups: dict[str, tuple[Any, Any]], path: Path, title: str,
                             xlabel: str = "projected seconds (corrected)", legend_title: str | None = "strategy"
                             ) -> Path:
    """Log-log scatter of actual against projected seconds, one colour per group, with the y = x line and dashed
    ×2 / ÷2 lines (the issue's bar); also ``dme bench cost``'s plot (ours vs a FLOPs-only baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    vals: list[float] = []
    for name, (projected, actual) in groups.items():
        ax.scatter(projected, actual, label=str(name), alpha=0.8)
        vals += [float(v) for v in (*projected, *actual) if v > 0]
    lo, hi = (min(vals) / 3, max(vals) * 3) if vals else (0.1, 10.0)
    xs = np.array([lo, hi])
    ax.plot(xs, xs, color="k", lw=1, label="actual = projected")
    ax.plot(xs, 2 * xs, "k--", lw=0.8, label="×2 and ÷2")
    ax.plot(xs, xs / 2, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel=xlabel, ylabel="actual seconds",
           title=title)
    ax.legend(title=legend_title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(t: pd.DataFrame, share: float, path: Path) -> Path:
    ok = t[(t[TOTAL] > 0) & (t[ACTUAL] > 0)]
    groups = {str(name): (g[TOTAL].to_numpy(), g[ACTUAL].to_numpy()) for name, g in ok.groupby("strategy",
                                                                                                dropna=False)}
    return plot_projected_vs_actual(groups, path, f"projection vs actual: {share:.0%} of {len(t)} trials within ×2")


def projection_report(df: pd.DataFrame, parent: Any, out: Path) -> ProjectionReport | None:
    """The section for the trial rows ``df`` of the sweep whose parent run is ``parent``, writing ``projection.csv``
    and ``projection_vs_actual.png`` into ``out``; ``None`` (nothing written) when no trial has a projection."""
    t = trial_frame(df)
    if t.empty:
        return None
    cols = [k for k in ("run_id", *_KEYS) if k in t]
    for p in phases_of(t):
        cols += [c for c in (f"{PROJECTED}{p}", f"{PROJECTED_RAW}{p}", f"seconds_{p}") if c in t]
    t[[*cols, "ratio", "raw_ratio"]].to_csv(out / CSV, index=False, float_format="%.6g")
    share = within(t["ratio"])
    return ProjectionReport(strategy_table(t), phase_table(t), sweep_table(parent), share, len(t),
                            _plot(t, share, out / PLOT), out / CSV)


def _show(df: pd.DataFrame) -> pd.DataFrame:
    """Numbers as a reader wants them: durations in s/min/h, ratios to 2 decimals, shares in percent, nan as -."""
    def cell(col: str, v: Any) -> str:
        if isinstance(v, str) or col == "trials":
            return str(v)
        if v is None or math.isnan(v):
            return "-"
        return f"{v:.0%}" if col.startswith("within") else f"{v:.2f}" if "ratio" in col else _duration(v)
    return pd.DataFrame({c: [cell(c, v) for v in df[c]] for c in df.columns})


def _duration(s: float) -> str:
    """Like :func:`~distributed_me.cost.work.human` but with the digits a comparison needs (100 s and 150 s must
    not both read "2 min")."""
    if s < 90:
        return f"{s:.3g} s"
    return f"{s / 60:.1f} min" if s < 90 * 60 else f"{s / 3600:.2f} h" if s < 48 * 3600 else human(s)


def _md(df: pd.DataFrame) -> str:
    return "\n".join(["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns),
                      *["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]])
