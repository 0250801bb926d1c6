"""The sweep's recorder actor on a real single-node Ray with a real SQLite MLflow store: trial processes record
through it without importing MLflow, epoch metrics that were not waited for are all in the run before it ends, a
metric the store refuses fails the run (never a FINISHED run with holes), a scheduler's stop is KILLED, and a
recorder whose process dies comes back and serves the runs it was serving."""

import os
import sys
import time

import pytest

pytestmark = [pytest.mark.ray]

FACTORS = {"strategy": "random", "victim": "digits", "policy": "probabilities", "budget": 60, "seed": 0}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from distributed_me.serving.runtime import init_ray, shutdown

    init_ray(num_cpus=2)
    yield ray
    shutdown()


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from distributed_me.sweep import tracking

    tracking._client.cache_clear()
    parent = tracking.start_parent("test-recorder", "rec", {"name": "rec"}, {"CPU": 2.0}, None)
    exp_id = tracking.client().get_run(parent).info.experiment_id
    return uri, exp_id, parent


@pytest.fixture
def recorder(ray_cluster, store):
    """The sweep's recorder for the store's parent run, stopped after the test."""
    from distributed_me.sweep.recorder import start_recorder, stop_recorder

    uri, _, parent = store
    actor = start_recorder(parent, uri)
    yield actor
    stop_recorder(actor)


def _trial(parent: str, exp_id: str, epochs: int, ending: str, bad_epoch: int | None = None) -> dict:
    """What a trial worker does with its run, in a Ray task (its own process); returns what it saw."""
    import ray

    from distributed_me.sweep.recorder import RecordedRun, find_recorder

    @ray.remote(num_cpus=1)
    def trial() -> dict:
        recorder = find_recorder(parent)
        out: dict = {"error": None}
        try:
            with RecordedRun(recorder, exp_id, parent, "rec", None, FACTORS, {"dme.trial_id": ending}) as run:
                out["run_id"] = run.run_id
                for e in range(epochs):
                    run.metrics({"fidelity": "not a number" if e == bad_epoch else e / 10}, step=e)
                if ending == "stopped":
                    raise SystemExit(0)
                if ending == "failed":
                    raise ValueError("the attack broke")
        except (SystemExit, ValueError, RuntimeError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        out["mlflow_imported"] = "mlflow" in sys.modules
        out["pid"] = os.getpid()
        return out

    return ray.get(trial.remote())


def test_trials_record_through_the_recorder_without_importing_mlflow(recorder, store):
    from mlflow import MlflowClient

    uri, exp_id, parent = store
    seen = _trial(parent, exp_id, 25, "finished")
    assert seen["error"] is None and seen["pid"] != os.getpid()
    assert not seen["mlflow_imported"]  # the worker's import and store opening are the recorder's
    c = MlflowClient(uri)
    run = c.get_run(seen["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params["budget"] == "60"
    # 25 calls nobody waited for, all in the store before the run ended
    assert [m.step for m in c.get_metric_history(seen["run_id"], "fidelity")] == list(range(25))

    stopped = _trial(parent, exp_id, 2, "stopped")
    assert c.get_run(stopped["run_id"]).info.status == "KILLED"
    assert "scheduler" in c.get_run(stopped["run_id"]).data.tags["dme.stopped"]
    failed = _trial(parent, exp_id, 2, "failed")
    assert c.get_run(failed["run_id"]).info.status == "FAILED"
    assert c.get_run(failed["run_id"]).data.tags["dme.error"] == "ValueError: the attack broke"


def test_a_metric_the_store_refuses_fails_the_run_and_the_trial(recorder, store):
    from mlflow import MlflowClient

    uri, exp_id, parent = store
    seen = _trial(parent, exp_id, 5, "finished", bad_epoch=3)
    assert seen["error"] is not None and seen["error"].startswith("RuntimeError: metrics of MLflow run")
    run = MlflowClient(uri).get_run(seen["run_id"])
    assert run.info.status == "FAILED" and "not recorded" in run.data.tags["dme.error"]


def test_a_recorder_whose_process_dies_comes_back_for_the_runs_it_served(recorder, store):
    import ray
    from mlflow import MlflowClient

    uri, exp_id, parent = store
    run_id = ray.get(recorder.open.remote(exp_id, parent, "rec", None, FACTORS, None, None))
    ray.get(recorder.metrics.remote(run_id, {"fidelity": 0.1}, 0))
    ray.kill(recorder, no_restart=False)
    # the restarted process knows nothing of the run but its id, which is all it needs
    # a call retried on the restarted process may have landed before the kill: the repeat adds no second point
    stamp = int(time.time() * 1000) + 1000  # after the first point's: MLflow lists a history by timestamp
    for _ in range(2):
        ray.get(recorder.metrics.remote(run_id, {"fidelity": 0.2}, 1, stamp), timeout=120)
    ray.get(recorder.end.remote(run_id, "finished", None))
    c = MlflowClient(uri)
    assert c.get_run(run_id).info.status == "FINISHED"
    assert [m.value for m in c.get_metric_history(run_id, "fidelity")] == [0.1, 0.2]
