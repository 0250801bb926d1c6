"""``dme report SWEEP``: a sweep's results read back from MLflow, as a Markdown report with PNG plots. MLflow only.

The rows are the sweep's FINISHED trial runs (tag ``dme.sweep``): their params are the factors, their metrics the
results. Plots compare what people compare: fidelity vs budget per attack, per optimizer and per piracy
architecture (mean over the other factors, one line each), and per output policy the defender's trade-off — the
victim's utility under the policy (accuracy of the labels the API returns) against the attacker's fidelity.

:func:`publish_report` puts the same report where the sweep is browsed: under ``report/`` of the sweep's MLflow
parent run (``report.html`` rendered with its plots inline, ``report.md``, ``results.csv``, ``summary.json`` as an
MLflow table, ``plots/*.png``), with the summary table as the parent run's description.

A sweep whose spec has a ``paper:`` section (the values of the paper table it reproduces) also gets a paper-parity
section: ours beside the paper's per cell, the difference, whether the paper's ordering holds, as ``parity.csv`` and
``parity.png`` (see :mod:`distributed_me.report.parity`; the spec is read back from the sweep's parent run).

A sweep whose trials logged the cost model's projections also gets a "Projection vs reality" section: how far each
trial's actual time was from what the plan promised, per strategy and phase, and the sweep's own steps, as
``projection.csv`` and ``projection_vs_actual.png`` (see :mod:`distributed_me.report.projection`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DmeError
from ..extraction import FACTORS
from ..parity import ParityResult, compare
from ..tracking import NOTE_TAG, tracking_uri
from .detection import benign_rates, detection_curves, detection_table, detectors_in
from .html import report_html
from .parity import paper_table, parity_markdown, parity_text, stored_spec, write_parity
from .projection import PLOT as PROJECTION_PLOT
from .projection import ProjectionReport, projection_report
from .runs import finished_trials, trial_row
from .versions import version_table

log = logging.getLogger(__name__)

#: what the summary table groups by (means over seeds and the remaining factors): the factors people compare, each
#: only if the sweep grid has it (``pool`` joins when :data:`FACTORS` has it)
GROUP_BY = [c for c in ("victim", "policy", "pool", "strategy", "budget", "arch", "optimizer") if c in FACTORS]
#: the time split of each attack: ``seconds_selection`` is choosing or *generating* its queries (Jacobian steps,
#: adversarial examples, a generator and its gradient estimates), so what a synthetic query costs shows beside the time
#: spent waiting for the API (``seconds_query``) and training the piracy model (``seconds_train``)
TIME_SPLIT = ["seconds_selection", "seconds_query", "seconds_train", "seconds_total"]
#: the attacker's drop: what a defense takes from the attack, paired with the undefended API at the same victim, pool,
#: strategy, budget, piracy choices and seed (:func:`with_drops`)
DROPS = ["fidelity_drop", "accuracy_drop"]
TABLE = [*GROUP_BY, "trials", "victim_utility", "victim_agreement", "victim_kl", "victim_kl_train", "accuracy",
         "fidelity", "adversarial_fidelity", *DROPS, *TIME_SPLIT]
#: the output policy every drop is measured against
UNDEFENDED = "probabilities"
#: where :func:`publish_report` puts the report in the parent run's artifacts
ARTIFACT_DIR = "report"
ROWS_FILE = "results.csv"


@dataclass
class Report:
    frame: pd.DataFrame
    table: str
    markdown: Path
    plots: list[Path]
    parity: ParityResult | None = None
    projection: ProjectionReport | None = None
    detection: pd.DataFrame | None = None
    versions: pd.DataFrame | None = None


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
    runs = finished_trials(c, parent.info.experiment_id, parent.info.run_id) if parent else []
    if not runs:
        raise DmeError(f"no finished trials of sweep {sweep!r} in the MLflow store {tracking_uri()}; run "
                       f"`dme sweep` first, or set MLFLOW_TRACKING_URI to the store it used")
    rows = [trial_row(r) for r in runs]
    df = pd.DataFrame(rows)
    for k in ("budget", "epochs", "seed"):
        df[k] = pd.to_numeric(df[k], errors="coerce")
    return df.sort_values(list(FACTORS[:6])).reset_index(drop=True)


def with_drops(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus :data:`DROPS`: per trial, the undefended trial's fidelity (accuracy) minus this one's, the trials
    paired on every factor but the policy (so on the seed too); NaN where the grid has no undefended twin."""
    if "policy" not in df or not (df["policy"] == UNDEFENDED).any():
        return df
    keys = [k for k in FACTORS if k in df and k != "policy" and df[k].notna().any()]
    base = df[df["policy"] == UNDEFENDED][[*keys, "fidelity", "accuracy"]]
    base = base.groupby(keys, dropna=False).mean().reset_index()  # retried trials: one twin per key
    out = df.merge(base, on=keys, how="left", suffixes=("", "_undefended"))
    out["fidelity_drop"] = out["fidelity_undefended"] - out["fidelity"]
    out["accuracy_drop"] = out["accuracy_undefended"] - out["accuracy"]
    return out.drop(columns=["fidelity_undefended", "accuracy_undefended"])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of every other factor combination. A factor no trial recorded (a sweep from before the factor
    existed) is left out rather than shown as a column of ``nan``."""
    keys = [k for k in GROUP_BY if k in df and df[k].notna().any()]
    g = df.groupby(keys, dropna=False)
    means = [c for c in TABLE if c in df and c not in GROUP_BY and c != "trials"]  # older runs lack victim_kl
    out = g[means].mean()
    out["trials"] = g.size()
    out = out.reset_index()
    return out[[c for c in TABLE if c in out and (c in keys or c not in GROUP_BY)]]


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
    if df["budget"].max() >= 20 * df["budget"].min():  # budgets over orders of magnitude (data-free attacks)
        ax.set_xscale("log")
    ax.legend(title=by, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff_points(df: pd.DataFrame) -> pd.DataFrame:
    """The trade-off curve's points: per budget, attack and output policy, the defender's costs and the attacker's
    fidelity, averaged over seeds only. Budgets are never pooled: a grid that runs some policies at a budget others
    skip (``exclude:``) would otherwise rank those policies by budget instead of by defense."""
    costs = [c for c in ("victim_utility", "victim_kl") if c in df and df[c].notna().any()]
    return df.groupby(["budget", "strategy", "policy"])[[*costs, "fidelity"]].mean().reset_index()


def _tradeoff(df: pd.DataFrame, path: Path) -> Path:
    """Victim utility (and KL) against attacker fidelity, one point per output policy and attack (means over seeds),
    one colour per attack, one row of panels per budget: the defenses' trade-off curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = tradeoff_points(df)
    # the defender's two costs: top-1 utility, and (when recorded) how far the answers are from the posterior (KL)
    costs = [c for c in ("victim_utility", "victim_kl") if c in m]
    budgets = sorted(m["budget"].unique())
    colour = {s: f"C{i}" for i, s in enumerate(sorted(m["strategy"].unique()))}  # one colour per attack, every panel
    fig, axes = plt.subplots(len(budgets), len(costs), figsize=(6 * len(costs), 4.5 * len(budgets)), squeeze=False)
    labels = {"victim_utility": "victim utility (accuracy of the API's labels)",
              "victim_kl": "KL(victim posterior ‖ API answer), nats"}
    for row, budget in zip(axes, budgets):
        at = m[m["budget"] == budget]
        for ax, cost in zip(row, costs):
            for strategy, g in at.groupby("strategy"):
                g = g.sort_values(cost)
                ax.plot(g[cost], g["fidelity"], marker="o", label=str(strategy), alpha=0.85, color=colour[strategy])
                for _, r in g.iterrows():
                    ax.annotate(str(r["policy"]), (r[cost], r["fidelity"]), fontsize=7, xytext=(4, 3),
                                textcoords="offset points")
            ax.set(xlabel=labels[cost], ylabel="attacker fidelity (mean over seeds)", ylim=(0, 1.05),
                   title=f"defenses at {int(budget):,} queries: {cost.removeprefix('victim_')} vs. extraction")
            if cost == "victim_utility":
                lo, hi = float(m[cost].min()), float(m[cost].max())
                ax.set_xlim(max(0.0, lo - 0.03), min(1.0, hi + 0.03))
            ax.legend(title="attack", fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_split(df: pd.DataFrame, path: Path) -> Path:
    """Stacked bars of where each attack's time goes, per strategy and budget (means over trials): generating or
    selecting queries, waiting for the API, training the piracy model, and the benchmark's scoring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {"seconds_selection": "selection / generation", "seconds_query": "query (API)",
             "seconds_train": "train (piracy model)", "seconds_eval": "eval (benchmark)"}
    cols = [c for c in parts if c in df]
    m = df.groupby(["strategy", "budget"])[cols].mean().reset_index()
    labels = [f"{r.strategy} @ {int(r.budget)}" for r in m.itertuples()]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(m) + 1.5))
    left = np.zeros(len(m))
    for c in cols:
        ax.barh(labels, m[c].fillna(0), left=left, label=parts[c])
        left += m[c].fillna(0).to_numpy()
    ax.set(xlabel="seconds per trial (mean)", title="time split per attack")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(sweep: str, df: pd.DataFrame, table: pd.DataFrame, plots: list[Path], parity: ParityResult | None,
              parity_plot: Path | None, rows_file: str, plot_dir: str = "",
              projection: ProjectionReport | None = None, detection: pd.DataFrame | None = None,
              versions: pd.DataFrame | None = None) -> str:
    """The report as Markdown; ``plot_dir`` is where the images sit relative to it (``plots/`` in MLflow).
    ``plots`` are the summary's plots; the parity and projection plots sit in their own sections."""
    parity_md = parity_markdown(parity, parity_plot) if parity is not None else ""
    if parity_plot is not None and plot_dir:
        parity_md = parity_md.replace(f"]({parity_plot.name})", f"]({plot_dir}{parity_plot.name})")
    return "\n".join([
        f"# Sweep `{sweep}`", "",
        f"{len(df)} finished trials, read from MLflow. Means over seeds; full rows in `{rows_file}`.", "",
        _markdown_table(table), "",
        *[f"![{p.stem}]({plot_dir}{p.name})" for p in plots], "",
        *(["## Detectors", "", "Share of each attack's trials the per-key detectors flagged, the median queries until "
           "the flag, and each detector's false-positive rate on benign clients of the same deployment "
           "(`detection.csv`).", "", _markdown_table(detection), ""] if detection is not None else []),
        *(["## Victim versions", "", "Per registered version of a victim (MEBench Tables 15-16): the API's test "
           "accuracy and mean top-1 confidence, the attack's fidelity and accuracy against it, and against the "
           "previous version the change of each, the share of test images with the same predicted class and the mean "
           "absolute change of the top-1 confidence (`versions.csv`).", "", _markdown_table(versions), ""]
          if versions is not None else []),
        *([parity_md] if parity is not None else []),
        *([projection.markdown(plot_dir)] if projection is not None else [])])


def write_report(sweep: str, out: Path | None = None, experiment: str | None = None, parent: Any = None) -> Report:
    """Build the report of ``sweep`` (its newest parent run, or ``parent``) into ``out`` (default ``reports/SWEEP``).
    Raises :class:`DmeError` when no trial of the sweep finished."""
    parent = parent or sweep_parent(sweep, experiment)
    df = with_drops(sweep_runs(sweep, experiment, parent))
    out = out or Path("reports") / sweep
    out.mkdir(parents=True, exist_ok=True)
    plots = [_lines(df, "strategy", out / "fidelity_vs_budget_by_attack.png", "fidelity vs budget, per attack"),
             _lines(df, "optimizer", out / "fidelity_vs_budget_by_optimizer.png", "fidelity vs budget, per optimizer"),
             _lines(df, "arch", out / "fidelity_vs_budget_by_arch.png", "fidelity vs budget, per piracy architecture"),
             _tradeoff(df, out / "policy_utility_vs_fidelity.png")]
    if "victim" in df and df["victim"].nunique() > 1:  # one line per attack and victim (e.g. digits vs CIFAR-10)
        plots.append(_lines(df.assign(victim_strategy=df["victim"].astype(str) + " · " + df["strategy"]),
                            "victim_strategy", out / "fidelity_vs_budget_by_victim_and_attack.png",
                            "fidelity vs budget, per victim and attack"))
    if "seconds_selection" in df:
        plots.append(_time_split(df, out / "time_split_per_attack.png"))
    if "pool" in df and df["pool"].nunique() > 1:  # the domain gap, and what each policy leaves the attacker per pool
        both = df.assign(pool_policy=df["pool"].astype(str).map(lambda p: Path(p).name) + " · " + df["policy"])
        plots.append(_lines(both, "pool_policy", out / "fidelity_vs_budget_by_pool_and_policy.png",
                            "fidelity vs budget, per pool and output policy"))
    detection = None
    if detectors_in(df):
        plots.append(detection_curves(df, out / "detection_curves.png"))
        detection = detection_table(df, benign_rates(parent))
        detection.to_csv(out / "detection.csv", index=False)
    table = summary(df)
    df.to_csv(out / "trials.csv", index=False)
    spec = stored_spec(_client(), parent.info.run_id, "victim-version table")
    versions = version_table(df, {v["name"]: v.get("source", "embedded") for v in (spec or {}).get("victims", [])})
    if versions is not None:
        versions.to_csv(out / "versions.csv", index=False)
    paper = paper_table(_client(), parent.info.run_id)
    parity = compare(paper, df) if paper is not None else None
    parity_plot = write_parity(parity, out) if parity is not None else None
    projection = projection_report(df, parent, out)  # None for sweeps from before projections were logged
    md = out / "report.md"
    md.write_text(_markdown(sweep, df, table, plots, parity, parity_plot, "trials.csv", projection=projection,
                            detection=detection, versions=versions))
    text = _text_table(table) + (f"\n\ndetectors:\n{_text_table(detection)}" if detection is not None else "") + \
        (f"\n\nvictim versions:\n{_text_table(versions)}" if versions is not None else "") + \
        (f"\n\n{parity_text(parity)}" if parity is not None else "") + \
        (f"\n\n{projection.text()}" if projection is not None else "")
    return Report(df, text, md, plots + ([parity_plot] if parity_plot else []) +
                  ([projection.plot] if projection is not None else []), parity, projection, detection, versions)


def warm_up() -> None:
    """Import the plotting stack and draw one small figure, so the report that follows does not pay for it: the
    imports, Agg's set-up and matplotlib's font look-up (0.2-0.4 s of a quickstart-sized report's 0.8-1.2 s on 2
    cores; the font files themselves are opened again by the report's thread, matplotlib keeping them per thread).
    The sweep driver calls this on a thread while its trials run and the driver only waits for Tune (with one trial
    at a time, a core is free for it). It touches no pyplot state (the figure is drawn with the object API), so a
    report on another thread is not disturbed. Never raises."""
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401  - the report's figures are made through it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(2, 2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.errorbar([0, 1], [0, 1], yerr=[0.1, 0.1], marker="o", capsize=3, label="warm-up")
        ax.set(title="warm-up", xlabel="x", ylabel="y")
        ax.legend()
        fig.tight_layout()
        fig.savefig(io.BytesIO(), format="png")
    except Exception as e:  # only a head start: the report works without it
        log.debug("report warm-up failed: %s", e)


def publish_report(sweep: str, parent_run_id: str, experiment: str | None = None) -> Report | None:
    """Build the report of the sweep whose parent run is ``parent_run_id`` in a temporary folder and log it to that
    run under ``report/``, so the MLflow UI holds everything a reader wants (see the module docstring); the parent
    run's description becomes the sweep's description followed by the summary table.

    Called by the sweep driver after the trials, before the parent run ends. It never raises: a report is a view of
    results that are already in MLflow, so a failure here is logged as a warning and must not fail the sweep.
    Returns the report, whose ``markdown`` and ``plots`` are artifact paths in the parent run (the temporary files are
    gone), or ``None`` when no trial finished or publishing failed."""
    try:
        c = _client()
        parent = c.get_run(parent_run_id)
        with tempfile.TemporaryDirectory(prefix="dme-report-") as tmp:
            out = Path(tmp)
            try:
                report = write_report(sweep, out, experiment, parent=parent)
            except DmeError as e:
                log.warning("no report logged for sweep %r: %s", sweep, e)
                return None
            return _upload(c, parent, sweep, report, out)
    except Exception as e:
        log.warning("could not log the report of sweep %r to its MLflow run %s: %s", sweep, parent_run_id, e,
                    exc_info=True)
        return None


def _upload(c: Any, parent: Any, sweep: str, report: Report, out: Path) -> Report:
    rid = parent.info.run_id
    table = summary(report.frame)
    plot_names = {p.name for p in report.plots}
    summary_plots = [p for p in report.plots if p.stem != "parity" and p.name != PROJECTION_PLOT]
    md = _markdown(sweep, report.frame, table, summary_plots, report.parity,
                   next((p for p in report.plots if p.stem == "parity"), None), ROWS_FILE, "plots/", report.projection,
                   report.detection, report.versions)
    (out / "report.md").write_text(md)
    (out / "trials.csv").rename(out / ROWS_FILE)
    (out / "report.html").write_text(report_html(sweep, md, report.plots, parent.data.tags.get(NOTE_TAG)))
    for f in sorted(out.iterdir()):
        if f.is_file():
            c.log_artifact(rid, str(f), f"{ARTIFACT_DIR}/plots" if f.name in plot_names else ARTIFACT_DIR)
    table_file = f"{ARTIFACT_DIR}/summary.json"
    if table_file in {a.path for a in c.list_artifacts(rid, ARTIFACT_DIR)}:  # log_table would append to it
        path = out / "summary.json"
        table.to_json(path, orient="split", index=False)
        c.log_artifact(rid, str(path), ARTIFACT_DIR)
    else:
        c.log_table(rid, table, table_file)
    c.set_tag(rid, NOTE_TAG, _parent_description(parent.data.tags.get(NOTE_TAG), sweep, len(report.frame),
                                                 _markdown_table(table)))
    c.set_tag(rid, "dme.report", f"{ARTIFACT_DIR}/report.html")
    log.info("report of sweep %r logged to MLflow run %s under %s/", sweep, rid, ARTIFACT_DIR)
    return replace(report, markdown=Path(ARTIFACT_DIR) / "report.md",
                   plots=[Path(ARTIFACT_DIR) / "plots" / p.name for p in report.plots])


#: where the summary starts in the parent run's description (Markdown: an HTML comment would show as text)
_SUMMARY_MARK = "**Summary** ("


def _parent_description(current: str | None, sweep: str, trials: int, table_md: str) -> str:
    """The run description the UI renders as Markdown: what was there (the spec's description) without an earlier
    summary (a resumed sweep publishes again), then the summary table and where the rest is."""
    head = (current or "").split(_SUMMARY_MARK, 1)[0].rstrip() or f"Sweep `{sweep}`."
    return "\n\n".join([head, f"{_SUMMARY_MARK}{trials} finished trials, means over seeds):", table_md,
                         f"Report: artifacts `{ARTIFACT_DIR}/report.html` (rendered), `{ARTIFACT_DIR}/report.md`, "
                         f"`{ARTIFACT_DIR}/{ROWS_FILE}`, `{ARTIFACT_DIR}/plots/`."])
