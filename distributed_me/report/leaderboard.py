"""``dme leaderboard``: every finished sweep in MLflow, as one ranked table per task — results as data, in the manner
of RobustBench (its ``leaderboard/template.py`` renders tables from result files; here the results are MLflow runs).

What is read. Every sweep parent run (tag ``dme.kind = sweep``) with status FINISHED in the given experiments (default:
all active ones); when a sweep name was run more than once, only its newest FINISHED run counts (start time), so a
re-run replaces its predecessor instead of doubling it. A RUNNING, FAILED or KILLED sweep is left out: its grid is
incomplete and a partial grid would be ranked at budgets it never finished. Of each sweep, its FINISHED child runs
(trials); a trial that finished twice (same ``dme.trial_key``, e.g. around a resume) counts once, newest first.
Params are the factors of :data:`~distributed_me.extraction.FACTORS` (a param a run lacks, e.g. a factor added after
it ran, is absent: ``None``), metrics are :data:`~distributed_me.extraction.METRIC_NAMES`.

What is ranked. A *task* is a victim under an output policy (victim × defense). An *entry* is one attack
configuration from one named sweep: the strategy plus every other attacker factor (all factors except victim, policy,
budget and seed — so a ``pool`` factor joins by itself) and the attacker's choices (:data:`CHOICES`, e.g. training
on scores or labels). An entry's label names the strategy and those factors that
differ between the task's entries. Per budget an entry shows its mean fidelity over seeds and the seed count.

Matched budgets. Entries are ranked by mean fidelity at the *ranking budget*: the largest budget every entry of the
task reached. When no budget is shared by all, the budget reached by the most entries (the largest among equals) is
used and entries without it are listed after the ranked ones, unranked (rank empty). Fidelities equal at the shown
precision (4 decimals) share a rank ("1, 1, 3"); within a rank, higher piracy accuracy is listed first. Beside
fidelity: piracy accuracy and adversarial fidelity at the ranking budget, and per task the victim's accuracy and its
utility under the policy (accuracy of the labels the API returns).

Links. Each entry links to its runs at the ranking budget and to its sweep's parent run, as
``{ui_url}/#/experiments/{id}/runs/{run_id}``; ``ui_url`` defaults to the tracking URI when it is an http(s) server
(credentials stripped: the page may be published), otherwise the page shows run ids.

Outputs in ``out_dir``: ``leaderboard.md``, ``leaderboard.html`` (static and self-contained: inline CSS, no script,
images by relative path), ``leaderboard.csv`` (one row per entry × budget), ``leaderboard.json`` (the same, nested by
task) and one ``fidelity_<victim>__<policy>.png`` per task (fidelity vs budget, one line per entry).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from ..errors import DmeError
from ..extraction import CHOICES, FACTORS, METRIC_NAMES
from ..tracking import tracking_uri
from .runs import finished_trials, search_all, trial_row

log = logging.getLogger(__name__)

#: the factors that make an attack configuration (an entry): all but the task's and the matched/averaged ones
ATTACKER: tuple[str, ...] = (*(f for f in FACTORS if f not in ("victim", "policy", "budget", "seed")), *CHOICES)
SHOWN = ("accuracy", "adversarial_fidelity", "victim_accuracy", "victim_utility")
NO_SWEEP_HINT = ("run `bash scripts/quickstart.sh` (or `dme sweep SPEC`) first, or set MLFLOW_TRACKING_URI to the "
                 "store your sweeps used")


@dataclass
class Sweep:
    """The parent run that represents one sweep name."""

    name: str
    experiment_id: str
    run_id: str
    start_time: int
    trials: int = 0


@dataclass
class Task:
    victim: str
    policy: str
    rank_budget: int
    budgets: list[int]
    note: str
    victim_accuracy: float
    victim_utility: float
    table: pd.DataFrame  # one row per entry, ranked: rank, entry, sweep, fidelity@B, n@B…, accuracy, …, run_ids
    plot: Path | None = None
    victim_kl: float | None = None  # the defense's distortion (runs from before victim_kl existed: None)


@dataclass
class Leaderboard:
    tasks: list[Task]
    rows: pd.DataFrame  # the CSV: one row per entry × budget
    sweeps: list[Sweep]
    markdown: Path
    html: Path
    csv: Path
    json: Path
    ui_url: str | None
    plots: list[Path] = field(default_factory=list)

    @property
    def tables(self) -> dict[tuple[str, str], pd.DataFrame]:
        return {(t.victim, t.policy): t.table for t in self.tasks}


def default_ui_url(uri: str | None = None) -> str | None:
    """The tracking URI when it is an http(s) server (it serves the UI too), without credentials; else ``None``."""
    parts = urlsplit(uri or tracking_uri())
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def run_url(ui_url: str | None, experiment_id: str, run_id: str) -> str | None:
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if ui_url else None


def _experiment_ids(c: Any, names: list[str] | None) -> list[str]:
    if not names:
        ids, token = [], None
        while True:
            page = c.search_experiments(page_token=token)
            ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                return ids
    ids = []
    for n in names:
        exp = c.get_experiment_by_name(n)
        if exp is None:
            known = ", ".join(sorted(e.name for e in c.search_experiments())) or "none"
            raise DmeError(f"no MLflow experiment named {n!r} in {tracking_uri()} (experiments there: {known}); "
                           f"drop --experiment to read all of them")
        ids.append(exp.experiment_id)
    return ids


def finished_sweeps(c: Any, exp_ids: list[str]) -> list[Sweep]:
    """The newest FINISHED parent run of each sweep name in these experiments."""
    parents = search_all(c, exp_ids, "tags.`dme.kind` = 'sweep' and attributes.status = 'FINISHED'",
                      ["attributes.start_time DESC"]) if exp_ids else []
    newest: dict[str, Sweep] = {}
    for r in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        name = r.data.tags.get("dme.sweep")
        if name and name not in newest:
            newest[name] = Sweep(name, r.info.experiment_id, r.info.run_id, r.info.start_time or 0)
        elif name:
            log.info("sweep %r: older run %s superseded by %s", name, r.info.run_id, newest[name].run_id)
    return sorted(newest.values(), key=lambda s: s.name)


def trial_rows(c: Any, sweeps: list[Sweep]) -> pd.DataFrame:
    """One row per FINISHED trial of these sweeps: sweep, run, factor params (strings, ``None`` if absent), metrics."""
    rows = []
    for s in sweeps:
        runs = finished_trials(c, s.experiment_id, s.run_id)
        rows += [{"sweep": s.name, "experiment_id": s.experiment_id, "parent_run_id": s.run_id, **trial_row(r)}
                 for r in runs]
        s.trials = len(runs)
    df = pd.DataFrame(rows, columns=["sweep", "experiment_id", "parent_run_id", "run_id", *FACTORS, *CHOICES,
                                     *METRIC_NAMES])
    df["budget"] = pd.to_numeric(df["budget"], errors="coerce")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce")
    bad = df["budget"].isna() | df["victim"].isna() | df["policy"].isna() | df["strategy"].isna()
    if bad.any():
        log.warning("%d trial runs without a victim, policy, strategy or numeric budget param: left out", bad.sum())
    df = df[~bad].copy()
    df["budget"] = df["budget"].astype(int)
    df["entry_id"] = [json.dumps([r["sweep"], *[r[k] for k in ATTACKER]]) for _, r in df.iterrows()]
    return df


def _label(r: pd.Series, differing: list[str]) -> str:
    extra = [f"{k}={r[k]}" for k in differing if not pd.isna(r[k])]
    return f"{r['strategy']} ({', '.join(extra)})" if extra else str(r["strategy"])


def _rank_budget(have: dict[str, set[int]]) -> tuple[int, str]:
    """The largest budget all entries share; else the one most entries reached (largest among equals)."""
    shared = set.intersection(*have.values())
    n = len(have)
    if shared:
        return max(shared), f"the largest budget all {n} entries share" if n > 1 else "the entry's largest budget"
    counts = pd.Series([b for bs in have.values() for b in bs]).value_counts()
    best = max(b for b, k in counts.items() if k == counts.max())
    return int(best), (f"no budget is shared by all {n} entries: ranked at the budget {counts[best]} of them "
                       f"reached; the others are listed unranked")


def _task(victim: str, policy: str, df: pd.DataFrame, ui_url: str | None) -> tuple[Task, pd.DataFrame]:
    """The ranked table of one task and its rows of the CSV."""
    firsts = df.drop_duplicates("entry_id").set_index("entry_id")
    differing = [k for k in ATTACKER if k != "strategy" and firsts[k].astype(str).nunique() > 1]
    labels = {e: _label(r, differing) for e, r in firsts.iterrows()}
    g = df.sort_values(["seed", "run_id"]).groupby(["entry_id", "budget"])
    agg = g["fidelity"].agg(fidelity="mean", fidelity_std="std", seeds="count")
    agg = agg.join(g[list(SHOWN)].mean()).join(g["run_id"].agg(list).rename("run_ids"))
    agg = agg[agg["seeds"] > 0].reset_index()
    have = {e: set(x["budget"]) for e, x in agg.groupby("entry_id")}
    budgets = sorted({b for bs in have.values() for b in bs})
    rank_budget, note = _rank_budget(have)
    at = agg[agg["budget"] == rank_budget].set_index("entry_id")
    ranked = at["fidelity"].round(4).rank(method="min", ascending=False)
    table = pd.DataFrame({"entry_id": list(have)})
    table["rank"] = pd.array([ranked.get(e) for e in table["entry_id"]], dtype="Int64")
    table["entry"] = table["entry_id"].map(labels)
    table["sweep"] = table["entry_id"].map(firsts["sweep"])
    wide = agg.pivot(index="entry_id", columns="budget", values=["fidelity", "seeds"])
    for b in budgets:
        table[f"fidelity@{b}"] = table["entry_id"].map(wide[("fidelity", b)])
        table[f"n@{b}"] = table["entry_id"].map(wide[("seeds", b)]).astype("Int64")
    for k in ("accuracy", "adversarial_fidelity"):
        table[k] = table["entry_id"].map(at[k])
    table["run_ids"] = [at["run_ids"].get(e, []) for e in table["entry_id"]]
    table["experiment_id"] = table["entry_id"].map(firsts["experiment_id"])
    table["parent_run_id"] = table["entry_id"].map(firsts["parent_run_id"])
    table["_acc"] = table["accuracy"].fillna(-1.0)
    table = table.sort_values(["rank", "_acc", "entry", "sweep"], ascending=[True, False, True, True],
                              na_position="last").drop(columns="_acc").reset_index(drop=True)
    csv = agg.assign(victim=victim, policy=policy, ranked_at=rank_budget)
    csv["rank"] = csv["entry_id"].map(dict(zip(table["entry_id"], table["rank"]))).astype("Int64")
    csv["entry"] = csv["entry_id"].map(labels)
    for k in ("sweep", "experiment_id", *ATTACKER):
        csv[k] = csv["entry_id"].map(firsts[k])
    csv["run_urls"] = [[run_url(ui_url, x, r) for r in rs] if ui_url else [] for x, rs in
                       zip(csv["experiment_id"], csv["run_ids"])]
    order = {e: i for i, e in enumerate(table["entry_id"])}
    csv = csv.sort_values(["entry_id", "budget"], key=lambda s: s.map(order) if s.name == "entry_id" else s)
    kl = float(df["victim_kl"].mean()) if "victim_kl" in df and df["victim_kl"].notna().any() else None
    task = Task(victim, policy, rank_budget, budgets, note, float(df["victim_accuracy"].mean()),
                float(df["victim_utility"].mean()), table, victim_kl=kl)
    return task, csv


def _plot(task: Task, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for _, r in task.table.iterrows():
        bs = [b for b in task.budgets if not pd.isna(r[f"fidelity@{b}"])]
        ax.plot(bs, [r[f"fidelity@{b}"] for b in bs], marker="o", label=f"{r['entry']} [{r['sweep']}]")
    ax.axvline(task.rank_budget, color="grey", linestyle="--", linewidth=1)
    if task.budgets[-1] >= 10 * task.budgets[0]:
        ax.set_xscale("log")
    ax.set(xlabel="query budget (dashed: ranking budget)", ylabel="fidelity (mean over seeds)", ylim=(0, 1.02),
           title=f"{task.victim} × {task.policy}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(v: Any) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.4f}"


def _cells(task: Task, ui_url: str | None) -> tuple[list[str], list[list[tuple[str, str | None]]]]:
    """Header and rows of a task's table as (text, link) cells: rendered to Markdown and HTML alike."""
    head = ["rank", "attack", "sweep", *[f"fidelity@{b}" + (" ◀" if b == task.rank_budget else "")
                                         for b in task.budgets], "accuracy", "adv. fidelity", "runs"]
    rows = []
    for _, r in task.table.iterrows():
        runs = [(f"s{i}" if ui_url else rid[:8], run_url(ui_url, r["experiment_id"], rid))
                for i, rid in enumerate(r["run_ids"])]
        rows.append([("" if pd.isna(r["rank"]) else str(r["rank"]), None), (r["entry"], None),
                     (r["sweep"], run_url(ui_url, r["experiment_id"], r["parent_run_id"])),
                     *[(_num(r[f"fidelity@{b}"]) + ("" if pd.isna(r[f"n@{b}"]) else f" ({r[f'n@{b}']})"), None)
                       for b in task.budgets],
                     (_num(r["accuracy"]), None), (_num(r["adversarial_fidelity"]), None), *runs])
    return head, rows


