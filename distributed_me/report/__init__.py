"""``dme report SWEEP``: a sweep's results read back from MLflow, as a Markdown report with PNG plots. MLflow only.

The rows are the sweep's FINISHED trial runs (tag ``dme.sweep``): their params are the factors, their metrics the
results. Plots compare what people compare: fidelity vs budget per attack, per optimizer and per piracy
architecture (mean over the other factors, one line each), and per output policy the defender's trade-off — the
victim's utility under the policy (accuracy of the labels the API returns) against the attacker's fidelity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import DmeError

log = logging.getLogger(__name__)

FACTOR_PARAMS = ("victim", "policy", "strategy", "budget", "arch", "optimizer", "lr", "pretrained", "augment", "epochs",
                 "seed")
METRICS = ("accuracy", "fidelity", "adversarial_fidelity", "queries_used", "victim_accuracy", "victim_utility",
           "seconds_total", "seconds_setup", "seconds_selection", "seconds_query", "seconds_train", "seconds_eval")
TABLE = ["victim", "policy", "strategy", "budget", "arch", "optimizer", "trials", "accuracy", "fidelity",
         "adversarial_fidelity", "seconds_total"]


@dataclass
class Report:
    frame: pd.DataFrame
    table: str
    markdown: Path
    plots: list[Path]


def sweep_runs(sweep: str, experiment: str | None = None) -> pd.DataFrame:
    """One row per FINISHED trial of the newest run of ``sweep``: factor params (typed) and final metrics."""
    from mlflow import MlflowClient

    from ..tracking import tracking_uri

    c = MlflowClient(tracking_uri())
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    parents = c.search_runs(ids, f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = 'sweep'",
                            order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    runs = c.search_runs(ids, f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and "
                              "attributes.status = 'FINISHED'", max_results=50000) if parents else []
    if not runs:
        raise DmeError(f"no finished trials of sweep {sweep!r} in the MLflow store {tracking_uri()}; run "
                       f"`dme sweep` first, or set MLFLOW_TRACKING_URI to the store it used")
    rows = []
    for r in runs:
        row = {k: r.data.params.get(k) for k in FACTOR_PARAMS}
        row.update({k: r.data.metrics.get(k) for k in METRICS})
        row["run_id"] = r.info.run_id
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in ("budget", "epochs", "seed"):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df.sort_values(list(FACTOR_PARAMS[:6])).reset_index(drop=True)


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
    df = sweep_runs(sweep, experiment)
    out = out or Path("reports") / sweep
    out.mkdir(parents=True, exist_ok=True)
    plots = [_lines(df, "strategy", out / "fidelity_vs_budget_by_attack.png", "fidelity vs budget, per attack"),
             _lines(df, "optimizer", out / "fidelity_vs_budget_by_optimizer.png", "fidelity vs budget, per optimizer"),
             _lines(df, "arch", out / "fidelity_vs_budget_by_arch.png", "fidelity vs budget, per piracy architecture"),
             _tradeoff(df, out / "policy_utility_vs_fidelity.png")]
    table = summary(df)
    df.to_csv(out / "trials.csv", index=False)
    md = out / "report.md"
    md.write_text("\n".join([
        f"# Sweep `{sweep}`", "",
        f"{len(df)} finished trials, read from MLflow. Means over seeds; full rows in `trials.csv`.", "",
        _markdown_table(table), "",
        *[f"![{p.stem}]({p.name})" for p in plots], ""]))
    return Report(df, _text_table(table), md, plots)
