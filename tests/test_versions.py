"""Victim versions as a sweep factor: three registered versions of one victim (plain, AdvFT-protected, retrained),
named by version and by alias, swept in one sweep on real Ray, Serve and an MLflow server, and the report's
per-version table (MEBench Tables 15-16) checked against the versions' own answers."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow_server]


def _three_versions(tmp_path) -> list[str]:
    from mlflow import MlflowClient

    from distributed_me.defenses.advft import AdvFTConfig, protect_victim
    from distributed_me.tracking import tracking_uri
    from distributed_me.train import TrainConfig
    from distributed_me.victims import load_victim, register_victim, train_victim, victim_bundle_path

    v1 = register_victim(victim_bundle_path(None), "digits-versions")
    protected = protect_victim(load_victim(v1), AdvFTConfig(epochs=1, gen_steps=2, model_steps=3, batch_size=32,
                                                            ngf=8), out=tmp_path / "advft")
    v2 = register_victim(protected.path, "digits-versions")
    _, path = train_victim("digits", "tiny_cnn", tmp_path / "retrained", TrainConfig(epochs=2, batch_size=64),
                           progress=False)
    v3 = register_victim(path, "digits-versions")
    assert [v1, v2, v3] == [f"models:/digits-versions/{i}" for i in (1, 2, 3)]
    MlflowClient(tracking_uri()).set_registered_model_alias("digits-versions", "protected", "2")
    return [v1, "models:/digits-versions@protected", v3]


def test_a_sweep_over_three_versions_reports_each_against_the_previous(sweep_env, tmp_path):
    from distributed_me.report import write_report
    from distributed_me.serving.runtime import shutdown
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep
    from distributed_me.victims import load_victim, victim_test_split
    from distributed_me.victims.store import canonical_model_uri

    sources = _three_versions(tmp_path)
    assert canonical_model_uri(sources[1]) == "models:/digits-versions/2"
    doc = {"name": "versions", "experiment": "test-sweeps", "pool": "photos", "pool_options": {"n": 2000},
           "victims": [{"name": f"v{i + 1}", "source": s} for i, s in enumerate(sources)],
           "policies": ["probabilities"], "attack": {"strategy": "random", "budget": 80, "arch": "tiny_cnn",
                                                     "epochs": 2, "seed": 0},
           "adv_eval_samples": 20, "resources": {"cpus_per_trial": 1}, "retries": 0}
    try:
        out = run_sweep(parse_sweep(doc), num_cpus=2)
    finally:
        shutdown()
    assert out.errors == [] and len(out.rows) == 3
    report = write_report("versions", out=tmp_path / "report")
    table = report.versions
    assert table is not None and list(table["version"]) == [1, 2, 3] and list(table["victim"]) == ["v1", "v2", "v3"]
    probs = {}
    for i, s in enumerate(sources):
        victim = load_victim(s)
        x, y = victim_test_split(victim)
        probs[i] = victim.predict_probs(x).numpy(), y.numpy()
    for i in (1, 2):
        (p, y), (q, _) = probs[i], probs[i - 1]
        row = table.iloc[i]
        assert row["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
        assert row["same_class"] == pytest.approx((p.argmax(1) == q.argmax(1)).mean())
        assert row["confidence_change"] == pytest.approx(np.abs(p.max(1) - q.max(1)).mean(), abs=1e-6)
        qc, pc = np.clip(q, 1e-12, None), np.clip(p, 1e-12, None)
        assert row["kl_test"] == pytest.approx((qc * (np.log(qc) - np.log(pc))).sum(1).mean(), rel=1e-4)
        assert row["fidelity_change"] == pytest.approx(row["fidelity"] - table.iloc[i - 1]["fidelity"])
    assert np.isnan(table.iloc[0].get("same_class", np.nan))
    assert "## Victim versions" in report.markdown.read_text() and (tmp_path / "report" / "versions.csv").exists()
