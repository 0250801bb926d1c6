"""The attacker's drop in `dme report`: each defended trial paired with the undefended one that differs only in the
policy (same seed, budget, strategy), on hand-made rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from distributed_me.report import summary, with_drops


def _rows() -> pd.DataFrame:
    rows = []
    for seed, base in ((0, 0.80), (1, 0.70)):
        for policy, cut in (("probabilities", 0.0), ("cip", 0.30), ("dp", 0.05)):
            rows.append({"victim": "v", "policy": policy, "pool": "p", "strategy": "knockoff", "budget": 1000,
                         "arch": "cnn32", "optimizer": "adam", "lr": np.nan, "epochs": 10, "seed": seed,
                         "fidelity": base - cut, "accuracy": base - 0.1 - cut / 2, "victim_utility": 0.9})
    rows.append({**rows[-1], "policy": "am", "budget": 4000, "fidelity": 0.5})  # no undefended twin at 4000
    return pd.DataFrame(rows)


def test_each_defended_trial_is_paired_with_its_undefended_twin():
    df = with_drops(_rows())
    got = df.set_index(["policy", "seed", "budget"])
    assert got.loc[("cip", 0, 1000), "fidelity_drop"] == pytest.approx(0.30)
    assert got.loc[("cip", 1, 1000), "accuracy_drop"] == pytest.approx(0.15)
    assert got.loc[("dp", 1, 1000), "fidelity_drop"] == pytest.approx(0.05)
    assert got.loc[("probabilities", 0, 1000), "fidelity_drop"] == pytest.approx(0.0)
    assert np.isnan(got.loc[("am", 1, 4000), "fidelity_drop"])
    table = summary(df).set_index(["policy", "budget"])
    assert table.loc[("cip", 1000), "fidelity_drop"] == pytest.approx(0.30)


def test_a_sweep_without_the_undefended_api_gets_no_drop_columns():
    df = _rows()
    assert "fidelity_drop" not in with_drops(df[df["policy"] != "probabilities"])


def test_the_tradeoff_curve_never_pools_budgets():
    """A grid that runs one policy at a budget the others skip (``exclude:``) must not rank that policy by its budget:
    each point averages seeds at one budget only."""
    from distributed_me.report import tradeoff_points

    points = tradeoff_points(_rows()).set_index(["budget", "strategy", "policy"])
    assert points.loc[(1000, "knockoff", "cip"), "fidelity"] == pytest.approx((0.50 + 0.40) / 2)
    assert points.loc[(4000, "knockoff", "am"), "fidelity"] == pytest.approx(0.5)
    assert (1000, "knockoff", "am") not in points.index
    assert len(points) == 4
