"""The per-key detectors in a sweep's report: how often, and after how many queries, each detector flagged each
attack's key, beside its false-positive rate on benign clients (the sweep driver's measurement on the parent run).

Trials carry ``detection.DETECTOR.flagged`` (0/1) and ``detection.DETECTOR.queries`` (queries until the flag, absent
when never flagged); the parent run ``detection.VICTIM.POLICY_INDEX.DETECTOR.benign_fpr``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_FLAGGED = re.compile(r"^detection\.(.+)\.flagged$")


def detectors_in(df: pd.DataFrame) -> list[str]:
    return sorted(m.group(1) for c in df.columns if (m := _FLAGGED.match(c)) and df[c].notna().any())


def detection_table(df: pd.DataFrame, benign: list[tuple[str, str, str, float]] | None = None) -> pd.DataFrame:
    """One row per detector × policy × strategy × budget: trials, the share flagged, the median queries until the
    flag among flagged trials, and the detector's benign false-positive rate on that policy's deployments (mean over
    victims; ``benign`` from :func:`benign_rates`)."""
    rows = []
    keys = [k for k in ("policy", "strategy", "budget") if k in df]
    for name in detectors_in(df):
        flagged, queries = f"detection.{name}.flagged", f"detection.{name}.queries"
        for values, g in df.groupby(keys, dropna=False):
            row: dict[str, Any] = {"detector": name, **dict(zip(keys, values)), "trials": len(g),
                                   "flagged_rate": float(g[flagged].mean())}
            q = g[queries].dropna() if queries in g else pd.Series(dtype=float)
            row["median_queries_to_flag"] = float(q.median()) if len(q) else np.nan
            fprs = [r for _, p, d, r in benign or [] if d == name and p == row.get("policy")]
            row["benign_fpr"] = float(np.mean(fprs)) if fprs else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def benign_rates(parent: Any) -> list[tuple[str, str, str, float]]:
    """(victim, policy, detector, benign FPR) from the parent run's ``detection.VICTIM.INDEX.DETECTOR.benign_fpr``
    metrics, the policy index read back as its spec string from the ``dme.defense.VICTIM.INDEX`` tag."""
    tags, out = parent.data.tags, []
    for k, v in parent.data.metrics.items():
        m = re.match(r"^detection\.(.+)\.(\d+)\.([^.]+)\.benign_fpr$", k)
        if m:
            victim, index, detector = m.groups()
            out.append((victim, tags.get(f"dme.defense.{victim}.{index}", index), detector, float(v)))
    return out


def detection_curves(df: pd.DataFrame, path: Path) -> Path:
    """Per detector, the share of each attack's trials flagged by the time they had sent q queries (trials never
    flagged stay unflagged): how fast each detector catches each attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = detectors_in(df)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    top = float(df["budget"].max())
    grid = np.linspace(0, top, 200)
    for ax, name in zip(axes[0], names):
        col = f"detection.{name}.queries"
        for strategy, g in df.groupby("strategy"):
            at = g[col].to_numpy(dtype=float) if col in g else np.full(len(g), np.nan)
            share = [(np.nan_to_num(at, nan=np.inf) <= q).mean() for q in grid]
            ax.plot(grid, share, label=f"{strategy} ({len(g)} trials)")
        ax.set(xlabel="queries sent by the attacker's key", ylabel="share of trials flagged", ylim=(-0.02, 1.02),
               title=f"detector {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
