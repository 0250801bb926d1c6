"""Paper parity in ``dme report``: ours beside the paper's values for the table a sweep reproduces. MLflow only.

The table comes from the sweep spec logged with the sweep's parent run (artifact ``sweep.json``, written by
``sweep/tracking.py::start_parent``), so a report needs nothing but the MLflow store; a sweep without a ``paper:``
section gets no parity section. The comparison itself is :func:`distributed_me.parity.compare` (MEBench paper 004
Table 3, SwiftTheft paper 003 Fig. 3 / Tables 2 and 4 are the shipped tables); this module only reads, formats and
plots it: ``parity.csv`` (one row per paper cell), ``parity_orderings.csv`` (one row per ordering group),
``parity.png``, a Markdown section and the text printed by the CLI.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from ..errors import explain_validation_error
from ..parity import SCALE, PaperTable, ParityResult, units_for

log = logging.getLogger(__name__)

SPEC_ARTIFACT = "sweep.json"
CSV = "parity.csv"
ORDERINGS_CSV = "parity_orderings.csv"
PLOT = "parity.png"
HOLDS = {True: "yes", False: "NO", None: "n/a"}


def stored_spec(client: Any, run_id: str, purpose: str) -> dict | None:
    """The sweep spec stored with parent run ``run_id`` (``None``, logged with ``purpose``, when there is none: a
    sweep from before specs were logged)."""
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(run_id, SPEC_ARTIFACT, d)
            doc = json.loads(Path(path).read_text())
        except Exception as e:  # MLflow raises several types for a missing artifact; the report goes on without
            log.warning("no %s on the sweep's parent run %s (%s): no %s", SPEC_ARTIFACT, run_id, e, purpose)
            return None
    return doc if isinstance(doc, dict) else None


def paper_table(client: Any, run_id: str) -> PaperTable | None:
    """The ``paper`` section of the spec stored with parent run ``run_id``, or ``None`` (no section, no artifact —
    a sweep from before specs were logged — or a section that no longer validates; the last two are logged)."""
    doc = stored_spec(client, run_id, "paper parity section")
    paper = doc.get("paper") if doc else None
    if not paper:
        return None
    try:
        return PaperTable.model_validate(paper)
    except ValidationError as e:
        log.warning("the paper section stored with run %s does not validate, no parity section:\n%s", run_id,
                    explain_validation_error(e, "paper"))
        return None


def _num(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _diff(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:+.2f}"


def cell_frame(result: ParityResult) -> pd.DataFrame:
    """The table shown in the text and Markdown: paper, ours, ours - paper, all in the cell's unit."""
    rows = []
    for r in result.cells:
        c = r.cell
        ours = _num(r.ours) + (f" ± {_num(r.ours_std)}" if r.n > 1 else "")
        rows.append({"cell": r.label, "metric": c.metric, "unit": c.unit, "paper": _num(c.value), "ours": ours,
                     "ours - paper": _diff(r.diff), "tolerance": _num(c.tolerance), "status": r.status,
                     "trials": r.n})
    return pd.DataFrame(rows)


def _ordering_lines(result: ParityResult) -> list[str]:
    out = []
    for g in result.groups:
        out.append(f"{g.label}: paper {g.paper_ranking()}; ours {g.our_ranking()}; {g.concordant} of {g.compared} "
                   f"pairs concordant; holds: {HOLDS[g.holds]}")
    return out


def parity_text(result: ParityResult) -> str:
    """The parity section of the printed report."""
    t = result.table
    lines = [f"Paper parity: {t.source}", cell_frame(result).to_string(index=False)]
    if result.groups:
        lines += ["", "Orderings (pairs the paper orders by more than its tie; concordant: ours in the same order):",
                  *[f"  {s}" for s in _ordering_lines(result)]]
    lines += ["", result.summary()]
    return "\n".join(lines)


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def parity_markdown(result: ParityResult, plot: Path | None) -> str:
    """The parity section of ``report.md``."""
    t = result.table
    df = cell_frame(result)
    df["source"] = [r.cell.source for r in result.cells]
    lines = [f"## Paper parity: {t.source}", ""]
    if t.note:
        lines += [t.note, ""]
    lines += [_md_row(list(df.columns)), "|" + "---|" * len(df.columns),
              *[_md_row(list(r)) for r in df.itertuples(index=False)], ""]
    if result.groups:
        lines += [("Orderings: the paper's ranking of the cells that differ in one factor, pairs closer than the "
                   "ordering's tie counted as comparable (not checked); a compared pair is concordant when ours "
                   "differ in the same direction."), "",
                  _md_row(["group", "paper", "ours", "concordant / compared", "holds"]), "|---|---|---|---|---|"]
        lines += [_md_row([g.label, g.paper_ranking(), g.our_ranking(), f"{g.concordant} / {g.compared}",
                           HOLDS[g.holds]]) for g in result.groups]
        lines.append("")
    lines += [f"**{result.summary()}**. Rows in `{CSV}`" + (f" and `{ORDERINGS_CSV}`." if result.groups else "."), ""]
    if plot is not None:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    return "\n".join(lines)


def _plot(result: ParityResult, path: Path) -> Path:
    """One panel per metric: the paper's values with their tolerance, ours with the std over matching trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r.cell.metric for r in result.cells))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.9 * len(result.cells) + 2), 3.6 * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        rs = [r for r in result.cells if r.cell.metric == metric]
        show = 100.0 if "percent" in units_for(metric) else 1.0  # scores in percent, times and counts as they are
        x = list(range(len(rs)))
        paper = [r.cell.paper_native() * show for r in rs]
        tol = [r.cell.tolerance / SCALE[r.cell.unit] * show for r in rs]
        ours = [r.ours / SCALE[r.cell.unit] * show for r in rs]
        std = [0.0 if math.isnan(r.ours_std) else r.ours_std / SCALE[r.cell.unit] * show for r in rs]
        ax.errorbar([i - 0.1 for i in x], paper, yerr=tol, fmt="s", capsize=4, label="paper (± tolerance)")
        ax.errorbar([i + 0.1 for i in x], ours, yerr=std, fmt="o", capsize=4, label="ours (± std over trials)")
        for i, r in zip(x, rs, strict=True):
            if r.missing:
                ax.annotate("missing", (i, paper[i]), xytext=(6, -12), textcoords="offset points", fontsize=8)
        ax.set_xticks(x, [r.label.replace(", ", "\n") for r in rs], fontsize=7)
        ax.set(ylabel=f"{metric} ({'%' if show == 100.0 else units_for(metric)[0]})", xlim=(-0.6, len(rs) - 0.4))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"paper parity: {result.table.source}"[:110], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_parity(result: ParityResult, out: Path) -> Path:
    """Write ``parity.csv`` (and ``parity_orderings.csv`` when the table has orderings) into ``out``; returns the
    plot ``parity.png``."""
    pd.DataFrame(result.cell_records()).to_csv(out / CSV, index=False, float_format="%.6g")
    if result.groups:
        pd.DataFrame(result.group_records()).to_csv(out / ORDERINGS_CSV, index=False)
    return _plot(result, out / PLOT)