def _md_cell(text: str, href: str | None) -> str:
    text = text.replace("|", "\\|")
    return f"[{text}]({href})" if href else text


def _intro(sweeps: list[Sweep], ui_url: str | None) -> str:
    links = "links open the runs in the MLflow UI" if ui_url else "runs are given by the first 8 characters of their id"
    n, trials = len(sweeps), sum(s.trials for s in sweeps)
    return (f"Read from {n} finished sweep{'s' * (n != 1)} ({trials} finished trials) in MLflow on "
            f"{time.strftime('%Y-%m-%d %H:%M')}. One table per task (victim × output policy); attacks ranked by "
            f"fidelity (agreement with the victim) at a matched query budget, marked ◀. Cells: mean over seeds "
            f"(number of seeds). Ties at 4 decimals share a rank. Runs at the ranking budget are listed; {links}. "
            f"Results as data: `leaderboard.csv`, `leaderboard.json`.")


def _caption(t: Task) -> str:
    kl = "" if t.victim_kl is None else f", KL(victim posterior ‖ answers) {_num(t.victim_kl)} nats"
    return (f"victim accuracy {_num(t.victim_accuracy)}, utility under `{t.policy}` {_num(t.victim_utility)} "
            f"(accuracy of the API's labels){kl}. Ranked at budget {t.rank_budget}: {t.note}.")


