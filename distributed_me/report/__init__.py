"""``dme report SWEEP``: a sweep's results read back from MLflow, as a Markdown report with PNG plots. MLflow only.

The rows are the sweep's FINISHED trial runs (tag ``dme.sweep``): their params are the factors, their metrics the
results. Plots compare what people compare: fidelity vs budget per attack, per optimizer and per piracy
architecture (mean over the other factors, one line each), and per output policy the defender's trade-off — the
victim's utility under the policy (accuracy of the labels the API returns) against the attacker's fidelity.

A sweep whose spec has a ``paper:`` section (the values of the paper table it reproduces) also gets a paper-parity
section: ours beside the paper's per cell, the difference, whether the paper's ordering holds, as ``parity.csv`` and
``parity.png`` (see :mod:`distributed_me.report.parity`; the spec is read back from the sweep's parent run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import DmeError
from ..extraction import FACTORS, METRIC_NAMES
from ..parity import ParityResult, compare
from ..tracking import tracking_uri
from .parity import paper_table, parity_markdown, parity_text, write_parity

log = logging.getLogger(__name__)

TABLE = ["victim", "policy", "strategy", "budget", "arch", "optimizer", "trials", "accuracy", "fidelity",
         "adversarial_fidelity", "seconds_total"]


@dataclass
class Report:
    frame: pd.DataFrame
    table: str
    markdown: Path
    plots: list[Path]
    parity: ParityResult | None = None


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def _experiment_ids(c: Any, experiment: str | None) -> list[str]:
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    return [e.experiment_id for e in exps if e is not None]


def sweep_parent(sweep: str, experiment: str | None = None) -> Any:
    """The parent run of the newest run of ``sweep`` (an ``mlflow.entities.Run``), or ``None``."""
    c = _client()
    ids = _experiment_ids(c, experiment)
    parents = c.search_runs(ids, f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = 'sweep'",
                            order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    return parents[0] if parents else None


def sweep_runs(sweep: str, experiment: str | None = None, parent: Any = None) -> pd.DataFrame:
    """One row per FINISHED trial of the newest run of ``sweep`` (or of ``parent``, a run from
    :func:`sweep_parent`): factor params (typed) and final metrics."""
    c = _client()
    parent = parent or sweep_parent(sweep, experiment)
    runs = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                         "attributes.status = 'FINISHED'", max_results=50000) if parent else []
    if not runs:
        raise DmeError(f"no finished trials of sweep {sweep!r} in the MLflow store {tracking_uri()}; run "
                       f"`dme sweep` first, or set MLFLOW_TRACKING_URI to the store it used")
    rows = []
    for r in runs:
        row = {k: r.data.params.get(k) for k in FACTORS}
        row.update({k: r.data.metrics.get(k) for k in METRIC_NAMES})
        row["run_id"] = r.info.run_id
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in ("budget", "epochs", "seed"):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df.sort_values(list(FACTORS[:6])).reset_index(drop=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of every other factor combination."""
    keys = ["victim", "policy", "strategy", "budget", "arch", "optimizer"]
    g = df.groupby(keys, dropna=False)
    out = g[["accuracy", "fidelity", "adversarial_fidelity", "seconds_total"]].mean()
    out["trials"] = g.size()
    return out.reset_index()[TABLE]


def _text_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _lines(df: pd.DataFrame, by: str, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in df.groupby(by):
        m = g.groupby("budget")["fidelity"].agg(["mean", "std", "count"]).reset_index()
        ax.errorbar(m["budget"], m["mean"], yerr=m["std"].fillna(0), marker="o", capsize=3, label=str(name))
    ax.set(xlabel="query budget", ylabel="fidelity (agreement with victim)", title=title, ylim=(0, 1))
    ax.legend(title=by, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tradeoff(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    m = df.groupby("policy")[["victim_utility", "fidelity"]].mean().reset_index()
    ax.scatter(m["victim_utility"], m["fidelity"])
    for _, r in m.iterrows():
        ax.annotate(str(r["policy"]), (r["victim_utility"], r["fidelity"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel="victim utility (accuracy of the API's labels)", ylabel="attacker fidelity (mean over trials)",
           title="output policies: utility vs. extraction", xlim=(0, 1.05), ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep: str, out: Path | None = None, experiment: str | None = None) -> Report:
    parent = sweep_parent(sweep, experiment)
    df = sweep_runs(sweep, experiment, parent)
    out = out or Path("reports") / sweep
    out.mkdir(parents=True, exist_ok=True)
    plots = [_lines(df, "strategy", out / "fidelity_vs_budget_by_attack.png", "fidelity vs budget, per attack"),
             _lines(df, "optimizer", out / "fidelity_vs_budget_by_optimizer.png", "fidelity vs budget, per optimizer"),
             _lines(df, "arch", out / "fidelity_vs_budget_by_arch.png", "fidelity vs budget, per piracy architecture"),
             _tradeoff(df, out / "policy_utility_vs_fidelity.png")]
    table = summary(df)
    df.to_csv(out / "trials.csv", index=False)
    paper = paper_table(_client(), parent.info.run_id)
    parity = compare(paper, df) if paper is not None else None
    parity_plot = write_parity(parity, out) if parity is not None else None
    md = out / "report.md"
    md.write_text("\n".join([
        f"# Sweep `{sweep}`", "",
        f"{len(df)} finished trials, read from MLflow. Means over seeds; full rows in `trials.csv`.", "",
        _markdown_table(table), "",
        *[f"![{p.stem}]({p.name})" for p in plots], "",
        *([parity_markdown(parity, parity_plot)] if parity is not None else [])]))
    text = _text_table(table) + (f"\n\n{parity_text(parity)}" if parity is not None else "")
    return Report(df, text, md, plots + ([parity_plot] if parity_plot else []), parity)
