"""``dme leaderboard`` against a real MLflow server: sweeps recorded by the sweep's own tracking functions, then read
back, ranked at matched budgets, linked and written as Markdown, HTML, CSV and JSON.

The store holds, in an experiment of this module alone (the server is the session's):

- sweep ``lb-a``: random and knockoff on victim ``lbv`` under ``none`` (budgets 100, 200, 400) and ``topk:1``
  (budget 400, a tie), plus a FAILED random attempt whose fidelity 0.99 must not count and an earlier finished
  attempt of one trial (same trial key) that its newer attempt replaces;
- sweep ``lb-b`` (newest run): activethief with another arch on ``lbv`` × ``none``, budgets 100 and 200 only — so
  the ``none`` task is ranked at 200, where the order differs from the order at 400 — and lb-a's knockoff
  configuration on ``topk:1``, which stays an entry of its own;
- an older FINISHED run of ``lb-b`` (activethief, 0.99 everywhere, budget 400 too) that the newer one supersedes;
- a RUNNING sweep ``lb-c`` with one finished trial, left out because the sweep itself has not finished.
"""

from __future__ import annotations

import argparse
import re
import time
import uuid

import pandas as pd
import pytest

from distributed_me.errors import DmeError
from distributed_me.report import leaderboard
from distributed_me.sweep import tracking

pytestmark = pytest.mark.mlflow_server

VICTIM = "lbv"
FIXED = {"victim": VICTIM, "lr": "None", "pretrained": False, "augment": False, "epochs": 2}


def _trial(exp_id: str, parent: str, sweep: str, factors: dict, metrics: dict) -> str:
    f = {**FIXED, **factors}
    with tracking.TrialRun(exp_id, parent, sweep, f"{f['strategy']}-b{f['budget']}-s{f['seed']}", f) as run:
        run.metrics({"victim_accuracy": 0.9, "victim_utility": 0.9 if f["policy"] == "none" else 0.85,
                     "victim_kl": 0.0 if f["policy"] == "none" else 0.25, "queries_used": float(f["budget"]),
                     **metrics})
    return run.run_id


def _sweep(experiment: str, name: str, trials: list[tuple[dict, dict]], finish: bool = True) -> dict:
    parent = tracking.start_parent(experiment, name, {"name": name}, {}, None)
    exp_id = tracking.client().get_run(parent).info.experiment_id
    ids = [_trial(exp_id, parent, name, f, m) for f, m in trials]
    if finish:
        tracking.end_parent(parent, "FINISHED", {"trials": len(ids)})
    time.sleep(0.02)  # start times in ms: the next sweep is strictly newer
    return {"parent": parent, "exp_id": exp_id, "runs": ids}


def _m(fid: float, acc: float | None = None) -> dict:
    return {"fidelity": fid, "accuracy": fid - 0.1 if acc is None else acc, "adversarial_fidelity": fid / 2}


