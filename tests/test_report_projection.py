"""``dme report``'s "Projection vs reality": ratios (actual / projected) checked against hand-computed numbers on tiny
synthetic trials, the factor-of-2 share, the sweep-level steps from a fake parent run, no section for sweeps without
projections, and the section, plot and CSV written locally and published to the parent run (a SQLite store)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from distributed_me.extraction import CHOICES, FACTORS, METRIC_NAMES
from distributed_me.report import publish_report, write_report
from distributed_me.report.projection import CSV, PLOT, projection_report, sweep_table, trial_frame, within, worst
from distributed_me.report.runs import trial_row
from distributed_me.sweep import tracking

# (strategy, projected total, raw projected total, actual total); ratios actual / projected in the comments
TRIALS = [("random", 10.0, 5.0, 15.0),     # 1.5, raw 3.0
          ("random", 20.0, 40.0, 10.0),    # 0.5 (inside x2: the bound counts), raw 0.25
          ("knockoff", 100.0, 50.0, 500.0),  # 5.0, raw 10.0
          ("knockoff", 50.0, 50.0, 60.0),  # 1.2, raw 1.2
          ("knockoff", 30.0, 60.0, 30.0)]  # 1.0, raw 0.5


def _rows() -> pd.DataFrame:
    """Trial rows as ``sweep_runs`` gives them: train is projected at 60% and eval at 40% of the total, except the
    last trial, whose projection has no eval phase (a phase projected zero is not logged); plus a trial from before
    projections were logged, which must be left out."""
    rows = []
    for i, (strategy, proj, raw, actual) in enumerate(TRIALS):
        r = {"run_id": f"r{i}", "strategy": strategy, "budget": 100, "seconds_total": actual,
             "seconds_train": actual * 0.5, "seconds_eval": actual * 0.5, "seconds_setup": 0.0,
             "projected_seconds_total": proj, "projected_raw_seconds_total": raw,
             "projected_seconds_train": proj * 0.6, "projected_raw_seconds_train": raw * 0.6}
        if i < len(TRIALS) - 1:
            r |= {"projected_seconds_eval": proj * 0.4, "projected_raw_seconds_eval": raw * 0.4}
        rows.append(r)
    rows.append({"run_id": "old", "strategy": "random", "budget": 100, "seconds_total": 7.0, "seconds_train": 7.0})
    return pd.DataFrame(rows)


def _parent(metrics: dict[str, float], start: int | None = 1_000_000, end: int | None = 1_300_000,
            status: str = "FINISHED") -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={}),
                           info=SimpleNamespace(start_time=start, end_time=end, status=status, run_id="p"))


PARENT = {"sweep_projected_seconds_total": 200.0, "sweep_projected_seconds_trials": 100.0,
          "sweep_projected_raw_seconds_trials": 80.0, "sweep_seconds_trials": 150.0, "sweep_seconds_ray": 20.0,
          "sweep_seconds_deploy_background": 999.0, "prepare.swifttheft.seconds": 40.0,
          "prepare.swifttheft.projected_seconds": 20.0, "prepare.swifttheft.projected_raw_seconds": 10.0,
          "prepare.swifttheft.images": 5000.0}


def test_ratios_and_the_factor_of_two_share_match_hand_computed_numbers(tmp_path):
    p = projection_report(_rows(), _parent(PARENT), tmp_path)
    assert p is not None and p.trials == 5  # the trial without a projection is not one
    s = p.strategies.set_index("strategy")
    assert list(s.index) == ["knockoff", "random", "all"]
    assert s.loc["random", ["trials", "projected", "actual", "ratio", "worst ratio", "raw ratio", "within ×2"]] \
        .tolist() == pytest.approx([2, 15.0, 12.5, 1.0, 0.5, 1.625, 1.0])
    assert s.loc["knockoff", ["trials", "projected", "actual", "ratio", "worst ratio", "raw ratio", "within ×2"]] \
        .tolist() == pytest.approx([3, 50.0, 60.0, 1.2, 5.0, 1.2, 2 / 3])
    assert s.loc["all", ["ratio", "worst ratio", "raw ratio", "within ×2"]].tolist() == pytest.approx(
        [1.2, 5.0, 1.2, 0.8])
    assert p.within2 == pytest.approx(0.8)

    ph = p.phases.set_index(["strategy", "phase"])
    proj_total, actual_total = sum(t[1] for t in TRIALS), sum(t[3] for t in TRIALS)  # 210, 615
    assert ph.loc[("all", "total"), ["projected", "actual", "ratio"]].tolist() == pytest.approx(
        [proj_total, actual_total, actual_total / proj_total])
    assert ph.loc[("all", "train"), ["projected", "actual"]].tolist() == pytest.approx(
        [0.6 * proj_total, 0.5 * actual_total])
    # the last knockoff trial projected no eval: it counts as zero, its actual eval still counts
    assert ph.loc[("knockoff", "eval"), ["projected", "actual", "ratio"]].tolist() == pytest.approx(
        [0.4 * 150, 0.5 * 590, 295 / 60])
    assert ("all", "setup") not in ph.index  # nothing projected, nothing taken: no row


def test_within_a_factor_of_two_counts_both_bounds_and_worst_is_furthest_on_a_log_scale():
    r = pd.Series([0.4, 0.5, 1.0, 2.0, 2.1, math.nan])  # nan: a trial without an actual or a projection
    assert within(r) == pytest.approx(3 / 5) and within(r, 4.0) == pytest.approx(1.0)
    assert worst(r) == pytest.approx(0.4) and worst(pd.Series([0.2, 4.0])) == pytest.approx(0.2)
    assert math.isnan(within(pd.Series([], dtype=float))) and math.isnan(worst(pd.Series([math.nan])))


def test_the_sweep_level_steps_and_the_actual_wall_time():
    sw = sweep_table(_parent(PARENT)).set_index("step")
    assert list(sw.index) == ["trials phase", "sweep wall", "prepare swifttheft"]
    assert sw.loc["trials phase", ["projected", "actual", "ratio", "raw ratio"]].tolist() == pytest.approx(
        [100.0, 150.0, 1.5, 1.875])
    assert sw.loc["sweep wall", ["actual", "ratio"]].tolist() == pytest.approx([300.0, 1.5])  # end - start
    assert sw.loc["prepare swifttheft", ["actual", "ratio", "raw ratio"]].tolist() == pytest.approx([40.0, 2.0, 4.0])
    # still running: the timed phases, without the deployment that ran beside them
    running = sweep_table(_parent(PARENT, end=None, status="RUNNING")).set_index("step")
    assert running.loc["sweep wall", "actual"] == pytest.approx(170.0)
    # published before the sweep ended: no actual yet, the projection is still shown
    early = sweep_table(_parent({"sweep_projected_seconds_total": 50.0}, end=None, status="RUNNING"))
    assert early["step"].tolist() == ["sweep wall"] and math.isnan(early["ratio"][0])


def test_a_sweep_without_projections_gets_no_section(tmp_path):
    old = _rows()
    old = old[[c for c in old if not c.startswith("projected_")]]
    assert trial_frame(old).empty and projection_report(old, _parent({}), tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_the_plot_csv_and_text_are_written(tmp_path):
    p = projection_report(_rows(), _parent(PARENT), tmp_path)
    assert p.plot == tmp_path / PLOT and p.plot.read_bytes().startswith(b"\x89PNG")
    csv = pd.read_csv(tmp_path / CSV)
    assert csv["run_id"].tolist() == ["r0", "r1", "r2", "r3", "r4"]
    assert csv["ratio"].tolist() == pytest.approx([1.5, 0.5, 5.0, 1.2, 1.0])
    assert {"projected_seconds_train", "projected_raw_seconds_train", "seconds_train"} <= set(csv.columns)
    md = p.markdown("plots/")
    assert "## Projection vs reality" in md and f"![projection_vs_actual](plots/{PLOT})" in md
    assert "| random | 2 | 15 s | 12.5 s | 1.00 | 0.50 | 1.62 | 100% |" in md
    assert "80% of 5 trials took within a factor of 2" in p.text() and "prepare swifttheft" in p.text()


def test_trial_rows_carry_the_projection_beside_the_old_columns():
    run = SimpleNamespace(info=SimpleNamespace(run_id="r"), data=SimpleNamespace(
        params={"strategy": "random"}, metrics={"fidelity": 0.5, "projected_seconds_total": 3.0, "other": 1.0}))
    row = trial_row(run)
    assert list(row)[:1 + len(FACTORS) + len(CHOICES) + len(METRIC_NAMES)] == ["run_id", *FACTORS, *CHOICES,
                                                                                 *METRIC_NAMES]
    assert row["targets"] == "scores"  # a run without the choice's param: the default
    assert row["projected_seconds_total"] == 3.0 and "other" not in row


SCORES = {"fidelity": 0.5, "accuracy": 0.4, "adversarial_fidelity": 0.2, "victim_utility": 0.9}


def _sweep(name: str, projected: bool) -> str:
    """A finished sweep in the test's SQLite store: the parent run with the plan's figures, and the trials above."""
    parent = tracking.start_parent("dme-projection-test", name, {"name": name}, {"CPU": 2.0}, None)
    exp_id = tracking.ensure_experiment("dme-projection-test")
    if projected:
        tracking.log_plan(parent, {k: v for k, v in PARENT.items() if "projected" in k}, "test-device")
    for i, r in _rows().iloc[:5].iterrows():
        factors = {"victim": "v", "policy": "none", "strategy": r["strategy"], "budget": 100, "seed": i}
        with tracking.TrialRun(exp_id, parent, name, f"t{i}", factors) as run:
            run.metrics({k: v for k, v in r.items() if isinstance(v, float) and not math.isnan(v)
                         and (projected or not k.startswith("projected_"))} | SCORES)
    tracking.end_parent(parent, "FINISHED", {k: v for k, v in PARENT.items() if k.startswith("sweep_seconds")})
    return parent


def test_write_and_publish_report_carry_the_section(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    parent = _sweep("proj-e2e", projected=True)
    report = write_report("proj-e2e", tmp_path / "report")
    assert report.projection is not None and tmp_path / "report" / PLOT in report.plots
    assert (tmp_path / "report" / CSV).is_file() and "Projection vs reality" in report.table
    md = report.markdown.read_text()
    assert f"![projection_vs_actual]({PLOT})" in md and md.count(PLOT) == 1

    published = publish_report("proj-e2e", parent)
    assert published is not None and Path("report/plots") / PLOT in published.plots
    c = tracking.client()
    assert f"report/plots/{PLOT}" in {a.path for a in c.list_artifacts(parent, "report/plots")}
    assert f"report/{CSV}" in {a.path for a in c.list_artifacts(parent, "report")}
    md = Path(c.download_artifacts(parent, "report/report.md", str(tmp_path))).read_text()
    assert f"![projection_vs_actual](plots/{PLOT})" in md and md.count(PLOT) == 1
    page = Path(c.download_artifacts(parent, "report/report.html", str(tmp_path))).read_text()
    assert page.count("data:image/png;base64,") == len(published.plots)


def test_a_report_without_projections_is_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    _sweep("proj-old", projected=False)
    report = write_report("proj-old", tmp_path / "report")
    assert report.projection is None and len(report.plots) == 5 and "Projection" not in report.table
    assert not (tmp_path / "report" / CSV).exists() and "Projection" not in report.markdown.read_text()


def test_the_report_warm_up_readies_matplotlib_and_leaves_no_figure_behind():
    """The sweep driver warms the report's plotting stack on a thread while its trials run (``report.warm_up``): in
    a fresh process it imports pyplot with the Agg backend and looks fonts up (a figure was drawn), and it opens no
    pyplot figure a report could pick up."""
    import subprocess
    import sys

    code = ("import sys, threading; from distributed_me.report import warm_up; "
            "assert 'matplotlib.pyplot' not in sys.modules; "
            "t = threading.Thread(target=warm_up); t.start(); t.join(); "  # on a thread, as the sweep driver runs it
            "assert {'matplotlib.pyplot', 'matplotlib.backends.backend_agg'} <= set(sys.modules); "
            "from matplotlib import font_manager as fm; assert fm.fontManager._findfont_cached.cache_info().currsize; "
            "import matplotlib, matplotlib.pyplot as plt; "
            "assert matplotlib.get_backend().lower() == 'agg', matplotlib.get_backend(); "
            "assert plt.get_fignums() == [], plt.get_fignums()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
