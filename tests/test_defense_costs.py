"""The defender's-side cache: a second sweep on the same bundle, kits and code reads the costs the first measured,
and anything that decides them (the bundle, the policy, a kit, the code) names another entry."""

import json
import os

import pytest

from distributed_me.defenses import costs


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache of its own; the session's home keeps the embedded victim (trained once) and MLflow store."""
    monkeypatch.setattr(costs, "costs_dir", lambda: tmp_path / "defense-costs")
    return tmp_path


def test_the_key_changes_with_everything_that_decides_the_cost(home, monkeypatch):
    bundle = home / "victim.pt"
    bundle.write_bytes(b"weights")
    kit = home / "kit"
    kit.mkdir()
    (kit / "surrogate.pt").write_bytes(b"kit")
    key = costs.cost_key(str(bundle), "mad:epsilon=1", [str(kit)])
    assert key == costs.cost_key(str(bundle), "mad:epsilon=1", [str(kit)])
    assert key != costs.cost_key(str(bundle), "mad:epsilon=2", [str(kit)])
    st = bundle.stat()
    os.utime(bundle, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained in place
    moved = costs.cost_key(str(bundle), "mad:epsilon=1", [str(kit)])
    assert moved != key
    (kit / "surrogate.pt").write_bytes(b"rebuilt kit")
    assert costs.cost_key(str(bundle), "mad:epsilon=1", [str(kit)]) != moved
    monkeypatch.setattr(costs, "code_stamp", lambda: "other code")
    assert costs.cost_key(str(bundle), "probabilities", []) != key


def test_entries_round_trip_and_a_broken_one_is_measured_again(home):
    cost = {"utility": 0.9, "agreement": 0.95, "kl_test": 0.1, "kl_train": None}
    costs.save_cost("abc", cost, "probabilities")
    assert costs.load_cost("abc") == cost
    (costs.costs_dir() / "abc.json").write_text("{not json")
    assert costs.load_cost("abc") is None
    (costs.costs_dir() / "abc.json").write_text(json.dumps({"utility": 1.0}))
    assert costs.load_cost("abc") is None
    assert costs.load_cost("never-written") is None


def test_a_second_sweep_reads_the_defenders_side_the_first_measured(home, monkeypatch):
    from mlflow import MlflowClient

    import distributed_me.runner as runner_mod
    from distributed_me.sweep import tracking
    from distributed_me.sweep.runner import prepare_defenses
    from distributed_me.sweep.spec import parse_sweep
    from distributed_me.victims import victim_bundle_path

    tracking._client.cache_clear()
    spec = parse_sweep({"name": "dc", "experiment": "test-dc", "pool": "photos",
                        "victims": [{"name": "digits", "source": "embedded"}],
                        "policies": ["probabilities", "label", "reverse_sigmoid:beta=1.0:gamma=0.1"],
                        "attack": {"strategy": "random", "budget": 10, "arch": "tiny_cnn", "epochs": 1}})
    bundles = {"digits": str(victim_bundle_path("embedded"))}
    measured = []
    real = runner_mod.evaluator_for
    monkeypatch.setattr(runner_mod, "evaluator_for", lambda v: measured.append(1) or real(v))
    parent = tracking.start_parent("test-dc", "dc", {"name": "dc"}, {}, None)
    first = prepare_defenses(spec, bundles, parent)
    assert measured == [1] and set(first) == {f"digits|{p}" for p in spec.policies}
    assert first["digits|probabilities"]["utility"] > 0.5 and first["digits|label"]["kl_test"] > 0

    parent2 = tracking.start_parent("test-dc", "dc2", {"name": "dc2"}, {}, None)
    assert prepare_defenses(spec, bundles, parent2) == first
    assert measured == [1]  # read from disk: no judge loaded, nothing measured
    logged = MlflowClient().get_run(parent2).data.metrics  # the parent run has them all the same
    assert logged["defense.digits.1.kl_test"] == pytest.approx(first["digits|label"]["kl_test"])

    st = os.stat(bundles["digits"])  # the victim retrained in place: measured again
    os.utime(bundles["digits"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert prepare_defenses(spec, bundles, parent2) == first
    assert measured == [1, 1]