def _markdown(tasks: list[Task], sweeps: list[Sweep], ui_url: str | None) -> str:
    out = ["# Model-extraction leaderboard", "", _intro(sweeps, ui_url), ""]
    for t in tasks:
        head, rows = _cells(t, ui_url)
        out += [f"## `{t.victim}` × `{t.policy}`", "", _caption(t), "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(_md_cell(*c) for c in r[:len(head) - 1]) + " | "
                + " ".join(_md_cell(*c) for c in r[len(head) - 1:]) + " |" for r in rows]
        out += ["", f"![fidelity vs budget]({t.plot.name})" if t.plot else "", ""]
    out += ["## Sweeps", "", "| sweep | experiment | parent run | trials |", "|---|---|---|---|"]
    out += [f"| {_md_cell(s.name, run_url(ui_url, s.experiment_id, s.run_id))} | {s.experiment_id} | {s.run_id} "
            f"| {s.trials} |" for s in sweeps]
    return "\n".join(out) + "\n"


def _h(text: str, href: str | None) -> str:
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>' if href else html.escape(text)


CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
       "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;"
       "text-align:left}th{background:#f3f3f3}tr:first-child td{font-weight:600}code{background:#f3f3f3}"
       "img{max-width:100%}")


def _html(tasks: list[Task], sweeps: list[Sweep], ui_url: str | None) -> str:
    code = lambda s: re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(s))
    out = ['<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Model-extraction leaderboard</title>',
           f"<style>{CSS}</style></head><body><h1>Model-extraction leaderboard</h1>",
           f"<p>{code(_intro(sweeps, ui_url))}</p>"]
    for t in tasks:
        head, rows = _cells(t, ui_url)
        out += [f"<h2><code>{html.escape(t.victim)}</code> × <code>{html.escape(t.policy)}</code></h2>",
                f"<p>{code(_caption(t))}</p><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{_h(*c)}</td>" for c in r[:len(head) - 1])
                + "<td>" + " ".join(_h(*c) for c in r[len(head) - 1:]) + "</td></tr>" for r in rows]
        out += ["</table>"] + ([f'<img src="{html.escape(t.plot.name)}" alt="fidelity vs budget">'] if t.plot else [])
    out += ["<h2>Sweeps</h2><table><tr><th>sweep</th><th>experiment</th><th>parent run</th><th>trials</th></tr>"]
    out += [f"<tr><td>{_h(s.name, run_url(ui_url, s.experiment_id, s.run_id))}</td><td>{s.experiment_id}</td>"
            f"<td>{s.run_id}</td><td>{s.trials}</td></tr>" for s in sweeps]
    return "\n".join(out + ["</table></body></html>"]) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v) or v is pd.NA:
        return None
    return v.item() if hasattr(v, "item") else v


