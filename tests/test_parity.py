"""Paper parity as data: the ``paper:`` section validates with errors that name field, value and what is allowed; the
comparison (percent vs fraction, tolerance, missing cells, orderings) is right on hand-built rows; the shipped sweeps'
tables validate in every preset; and ``dme report`` prints and writes the comparison from an MLflow store alone."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from distributed_me.errors import DmeError
from distributed_me.extraction import METRIC_NAMES
from distributed_me.parity import FACTORS, PaperTable, compare
from distributed_me.report import write_report
from distributed_me.report.parity import paper_table
from distributed_me.spec_types import read_yaml_mapping
from distributed_me.sweep import tracking
from distributed_me.sweep.spec import SweepSpec, deep_merge, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"mebench-optimizers": "optimizer", "swifttheft-vs-baselines": "strategy"}


def _cell(opt: str, value: float, budget: int = 10000, **kw: Any) -> dict[str, Any]:
    return {"where": {"optimizer": opt, "budget": budget}, "metric": "fidelity", "value": value, **kw}


def _table(cells: list[dict], tie: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"source": "test paper Table 3", "unit": "percent", "tolerance": 2.0, "cells": cells,
            "orderings": [{"factor": "optimizer", "tie": tie}], **kw}


def _rows(values: dict[str, list[float]], budget: Any = 10000.0) -> pd.DataFrame:
    """Result rows as `dme report` has them: one per trial, factor params (budget numeric, lr the string MLflow
    stores) and metrics."""
    rows = [{"victim": "v", "policy": "probabilities", "strategy": "random", "budget": budget, "optimizer": opt,
             "lr": "None", "seed": seed, "fidelity": f} for opt, fs in values.items() for seed, f in enumerate(fs)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("paper,needles", [
    (_table([_cell("lion", 84.6, metric="fidelty")]),
     ["'paper.cells.0.metric' = 'fidelty'", "unknown metric 'fidelty'; allowed: ", "fidelity", "seconds_total"]),
    (_table([{**_cell("lion", 84.6), "where": {"optimiser": "lion"}}]),
     ["'paper.cells.0.where' = {'optimiser': 'lion'}", "unknown factor 'optimiser'; allowed: ", "optimizer, lr"]),
    (_table([_cell("lion", 84.6, unit="pct")]),
     ["'paper.cells.0.unit' = 'pct'", "'fraction', 'percent', 'seconds' or 'count'"]),
    (_table([_cell("lion", 84.6, valu=1)]),
     ["'paper.cells.0'", "unknown field 'valu' in PaperCell; allowed: where, metric, value, unit, tolerance, source"]),
    (_table([_cell("lion", 84.6, unit="fraction")]), ["'paper.cells.0'", "value 84.6 is outside [0, 1]"]),
    (_table([_cell("lion", 84.6, metric="seconds_total")]),
     ["unit 'percent' does not fit metric 'seconds_total'; allowed: seconds"]),
    (_table([_cell("lion", 84.6), _cell("lion", 80.0)]), ["cells 0 and 1 are the same cell"]),
    (_table([_cell("lion", 84.6), _cell("sgd", 80.0, budget=5000)]),
     ["ordering over 'optimizer': no two cells of one metric differ only in 'optimizer'"]),
    ({**_table([_cell("lion", 84.6), _cell("sgd", 80.0)]), "orderings": [{"factor": "optimiser"}]},
     ["'paper.orderings.0.factor' = 'optimiser'", "unknown factor 'optimiser'; allowed: victim"]),
    ({k: v for k, v in _table([_cell("lion", 84.6)]).items() if k != "tolerance"}, ["'paper.tolerance'", "required"]),
])
def test_bad_paper_sections_name_field_value_and_allowed(paper, needles):
    with pytest.raises(DmeError) as e:
        parse_sweep({"name": "t", "paper": paper})
    for needle in needles:
        assert needle in str(e.value)


def test_cells_take_the_tables_unit_and_tolerance_unless_they_give_their_own():
    t = PaperTable.model_validate(_table([_cell("lion", 84.6), _cell("sgd", 0.8, unit="fraction", tolerance=0.05)]))
    assert [(c.unit, c.tolerance) for c in t.cells] == [("percent", 2.0), ("fraction", 0.05)]
    assert PaperTable.model_validate(t.model_dump(mode="json")) == t  # what sweep.json stores reads back the same
    with pytest.raises(ValidationError):
        PaperTable.model_validate({**_table([_cell("lion", 84.6)]), "extra": 1})


# ------------------------------------------------------------------------------------------------------- comparison
def test_values_differences_units_tolerance_and_missing():
    t = PaperTable.model_validate(_table([
        _cell("lion", 84.0),                                       # ours 0.85, 0.84 -> 84.5: +0.5, within 2 points
        _cell("adamw", 84.0),                                      # ours 0.80 -> 80.0: -4.0, outside
        _cell("sgd", 0.70, unit="fraction", tolerance=0.02),       # ours 0.75 -> +0.05 (a fraction), outside
        _cell("adam", 84.0),                                       # no adam rows: missing
        _cell("lion", 50.0, budget=5000),                          # rows at budget 10000 only: missing
    ]))
    df = pd.concat([_rows({"lion": [0.85, 0.84], "adamw": [0.80], "sgd": [0.75]}),
                    _rows({"adamw": [0.10]}, budget=20000.0)])  # another budget: must not leak into the cells
    r = compare(t, df)
    lion, adamw, sgd, adam, lion5k = r.cells
    assert lion.n == 2 and lion.ours == pytest.approx(84.5) and lion.diff == pytest.approx(0.5)
    assert lion.ours_std == pytest.approx(100 * pd.Series([0.85, 0.84]).std())
    assert lion.status == "ok" and lion.within
    assert adamw.n == 1 and adamw.ours == pytest.approx(80.0) and adamw.diff == pytest.approx(-4.0)
    assert adamw.status == "outside"
    assert sgd.ours == pytest.approx(0.75) and sgd.diff == pytest.approx(0.05) and sgd.status == "outside"
    assert adam.status == lion5k.status == "missing" and adam.n == 0 and math.isnan(adam.ours)
    assert adam.within is None
    recs = r.cell_records()
    assert [x["status"] for x in recs] == ["ok", "outside", "outside", "missing", "missing"]
    assert set(recs[0]) >= {"metric", "where", "budget", "optimizer", "unit", "paper", "ours", "diff", "tolerance",
                            "status", "trials", "source"}
    assert "1 of 5 cells within tolerance (2 outside, 2 missing)" in r.summary()


def test_tolerance_edge_and_percent_fraction_agree():
    """The same result against the same paper value given in percent and as a fraction: the same verdict."""
    df = _rows({"lion": [0.82], "sgd": [0.79]})
    pct = compare(PaperTable.model_validate(_table([_cell("lion", 84.0), _cell("sgd", 81.0, tolerance=1.9)])), df)
    frac = compare(PaperTable.model_validate(_table(
        [_cell("lion", 0.84, unit="fraction", tolerance=0.02), _cell("sgd", 0.81, unit="fraction", tolerance=0.019)])),
        df)
    assert [c.status for c in pct.cells] == [c.status for c in frac.cells] == ["ok", "outside"]  # 2 <= 2, 2 > 1.9
    assert [c.diff for c in pct.cells] == pytest.approx([100 * c.diff for c in frac.cells])
    assert pct.groups[0].holds is frac.groups[0].holds is True  # the 1-point tie is in the table's unit, percent


def test_where_matches_params_as_mlflow_stores_them():
    """MLflow params are strings ("10000", "None", "True"); YAML gives ints, null, booleans."""
    t = PaperTable.model_validate(_table(
        [{"where": {"optimizer": opt, "budget": 10000, "lr": None, "augment": True}, "metric": "fidelity",
          "value": v} for opt, v in (("lion", 80.0), ("sgd", 70.0))]))
    df = _rows({"lion": [0.8], "sgd": [0.7]}, budget="10000").assign(augment="True")
    assert [c.n for c in compare(t, df).cells] == [1, 1]
    assert [c.n for c in compare(t, df.assign(augment="False")).cells] == [0, 0]


PAPER_ORDER = [_cell("lion", 84.64), _cell("adamw", 84.35), _cell("adam", 84.35), _cell("sgd", 81.01)]


def test_ordering_holds():
    """MEBench's claim: Lion, AdamW, Adam comparable (within the 1-point tie), SGD behind: 3 ordered pairs."""
    r = compare(PaperTable.model_validate(_table(PAPER_ORDER)),
                _rows({"lion": [0.70], "adamw": [0.72], "adam": [0.71], "sgd": [0.60]}))
    (g,) = r.groups
    assert g.factor == "optimizer" and g.fixed == {"budget": 10000}
    assert sum(p.paper != 0 for p in g.pairs) == 3  # the Lion/AdamW/Adam pairs are ties: not counted
    assert (g.compared, g.concordant, g.holds) == (3, 3, True)
    assert r.agreement == 1.0 and r.ordering_holds is True and "ordering holds: 3 of 3 pairs" in r.summary()
    assert g.paper_ranking() == "lion ≈ adamw ≈ adam > sgd" and g.our_ranking() == "adamw > adam > lion > sgd"