@pytest.fixture(scope="module")
def store(mlflow_server, tmp_path_factory):
    """The sweeps above, recorded once for the module; returns their ids and a leaderboard built with defaults."""
    experiment = f"leaderboard-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        base = {"arch": "cnn32", "optimizer": "adam"}
        fid_a = {("random", 100): 0.5, ("random", 200): 0.6, ("random", 400): 0.95,
                 ("knockoff", 100): 0.55, ("knockoff", 400): 0.75}
        # an attempt of random@100 seed 0 that finished before the one that counts (same trial key, e.g. a resume)
        trials = [({**base, "policy": "none", "strategy": "random", "budget": 100, "seed": 0}, _m(0.0))]
        for (strategy, budget), fid in fid_a.items():
            for seed in (0, 1):
                trials.append(({**base, "policy": "none", "strategy": strategy, "budget": budget, "seed": seed},
                               _m(fid)))
        for seed, fid in ((0, 0.68), (1, 0.72)):  # knockoff at 200: mean 0.70 over two seeds
            trials.append(({**base, "policy": "none", "strategy": "knockoff", "budget": 200, "seed": seed}, _m(fid)))
        for strategy, acc in (("random", 0.40), ("knockoff", 0.45)):  # a tie at 400: accuracy orders it
            trials.append(({**base, "policy": "topk:1", "strategy": strategy, "budget": 400, "seed": 0},
                           _m(0.5, acc)))
        old_b = _sweep(experiment, "lb-b", [({**base, "arch": "resnet18", "policy": "none", "strategy": "activethief",
                                              "budget": b, "seed": 0}, _m(0.99)) for b in (100, 200, 400)])
        a = _sweep(experiment, "lb-a", trials, finish=False)
        with pytest.raises(RuntimeError):  # a failed attempt after logging a great fidelity
            with tracking.TrialRun(a["exp_id"], a["parent"], "lb-a", "failed", {
                    **FIXED, **base, "policy": "none", "strategy": "random", "budget": 200, "seed": 2}) as run:
                run.metrics(_m(0.99))
                failed = run.run_id
                raise RuntimeError("worker died")
        tracking.end_parent(a["parent"], "FINISHED")
        b = _sweep(experiment, "lb-b", [({**base, "arch": "resnet18", "policy": "none", "strategy": "activethief",
                                          "budget": budget, "seed": 0}, _m(fid))
                                        for budget, fid in ((100, 0.7), (200, 0.8))]
                   # the same attack configuration as lb-a's knockoff, from another sweep: an entry of its own
                   + [({**base, "policy": "topk:1", "strategy": "knockoff", "budget": 400, "seed": 0}, _m(0.3))])
        c = _sweep(experiment, "lb-c", [({**base, "policy": "none", "strategy": "swifttheft", "budget": 200,
                                          "seed": 0}, _m(1.0))], finish=False)
        out = tmp_path_factory.mktemp("leaderboard")
        lb = leaderboard.build_leaderboard(out, [experiment])
    return {"experiment": experiment, "uri": mlflow_server, "a": a, "b": b, "old_b": old_b, "c": c,
            "failed": failed, "lb": lb, "out": out}


def test_ranked_at_the_largest_shared_budget(store):
    lb = store["lb"]
    assert set(lb.tables) == {(VICTIM, "none"), (VICTIM, "topk:1")}
    task = next(t for t in lb.tasks if t.policy == "none")
    # 400 is the largest budget, but activethief never reached it: the matched budget is 200
    assert task.rank_budget == 200 and task.budgets == [100, 200, 400]
    t = task.table
    assert list(t["entry"]) == ["activethief (arch=resnet18)", "knockoff (arch=cnn32)", "random (arch=cnn32)"]
    assert list(t["sweep"]) == ["lb-b", "lb-a", "lb-a"]
    assert list(t["rank"]) == [1, 2, 3]
    assert t["fidelity@200"].tolist() == pytest.approx([0.8, 0.7, 0.6])
    assert list(t["n@200"]) == [1, 2, 2]  # the failed attempt (seed 2) is not counted
    assert t.loc[2, "fidelity@100"] == pytest.approx(0.5) and t.loc[2, "n@100"] == 2  # a trial counts once
    assert pd.isna(t.loc[0, "fidelity@400"])  # the superseded run of lb-b had 400: it is not read
    assert t["accuracy"].tolist() == pytest.approx([0.7, 0.6, 0.5])
    assert task.victim_utility == pytest.approx(0.9) and task.victim_accuracy == pytest.approx(0.9)
    assert task.victim_kl == pytest.approx(0.0)


def test_ties_share_a_rank(store):
    task = next(t for t in store["lb"].tasks if t.policy == "topk:1")
    assert task.rank_budget == 400
    # same arch everywhere: the label is the strategy; the sweep tells lb-a's knockoff from lb-b's
    assert list(task.table["entry"]) == ["knockoff", "random", "knockoff"]
    assert list(task.table["sweep"]) == ["lb-a", "lb-a", "lb-b"]
    assert list(task.table["rank"]) == [1, 1, 3]
    assert task.victim_utility == pytest.approx(0.85) and task.victim_kl == pytest.approx(0.25)


