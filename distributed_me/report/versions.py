"""Victims across versions: how an API's vulnerability moves from one registered version to the next (MEBench,
paper 004 §4.2, Tables 15-16).

A sweep whose victims include two or more versions of one registered model (sources ``models:/NAME/VERSION`` or
``models:/NAME@ALIAS``) gets one row per version and attack, in version order. MEBench's four columns are changes
from one year's API to the next: the attack's fidelity, the API's accuracy, the share of inputs whose predicted
class stayed the same ("Predicted Class"), and the mean change of the confidence scores ("Avg. Confidence"). Ours,
per version, on the victim's own test split:

- ``accuracy`` and ``mean_confidence`` (mean top-1 probability) of the API's undefended answers;
- ``fidelity`` and ``accuracy_attack``: the attack's mean over its trials against that version (all budgets and
  policies of the sweep pooled unless they differ, then one row each);
- against the previous version: ``fidelity_change``, ``accuracy_change``, ``same_class`` (share of test images
  with the same top-1 class) and ``confidence_change`` (mean absolute change of the top-1 probability; MEBench does
  not define its column further, this is our reading), and ``kl_test`` (mean KL(previous ‖ this) of the answers on
  the test split: AdvFT's KL_test, paper 002 §3, when the previous version is this one's parent).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..metrics import kl_divergence

log = logging.getLogger(__name__)

#: the attack's columns each row is grouped by besides the victim (those present with more than one value)
ATTACK_KEYS = ("strategy", "policy", "budget")


def versioned_victims(sources: dict[str, str]) -> dict[str, list[tuple[int, str]]]:
    """Registered name → ``[(version, sweep victim name), ...]`` in version order, for names with two or more."""
    from ..victims.store import parse_model_version

    groups: dict[str, list[tuple[int, str]]] = {}
    for victim, source in sources.items():
        parsed = parse_model_version(source)
        if parsed is not None:
            groups.setdefault(parsed[0], []).append((parsed[1], victim))
    return {k: sorted(v) for k, v in groups.items() if len(v) > 1}


def _answers(source: str) -> tuple[np.ndarray, np.ndarray]:
    """The undefended probabilities of a victim on its test split, and the labels."""
    from ..victims import load_victim, victim_test_split

    victim = load_victim(source)
    x, y = victim_test_split(victim)
    return victim.predict_probs(x).numpy(), y.numpy()


def version_table(df: pd.DataFrame, sources: dict[str, str],
                  answers: Any = _answers) -> pd.DataFrame | None:
    """The per-version table (module docstring), or ``None`` when the sweep has no two versions of one name."""
    groups = versioned_victims(sources)
    if not groups or "victim" not in df:
        return None
    keys = [k for k in ATTACK_KEYS if k in df and df[k].nunique() > 1]
    rows = []
    for name, versions in groups.items():
        prev = None
        for version, victim in versions:
            probs, labels = answers(sources[victim])
            api = {"accuracy": float((probs.argmax(1) == labels).mean()),
                   "mean_confidence": float(probs.max(1).mean())}
            if prev is not None:
                p_probs, p_api, p_fid = prev
                api.update(accuracy_change=api["accuracy"] - p_api["accuracy"],
                           same_class=float((probs.argmax(1) == p_probs.argmax(1)).mean()),
                           confidence_change=float(np.abs(probs.max(1) - p_probs.max(1)).mean()),
                           kl_test=kl_divergence(torch.from_numpy(p_probs), torch.from_numpy(probs)))
            trials = df[df["victim"] == victim]
            fid: dict[tuple, float] = {}
            for values, g in (trials.groupby(keys, dropna=False) if keys else [((), trials)]):
                values = values if isinstance(values, tuple) else (values,)
                fid[values] = float(g["fidelity"].mean())
                row = {"model": name, "version": version, "victim": victim, **dict(zip(keys, values)),
                       "trials": len(g), **api, "fidelity": fid[values],
                       "accuracy_attack": float(g["accuracy"].mean())}
                if prev is not None and values in p_fid:
                    row["fidelity_change"] = fid[values] - p_fid[values]
                rows.append(row)
            prev = (probs, api, fid)
    order = ["model", "version", "victim", *keys, "trials", "accuracy", "mean_confidence", "fidelity",
             "accuracy_attack", "fidelity_change", "accuracy_change", "same_class", "confidence_change", "kl_test"]
    out = pd.DataFrame(rows)
    return out[[c for c in order if c in out]]


__all__ = ["version_table", "versioned_victims"]