def test_ordering_violated_pairwise():
    r = compare(PaperTable.model_validate(_table(PAPER_ORDER)),
                _rows({"lion": [0.70], "adamw": [0.72], "adam": [0.50], "sgd": [0.60]}))  # adam below sgd
    (g,) = r.groups
    assert (g.compared, g.concordant, g.holds) == (3, 2, False)
    bad = [p for p in g.pairs if p.concordant is False]
    assert [(p.a, p.b, p.paper, p.ours) for p in bad] == [("adam", "sgd", 1, -1)]
    assert r.agreement == pytest.approx(2 / 3) and r.ordering_holds is False
    assert "does NOT hold: 2 of 3 pairs concordant (67%)" in r.summary()
    assert g.record()["holds"] == "no"


def test_tie_zero_counts_every_pair_and_ties_of_ours_are_not_concordant():
    r = compare(PaperTable.model_validate(_table(PAPER_ORDER, tie=0.0)),
                _rows({"lion": [0.70], "adamw": [0.70], "adam": [0.69], "sgd": [0.60]}))
    (g,) = r.groups
    # paper: lion > adamw, lion > adam, adamw = adam (equal values, never ordered), each > sgd: 5 ordered pairs
    assert sum(p.paper != 0 for p in g.pairs) == 5 and g.compared == 5
    assert g.concordant == 4  # lion = adamw in ours: not concordant with the paper's lion > adamw