def test_only_newest_finished_sweeps_and_finished_trials(store):
    lb = store["lb"]
    assert [s.name for s in lb.sweeps] == ["lb-a", "lb-b"]  # lb-c is still running
    assert {s.run_id for s in lb.sweeps} == {store["a"]["parent"], store["b"]["parent"]}
    ids = {r for rs in lb.rows["run_ids"] for r in rs}
    assert ids == set(store["a"]["runs"][1:]) | set(store["b"]["runs"])  # [0]: the superseded attempt
    assert store["failed"] not in ids and not ids & set(store["old_b"]["runs"]) and not ids & set(store["c"]["runs"])


def test_csv_is_one_row_per_entry_and_budget(store):
    df = pd.read_csv(store["out"] / "leaderboard.csv")
    assert len(df) == 3 + 3 + 2 + 3  # none: random, knockoff × 3 budgets, activethief × 2; topk:1: 3 × 1
    row = df[(df["policy"] == "none") & (df["sweep"] == "lb-b") & (df["budget"] == 200)].iloc[0]
    assert row["rank"] == 1 and row["ranked_at"] == 200 and row["seeds"] == 1 and row["arch"] == "resnet18"
    assert row["fidelity"] == pytest.approx(0.8) and row["adversarial_fidelity"] == pytest.approx(0.4)
    assert row["run_ids"] == store["b"]["runs"][1]
    assert row["run_urls"] == f"{store['uri']}/#/experiments/{store['b']['exp_id']}/runs/{store['b']['runs'][1]}"
    ko = df[(df["policy"] == "none") & (df["strategy"] == "knockoff") & (df["budget"] == 200)].iloc[0]
    assert ko["seeds"] == 2 and ko["fidelity_std"] == pytest.approx(0.0283, abs=1e-3)
    assert len(ko["run_ids"].split(";")) == 2
    data = (store["out"] / "leaderboard.json").read_text()
    assert '"ranked_at": 200' in data and "NaN" not in data


def test_links_default_to_the_tracking_server(store):
    lb, md = store["lb"], store["lb"].markdown.read_text()
    assert lb.ui_url == store["uri"]
    run = store["b"]["runs"][1]
    assert f"[s0]({store['uri']}/#/experiments/{store['b']['exp_id']}/runs/{run})" in md
    assert f"[lb-b]({store['uri']}/#/experiments/{store['b']['exp_id']}/runs/{store['b']['parent']})" in md
    assert "utility under `topk:1` 0.8500 (accuracy of the API's labels), KL(victim posterior ‖ answers) 0.2500 nats" \
        in md  # what the defense costs, in the task's caption
    assert "fidelity@200 ◀" in md and "0.7000 (2)" in md
    assert all(p.exists() and p.suffix == ".png" for p in lb.plots) and len(lb.plots) == 2
    assert f"![fidelity vs budget]({lb.plots[0].name})" in md


def test_html_references_only_local_files(store):
    page = store["lb"].html.read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 2
    for src in srcs:
        assert "://" not in src and not src.startswith("/") and (store["out"] / src).is_file()
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(h.startswith(f"{store['uri']}/#/experiments/") for h in hrefs)  # links, not resources


