"""MLflow as the place to browse a sweep: against a real ``mlflow server`` on 127.0.0.1, a sweep recorded with the
project's own functions (parent run, child runs as trials leave them) gets its report published to the parent run —
``report/report.md``, ``report/results.csv`` equal to the child runs' metrics, the plots, the summary as an MLflow
table and as the run's description — the experiment has a description, children have readable names, and a factor
filter finds exactly the matching trials. With Chromium installed, the UI's artifact list is checked in a browser."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess

import pandas as pd
import pytest
from mlflow import MlflowClient

from distributed_me.extraction import FACTORS, METRIC_NAMES
from distributed_me.report import publish_report
from distributed_me.sweep import tracking
from distributed_me.sweep.spec import parse_sweep
from distributed_me.tracking import NOTE_TAG, ensure_experiment

EXPERIMENT = "test-layout"
PLOTS = {"fidelity_vs_budget_by_attack.png", "fidelity_vs_budget_by_optimizer.png", "fidelity_vs_budget_by_arch.png",
         "policy_utility_vs_fidelity.png", "time_split_per_attack.png"}


def _metrics(i: int) -> dict[str, float]:
    """Distinct, exactly representable values per trial, so rows can be matched to runs."""
    return {k: 0.125 * (i + 1) + 0.001 * j for j, k in enumerate(METRIC_NAMES)}


def _sweep(name: str) -> tuple[MlflowClient, str, str, dict[str, dict]]:
    """A sweep as `dme sweep` records it: parent run, 4 FINISHED trials (2 optimizers x 2 budgets) with per-epoch
    curves, one FAILED attempt (not in the report); returns the client, experiment id, parent and {run id: factors}."""
    spec = parse_sweep({"name": name, "experiment": EXPERIMENT, "description": f"layout test {name}",
                        "attack": {"optimizer": ["adam", "sgd"], "budget": [100, 200], "epochs": 2}})
    parent = tracking.start_parent(spec.experiment, spec.name, spec.model_dump(mode="json"), {"CPU": 2.0}, None)
    exp_id = ensure_experiment(spec.experiment)
    children: dict[str, dict] = {}
    for i, factors in enumerate(spec.grid()):
        with tracking.TrialRun(exp_id, parent, spec.name, None, factors) as run:
            for epoch in (1, 2):
                run.metrics({"train_loss": 1.0 / epoch, "fidelity": 0.01 * epoch}, step=epoch)
            run.metrics(_metrics(i), step=2)  # as a trial does: the final metrics at step = epochs
        children[run.run_id] = {**factors, "expected": _metrics(i)}
    with pytest.raises(RuntimeError), tracking.TrialRun(exp_id, parent, spec.name, None, spec.grid()[0]):
        raise RuntimeError("a failed attempt")
    return tracking.client(), exp_id, parent, children


@pytest.fixture
def store(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


def _download(c: MlflowClient, run_id: str, path: str, tmp_path) -> bytes:
    return open(c.download_artifacts(run_id, path, str(tmp_path)), "rb").read()


def test_the_parent_run_carries_the_report(store, tmp_path):
    c, exp_id, parent, children = _sweep("layout-report")
    report = publish_report("layout-report", parent)
    assert report is not None and len(report.frame) == 4
    tracking.end_parent(parent, "FINISHED")

    listed = {a.path for a in c.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/results.csv", "report/summary.json",
            "report/plots"} <= listed
    plots = {a.path.split("/")[-1]: a.file_size for a in c.list_artifacts(parent, "report/plots")}
    assert set(plots) == PLOTS and all(size > 1000 for size in plots.values())
    png = _download(c, parent, "report/plots/fidelity_vs_budget_by_attack.png", tmp_path / "png")
    assert png.startswith(b"\x89PNG")

    rows = pd.read_csv(io.BytesIO(_download(c, parent, "report/results.csv", tmp_path / "csv")))
    assert set(rows["run_id"]) == set(children)  # the FAILED attempt is not a row
    assert set(FACTORS) | set(METRIC_NAMES) <= set(rows.columns)
    curve = c.get_metric_history(next(iter(children)), "train_loss")  # per-epoch curves on the child runs
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5)]
    for _, row in rows.iterrows():
        assert {k: row[k] for k in METRIC_NAMES} == pytest.approx(children[row["run_id"]]["expected"])
        assert row["optimizer"] == children[row["run_id"]]["optimizer"]
        assert int(row["budget"]) == children[row["run_id"]]["budget"]

    md = _download(c, parent, "report/report.md", tmp_path / "md").decode()
    assert "# Sweep `layout-report`" in md and "`results.csv`" in md
    assert all(f"(plots/{p})" in md for p in PLOTS)  # links resolve inside the artifact folder
    page = _download(c, parent, "report/report.html", tmp_path / "html").decode()
    assert page.count("data:image/png;base64,") == 5 and "<table>" in page and "layout test" in page

    table = json.loads(_download(c, parent, "report/summary.json", tmp_path / "json"))
    assert "fidelity" in table["columns"] and len(table["data"]) == 4  # one per optimizer x budget (1 seed)
    note = c.get_run(parent).data.tags[NOTE_TAG]
    assert note.startswith("layout test layout-report") and "**Summary** (4 finished trials" in note
    assert "| sgd |" in note.replace(" | sgd | ", "| sgd |") and "report/report.html" in note


def test_publishing_again_replaces_the_summary(store, tmp_path):
    """A resumed sweep publishes again: the table is not appended to, the description has one summary."""
    c, _, parent, _ = _sweep("layout-again")
    assert publish_report("layout-again", parent) is not None
    assert publish_report("layout-again", parent) is not None
    table = json.loads(_download(c, parent, "report/summary.json", tmp_path))
    assert len(table["data"]) == 4
    assert c.get_run(parent).data.tags[NOTE_TAG].count("**Summary**") == 1


def test_no_finished_trial_gives_none_and_a_warning(store, caplog):
    spec = parse_sweep({"name": "layout-empty", "experiment": EXPERIMENT})
    parent = tracking.start_parent(spec.experiment, spec.name, spec.model_dump(mode="json"), {"CPU": 2.0}, None)
    with caplog.at_level(logging.WARNING, logger="distributed_me.report"):
        assert publish_report("layout-empty", parent) is None
        assert publish_report("layout-empty", "0" * 32) is None  # a run that does not exist: warned, not raised
    assert "no report logged for sweep 'layout-empty'" in caplog.text
    assert "could not log the report" in caplog.text
    assert tracking.client().list_artifacts(parent, "report") == []


def test_descriptions_names_and_factor_filters(store):
    c, exp_id, parent, children = _sweep("layout-browse")
    assert tracking.BROWSE_GUIDE in c.get_experiment(exp_id).tags[NOTE_TAG]
    c.set_experiment_tag(exp_id, NOTE_TAG, "written by a person")
    ensure_experiment(EXPERIMENT, description="another sweep's")  # never overwrites a description
    assert c.get_experiment(exp_id).tags[NOTE_TAG] == "written by a person"
    assert c.get_run(parent).data.tags[NOTE_TAG].startswith("layout test layout-browse")

    names = {r: c.get_run(r).info.run_name for r in children}
    for run_id, name in names.items():
        f = children[run_id]
        assert name == f"random · digits/probabilities · {f['budget']} queries · {f['arch']} {f['optimizer']} · " \
                       f"pool photos · augment · epochs 2 · seed 0", name  # no "lrNone", no unset flags
    assert len(set(names.values())) == 4

    sweep = "tags.`dme.sweep` = 'layout-browse' and attributes.status = 'FINISHED'"
    found = c.search_runs([exp_id], f"{sweep} and params.optimizer = 'sgd' and params.budget = '200'")
    assert [r.info.run_id for r in found] == [r for r, f in children.items()
                                              if f["optimizer"] == "sgd" and f["budget"] == 200]
    for factor in FACTORS:  # every factor filters, whatever FACTORS holds
        value = next(iter(children.values()))[factor]
        hits = {r.info.run_id for r in c.search_runs([exp_id], f"{sweep} and params.{factor} = '{value}'")}
        assert hits == {r for r, f in children.items() if str(f[factor]) == str(value)}, factor


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium package is not installed: the "
                    "browser check of the MLflow UI needs a headless Chromium")
def test_the_ui_lists_the_report_in_a_browser(store):
    c, exp_id, parent, _ = _sweep("layout-ui")
    assert publish_report("layout-ui", parent) is not None
    url = f"{store}/#/experiments/{exp_id}/runs/{parent}/artifactPath/report/report.md"  # the report opened
    dom = subprocess.run(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
                          "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    for needle in ("sweep layout-ui", "report.md", "results.csv", "report.html", "sweep.json", "finished trials"):
        assert needle in dom, f"{needle!r} not in the rendered page: {dom[-2000:]}"
