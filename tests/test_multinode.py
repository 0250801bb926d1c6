"""A sweep on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and three worker nodes, all on
127.0.0.1), with MLflow on a real ``mlflow server``, and a worker node removed while one of its trials runs.

Layout, by custom resources: the sweep's Serve app (victims, accounting, ingress) on the node that declares
``victims``; trials on the two nodes that declare ``trials``. When a trials node dies mid-trial, Tune retries the lost
trial on the other one. Afterwards: every trial finished exactly once (one FINISHED MLflow run per factor
combination), the lost attempt's run is KILLED (none left RUNNING), and no API key was charged past its budget, the
finished ones exactly their budget.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from test_sweep import _doc

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow, pytest.mark.mlflow_server]


@pytest.fixture
def cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {
        "victims": c.add_node(num_cpus=1, resources={"victims": 1}),
        "trials-a": c.add_node(num_cpus=1, resources={"trials": 1}),
        "trials-b": c.add_node(num_cpus=2, resources={"trials": 1}),
    }
    c.wait_for_nodes()
    yield c, nodes
    import ray

    from distributed_me.serving.runtime import shutdown

    if ray.is_initialized():
        shutdown()
    c.shutdown()


def _trial_runs(uri: str, sweep: str) -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test-sweeps")
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = 'trial'",
                         max_results=1000)


EPOCHS = 25


def _epochs_logged(uri: str, run) -> int:
    """How many epochs a trial's run has logged (the history of one of its per-epoch metrics)."""
    from mlflow import MlflowClient

    return len(MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss"))


def test_sweep_survives_losing_a_worker_node(sweep_env, cluster, tmp_path, monkeypatch):
    import ray

    from distributed_me.serving.ledger import read_query_log
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    c, nodes = cluster
    victim_node, doomed = nodes["victims"].node_id, nodes["trials-b"].node_id
    monkeypatch.setenv("DME_SERVE_PORT", "0")  # any free port: the proxy must not need 8000
    budget = 200
    doc = _doc("multinode", policies=["probabilities"], retries=2,
               attack={"budget": budget, "optimizer": ["adam", "sgd"], "seed": [0, 1], "epochs": EPOCHS},
               resources={"cpus_per_trial": 1, "serve_resources": {"victims": 0.01},
                          "trial_resources": {"trials": 0.01}})
    spec = parse_sweep(doc)
    removed: dict[str, str] = {}

    def remove_when_a_trial_runs_there() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "run" not in removed:
            for r in _trial_runs(sweep_env["uri"], "multinode"):
                # well inside the trial: it has logged an epoch, so its key is charged and it is training; and not
                # near its end, so that it cannot close its run between this reading and the node's removal
                if (r.info.status == "RUNNING" and r.data.tags.get("dme.node") == doomed and r.data.metrics
                        and _epochs_logged(sweep_env["uri"], r) <= EPOCHS // 2):
                    # the Serve app holds the 'victims' resource, which only the victims node has
                    removed["victims_available"] = ray.available_resources().get("victims", 1.0)
                    c.remove_node(nodes["trials-b"], allow_graceful=False)
                    removed["run"] = r.info.run_id
                    return
            time.sleep(0.3)

    killer = threading.Thread(target=remove_when_a_trial_runs_there, daemon=True)
    killer.start()
    out = run_sweep(spec, address=c.address)
    killer.join(timeout=5)

    assert "run" in removed, "no trial ever ran on the node to remove (placement by custom resources failed?)"
    assert out.errors == [] and len(out.rows) == 4 and all(r["completed"] for r in out.rows)
    runs = _trial_runs(sweep_env["uri"], "multinode")
    status = Counter(r.info.status for r in runs)
    assert status["RUNNING"] == 0, status
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = Counter(r.data.tags["dme.trial_key"] for r in finished)
    assert len(keys) == 4 and set(keys.values()) == {1}, keys  # every trial finished exactly once
    lost = {r.info.run_id: r for r in runs}[removed["run"]]
    assert lost.info.status == "KILLED" and "worker died" in lost.data.tags["dme.error"]
    assert all(r.data.tags["dme.node"] != doomed for r in finished)  # the lost trial was retried elsewhere
    placements = Counter(r.data.tags["dme.node"] for r in runs)
    assert victim_node not in placements  # trials never ran on the victims' node

    log = read_query_log(out.path / "querylog")
    per_key = Counter()
    for k, n in zip(log["key"].to_pylist(), log["count"].to_pylist()):
        per_key[k] += n
    assert all(v <= budget for v in per_key.values()), per_key  # never charged past a budget
    assert sum(1 for v in per_key.values() if v == budget) >= 4  # each finished attempt charged exactly its budget
    assert removed["victims_available"] == pytest.approx(1 - 3 * 0.01)  # victim, accountant, ingress on that node


def test_a_driver_that_ran_a_private_cluster_joins_one_with_token_auth_disabled(monkeypatch):
    """A private cluster turns Ray's token auth on for the whole process; a cluster started with
    ``RAY_AUTH_MODE=disabled`` joined later from the same process (a notebook running a sweep, then a multi-node
    one) must still be able to call the driver back, or it takes the driver for dead and destroys its actors."""
    import ray
    from ray.cluster_utils import Cluster

    from distributed_me.serving.runtime import init_ray, shutdown

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self) -> str:
            return "pong"

    init_ray(num_cpus=1)
    assert ray.get(Echo.remote().ping.remote(), timeout=60) == "pong"
    shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        init_ray(address=cluster.address)
        assert ray.get(Echo.remote().ping.remote(), timeout=60) == "pong"
    finally:
        shutdown()
        cluster.shutdown()