def test_explicit_ui_url_and_run_ids_without_a_server(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    lb = leaderboard.build_leaderboard(tmp_path, [store["experiment"]], ui_url="https://ui.example/mlflow/")
    run = store["b"]["runs"][1]
    assert f"(https://ui.example/mlflow/#/experiments/{store['b']['exp_id']}/runs/{run})" in lb.markdown.read_text()
    assert leaderboard.default_ui_url("sqlite:////tmp/x.db") is None
    assert leaderboard.default_ui_url("https://user:secret@host:5000/") == "https://host:5000"


def test_cli_and_errors(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    parser = argparse.ArgumentParser()
    leaderboard.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["leaderboard", "--out", str(tmp_path / "lb"), "--experiment", store["experiment"]])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"leaderboard: {tmp_path / 'lb' / 'leaderboard.md'}" in out
    assert "lbv × none: 3 entries, ranked at budget 200; first: activethief (arch=resnet18) [lb-b]" in out
    with pytest.raises(DmeError, match="no MLflow experiment named"):
        leaderboard.build_leaderboard(tmp_path / "x", [f"missing-{uuid.uuid4().hex}"])
    empty = f"leaderboard-empty-{uuid.uuid4().hex[:8]}"
    tracking.client().create_experiment(empty)
    with pytest.raises(DmeError, match="scripts/quickstart.sh"):
        leaderboard.build_leaderboard(tmp_path / "y", [empty])


def test_default_reads_every_experiment(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    lb = leaderboard.build_leaderboard(tmp_path)
    assert {"lb-a", "lb-b"} <= {s.name for s in lb.sweeps}
    assert list(lb.tables[(VICTIM, "none")]["entry"]) == list(store["lb"].tables[(VICTIM, "none")]["entry"])


def test_the_attackers_targets_tell_entries_apart_and_default_for_older_runs(mlflow_server, tmp_path, monkeypatch):
    """Two sweeps alike but for ``attack.targets``: one run before the choice existed (no param: scores), one
    training on labels. Each is an entry labeled by its targets, and the CSV has the column."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = f"leaderboard-targets-{uuid.uuid4().hex[:8]}"
    f = {"arch": "cnn32", "optimizer": "adam", "policy": "modelguard-w", "strategy": "random", "budget": 100, "seed": 0}
    _sweep(experiment, "lb-scores", [(f, _m(0.15))])
    _sweep(experiment, "lb-labels", [({**f, "targets": "labels"}, _m(0.45))])
    lb = leaderboard.build_leaderboard(tmp_path, [experiment])
    table = lb.tables[(VICTIM, "modelguard-w")]
    assert list(table["entry"]) == ["random (targets=labels)", "random (targets=scores)"]
    assert list(pd.read_csv(tmp_path / "leaderboard.csv")["targets"]) == ["labels", "scores"]


def test_no_budget_shared_by_all_ranks_where_most_entries_are():
    """Without a budget every entry reached: the budget most entries reached (the larger among equals); the others
    are listed after the ranked ones, unranked."""
    have = {"a": {100, 200}, "b": {500}, "c": {200, 500}}
    assert leaderboard._rank_budget(have)[0] == 500
    assert leaderboard._rank_budget({"a": {100, 200}, "b": {200, 400}})[0] == 200
    rows = []
    for strategy, budgets in (("a", (100, 200)), ("b", (500,)), ("c", (200, 500))):
        for budget in budgets:
            rows.append({"sweep": "s", "experiment_id": "0", "parent_run_id": "p", "run_id": f"{strategy}{budget}",
                         **{k: None for k in leaderboard.ATTACKER}, "strategy": strategy, "victim": VICTIM,
                         "policy": "none", "budget": budget, "seed": 0, "fidelity": 0.5 if strategy == "b" else 0.6,
                         **{k: 0.5 for k in leaderboard.SHOWN}})
    df = pd.DataFrame(rows)
    df["entry_id"] = df["strategy"]
    task, csv = leaderboard._task(VICTIM, "none", df, None)
    assert task.rank_budget == 500 and "no budget is shared" in task.note
    assert list(task.table["entry"]) == ["c", "b", "a"] and list(task.table["rank"])[:2] == [1, 2]
    assert pd.isna(task.table["rank"].iloc[2]) and task.table["run_ids"].iloc[2] == []
    assert csv["rank"].isna().sum() == 2 and list(csv["run_urls"].iloc[0]) == []  # a's two budgets; no ui: no urls