def test_missing_cells_are_left_out_of_orderings():
    r = compare(PaperTable.model_validate(_table(PAPER_ORDER)), _rows({"lion": [0.7], "sgd": [0.6]}))
    (g,) = r.groups
    assert (g.compared, g.concordant, g.holds) == (1, 1, True)
    assert g.our_ranking() == "lion > sgd (missing: adamw, adam)"
    nothing = compare(PaperTable.model_validate(_table(PAPER_ORDER)), _rows({"lion": [0.7]}))
    assert nothing.groups[0].holds is None and nothing.agreement is None
    assert "could not be checked" in nothing.summary()


def test_orderings_are_grouped_by_the_other_factors():
    t = PaperTable.model_validate(_table([_cell("lion", 84.0), _cell("sgd", 80.0),
                                          _cell("lion", 70.0, budget=5000), _cell("sgd", 75.0, budget=5000)]))
    df = pd.concat([_rows({"lion": [0.84], "sgd": [0.80]}), _rows({"lion": [0.70], "sgd": [0.60]}, budget=5000.0)])
    r = compare(t, df)
    assert [(g.fixed, g.holds) for g in r.groups] == [({"budget": 10000}, True), ({"budget": 5000}, False)]
    assert (r.concordant, r.compared) == (1, 2)