def _slug(victim: str, policy: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"fidelity_{victim}__{policy}")
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name + ".png"


def build_leaderboard(out_dir: Path, experiments: list[str] | None = None, ui_url: str | None = None) -> Leaderboard:
    """Read every finished sweep of ``experiments`` (default: all) and write the leaderboard into ``out_dir``."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri())
    ui_url = ui_url.rstrip("/") if ui_url else default_ui_url()
    sweeps = finished_sweeps(c, _experiment_ids(c, experiments))
    df = trial_rows(c, sweeps) if sweeps else pd.DataFrame()
    where = f"experiments {', '.join(experiments)}" if experiments else "any experiment"
    if df.empty:
        raise DmeError(f"no finished sweep with finished trials in {where} of the MLflow store {tracking_uri()}; "
                       f"{NO_SWEEP_HINT}")
    sweeps = [s for s in sweeps if s.trials]
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks, parts, taken = [], [], set()
    for (victim, policy), g in df.groupby(["victim", "policy"], sort=True):
        task, rows = _task(str(victim), str(policy), g, ui_url)
        task.plot = _plot(task, out_dir / _slug(task.victim, task.policy, taken))
        tasks.append(task)
        parts.append(rows)
    cols = ["victim", "policy", "rank", "entry", "sweep", "experiment_id", *ATTACKER, "budget", "ranked_at", "seeds",
            "fidelity", "fidelity_std", *SHOWN, "run_ids", "run_urls"]
    rows = pd.concat(parts, ignore_index=True)[cols]
    paths = {k: out_dir / f"leaderboard.{k}" for k in ("md", "html", "csv", "json")}
    rows.assign(run_ids=rows["run_ids"].map(";".join), run_urls=rows["run_urls"].map(";".join)).to_csv(
        paths["csv"], index=False)
    paths["md"].write_text(_markdown(tasks, sweeps, ui_url))
    paths["html"].write_text(_html(tasks, sweeps, ui_url))
    data = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ui_url": ui_url,
            "sweeps": [vars(s) for s in sweeps],
            "tasks": [{"victim": t.victim, "policy": t.policy, "ranked_at": t.rank_budget, "note": t.note,
                       "victim_accuracy": _jsonable(t.victim_accuracy), "victim_utility": _jsonable(t.victim_utility),
                       "victim_kl": _jsonable(t.victim_kl), "plot": t.plot.name if t.plot else None,
                       "rows": [{k: _jsonable(v) for k, v in r.items() if k not in ("victim", "policy")}
                                for r in rows[(rows["victim"] == t.victim) & (rows["policy"] == t.policy)]
                                .to_dict("records")]} for t in tasks]}
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False))
    log.info("leaderboard of %d tasks from %d sweeps written to %s", len(tasks), len(sweeps), out_dir)
    return Leaderboard(tasks, rows, sweeps, paths["md"], paths["html"], paths["csv"], paths["json"], ui_url,
                       [t.plot for t in tasks if t.plot])


def add_parser(sub: Any, **kw: Any) -> argparse.ArgumentParser:
    """The ``leaderboard`` subcommand, for ``cli.build_parser`` to add to its subparsers (``kw``: its common
    parents and formatter)."""
    p = sub.add_parser("leaderboard", help="one ranked table per task (victim × policy) over every finished sweep in "
                                           "MLflow, as Markdown, HTML, CSV and JSON with plots", **kw)
    p.add_argument("--out", default="leaderboard", help="folder (default leaderboard/)")
    p.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment to read (repeatable; default: all)")
    p.add_argument("--ui-url", default=None, help="MLflow UI address for run links (default: the tracking URI when "
                                                  "it is an http server, else run ids are shown)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    lb = build_leaderboard(Path(args.out), args.experiment, args.ui_url)
    for t in lb.tasks:
        top = t.table.iloc[0]
        print(f"{t.victim} × {t.policy}: {len(t.table)} entries, ranked at budget {t.rank_budget}; first: "
              f"{top['entry']} [{top['sweep']}] fidelity {_num(top[f'fidelity@{t.rank_budget}'])}")
    print(f"\nleaderboard: {lb.markdown}\nhtml: {lb.html}\ndata: {lb.csv}, {lb.json}")
    return 0