# ------------------------------------------------------------------------------------------------ the shipped sweeps
def _shipped(name: str) -> dict[str, SweepSpec]:
    """The base document and every preset, validated; the pool is replaced by a registered one (the full presets'
    pools are data this machine may lack, and the pool is not what is tested here)."""
    doc = read_yaml_mapping(ROOT / "sweeps" / f"{name}.yaml", "sweep", "")
    out = {}
    for preset in [None, *doc.get("presets", {})]:
        merged = deep_merge(doc, doc["presets"][preset]) if preset else dict(doc)
        out[preset or "base"] = parse_sweep({**merged, "pool": "photos"})
    return out


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_paper_tables_validate_in_every_preset(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # cpu-small-table2's reference_data is relative to the repository
    if not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not on this machine")
    for preset, spec in _shipped(name).items():
        t = spec.paper
        assert t is not None and t.source and t.note, preset
        for c in t.cells:
            assert c.metric in METRIC_NAMES and set(c.where) <= set(FACTORS) and c.source, (preset, c)
            assert c.unit == "percent" and 0 < c.value < 100 and c.tolerance == 2.0, (preset, c)
        assert [o.factor for o in t.orderings] == [SHIPPED[name]]
        grid = spec.grid()
        if preset in ("base", "full"):  # every cell names factor values the full grid runs
            assert t.unmatched(grid) == [], preset
        # and every preset can check the ordering: its grid runs two cells the paper orders
        assert compare(t, [{**g, "fidelity": 0.5} for g in grid]).compared >= 1, preset


def test_shipped_paper_values():
    """The numbers as the papers print them (paper 004 Table 3, Microsoft row; paper 003 §IV.3 and Tables 2, 4)."""
    me = _shipped("mebench-optimizers")
    assert {c.where["optimizer"]: c.value for c in me["full"].paper.cells} == {
        "lion": 84.64, "adamw": 84.35, "adam": 84.35, "sgd": 81.01}
    assert {c.where["budget"] for c in me["full"].paper.cells} == {10000}
    assert {c.where["budget"] for c in me["cpu-small"].paper.cells} == {4000}
    assert [c.value for c in me["cpu-small"].paper.cells] == [c.value for c in me["full"].paper.cells]
    st = _shipped("swifttheft-vs-baselines")
    assert {(c.where["strategy"], c.where["budget"]): c.value for c in st["full"].paper.cells} == {
        ("swifttheft", 4000): 73.73, ("activethief-kcenter", 4000): 60.04, ("random", 4000): 59.40,
        ("swifttheft", 8000): 70.19, ("swifttheft", 12000): 76.12, ("swifttheft", 16000): 78.67,
        ("swifttheft", 20000): 79.54}
    assert {(c.where["strategy"], c.value) for c in st["cpu-small-table2"].paper.cells} == {
        ("swifttheft", 63.06), ("random", 59.40)}


# ---------------------------------------------------------------------------------------------- report integration
METRICS_LOGGED = {"accuracy": 0.5, "adversarial_fidelity": 0.3, "queries_used": 100, "victim_accuracy": 0.9,
                  "victim_utility": 0.9, "seconds_total": 1.0}


def _store(tmp_path: Path, monkeypatch, name: str, paper: dict | None, fidelity: dict[str, list[float]]) -> None:
    """A sweep as `dme sweep` leaves it in MLflow: a parent run with the spec artifact, one FINISHED child per trial."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DME_HOME", str(tmp_path / "home"))
    doc = {"name": name, "experiment": "dme-parity-test",
           "attack": {"optimizer": list(fidelity), "budget": [10000], "seed": [0, 1]}}
    spec = parse_sweep({**doc, **({"paper": paper} if paper else {})})
    parent = tracking.start_parent(spec.experiment, spec.name, spec.model_dump(mode="json"), {"CPU": 2.0}, None)
    exp_id = tracking.ensure_experiment(spec.experiment)
    for factors in spec.grid():
        with tracking.TrialRun(exp_id, parent, spec.name, f"trial {factors['optimizer']}", factors) as run:
            run.metrics({**METRICS_LOGGED, "fidelity": fidelity[factors["optimizer"]][factors["seed"]]})
    tracking.end_parent(parent, "FINISHED")


def test_report_prints_and_writes_the_paper_comparison(tmp_path, monkeypatch):
    paper = _table([_cell("lion", 84.64, source="Table 3 Lion"), _cell("sgd", 81.01, source="Table 3 SGD"),
                    _cell("adam", 84.35, budget=5000)])  # the sweep runs no 5000: missing
    _store(tmp_path, monkeypatch, "parity-e2e", paper, {"lion": [0.80, 0.82], "sgd": [0.70, 0.72]})
    report = write_report("parity-e2e", tmp_path / "report")

    csv = pd.read_csv(tmp_path / "report" / "parity.csv")
    assert list(csv["optimizer"]) == ["lion", "sgd", "adam"] and list(csv["budget"]) == [10000, 10000, 5000]
    assert list(csv["paper"]) == [84.64, 81.01, 84.35]
    assert csv["ours"].tolist()[:2] == pytest.approx([81.0, 71.0]) and math.isnan(csv["ours"][2])
    assert csv["diff"].tolist()[:2] == pytest.approx([81.0 - 84.64, 71.0 - 81.01])
    assert list(csv["status"]) == ["outside", "outside", "missing"] and list(csv["trials"]) == [2, 2, 0]
    assert list(csv["source"].fillna("")) == ["Table 3 Lion", "Table 3 SGD", ""]
    orderings = pd.read_csv(tmp_path / "report" / "parity_orderings.csv")
    assert orderings[["pairs_compared", "pairs_concordant", "holds"]].values.tolist() == [[1, 1, "yes"]]

    png = tmp_path / "report" / "parity.png"
    assert png.is_file() and png.stat().st_size > 0 and png in report.plots
    assert "Paper parity: test paper Table 3" in report.table
    assert "84.64" in report.table and "81.00 ± 1.41" in report.table and "-3.64" in report.table
    assert "missing" in report.table and "ordering holds: 1 of 1 pairs concordant" in report.table
    md = report.markdown.read_text()
    assert "## Paper parity: test paper Table 3" in md and "| budget=10000, optimizer=lion | fidelity |" in md
    assert "![parity](parity.png)" in md and report.parity is not None


def test_report_without_a_paper_section_is_unchanged(tmp_path, monkeypatch):
    _store(tmp_path, monkeypatch, "no-paper", None, {"lion": [0.8, 0.8], "sgd": [0.7, 0.7]})
    report = write_report("no-paper", tmp_path / "report")
    assert report.parity is None and "Paper parity" not in report.table
    assert not (tmp_path / "report" / "parity.csv").exists() and len(report.plots) == 5
    assert "Paper parity" not in report.markdown.read_text()


def test_a_parent_run_without_the_spec_artifact_gives_no_parity_section(tmp_path, monkeypatch, caplog):
    """Sweeps recorded before specs were logged have no sweep.json: the report goes on without a parity section."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DME_HOME", str(tmp_path / "home"))
    c = tracking.client()
    run = c.create_run(tracking.ensure_experiment("dme-parity-test"), run_name="old sweep")
    with caplog.at_level("WARNING"):
        assert paper_table(c, run.info.run_id) is None
    assert "no sweep.json on the sweep's parent run" in caplog.text
