"""Sweeps end to end on real Ray (Tune + Serve) with a real `mlflow server`, all on 127.0.0.1.

Tiny trials (tiny_cnn, a few epochs, budgets of tens of queries) so that the harness, not the learning, is tested:
the runs and metrics MLflow holds afterwards, failures recorded as FAILED runs, resume after the driver is killed,
and a sweep submitted as a Ray job to a `ray start --head` cluster.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from helpers import free_port, listening_addresses, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow_server]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _doc(name: str, **over) -> dict:
    doc = {"name": name, "experiment": "test-sweeps", "pool": "photos", "pool_options": {"n": 2000},
           "victims": [{"name": "digits", "source": "embedded"}], "policies": ["probabilities", "label"],
           "attack": {"strategy": "random", "budget": 60, "arch": "tiny_cnn", "optimizer": ["adam", "sgd"],
                      "epochs": 2, "seed": 0},
           "adv_eval_samples": 20, "resources": {"cpus_per_trial": 1}, "retries": 0}
    for k, v in over.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return doc


def _runs(uri: str, sweep: str, kind: str = "trial") -> list:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("test-sweeps")
    if exp is None:  # not created yet (a sweep starting in another process)
        return []
    return c.search_runs([exp.experiment_id], f"tags.`dme.sweep` = '{sweep}' and tags.`dme.kind` = '{kind}'",
                         max_results=1000)


def _metric_values(uri: str, run, key: str) -> list[float]:
    from mlflow import MlflowClient

    return [m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, key)]


def _shutdown_ray():
    import ray

    from distributed_me.serving.runtime import shutdown

    if ray.is_initialized():
        shutdown()


def test_tiny_sweep_end_to_end_through_serve_tune_and_mlflow(sweep_env, monkeypatch):
    from mlflow import MlflowClient

    from distributed_me.extraction import METRIC_NAMES
    from distributed_me.report import write_report
    from distributed_me.serving.ledger import read_query_log
    from distributed_me.sweep import trial
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    lines: list[str] = []
    # the driver hands the trials its interval between intermediate reports: here longer than any trial
    monkeypatch.setattr(trial, "TUNE_REPORT_EVERY_S", 3600.0)
    try:
        out = run_sweep(parse_sweep(_doc("e2e")), num_cpus=2, on_progress=lines.append)
    finally:
        _shutdown_ray()
    assert out.errors == [] and len(out.rows) == 4
    assert all(r["queries_used"] == 60 and r["completed"] for r in out.rows)
    # no scheduler stops these trials: Tune hears from them at most once per interval, not after each of their 2
    # epochs (each report is a round trip the trial waits for), and always at the end
    assert all(r["tune_reports"] == 1 for r in out.rows), [r["tune_reports"] for r in out.rows]
    # one line per trial start, one (plus its figures) per finish, counted against the total; no Tune table
    assert sum("] started " in ln for ln in lines) == 4 and sum("] finished " in ln for ln in lines) == 4
    assert lines[-2].startswith("[4/4 done · 0 running · 0 failed] finished ") and "fidelity 0." in lines[-1]
    assert all(len(ln) < 200 for ln in lines)
    assert {"mlflow", "plan", "deploy", "trials", "teardown"} <= set(out.seconds)
    assert lines[0].startswith("plan: 4 trials, ") and "projected on the Ray cluster (2 CPUs)" in lines[0]

    c = MlflowClient(sweep_env["uri"])
    (parent,) = _runs(sweep_env["uri"], "e2e", "sweep")
    assert parent.info.status == "FINISHED" and parent.info.run_id == out.parent_run_id
    assert parent.data.params["package.torch"].startswith("2.14.1") and "cluster.CPU" in parent.data.params
    assert parent.data.metrics["trials_finished"] == 4
    # the plan beside what happened: the sweep's projected trials phase and total, priced for this device
    assert parent.data.metrics["sweep_projected_seconds_trials"] > 0 and "sweep_seconds_trials" in parent.data.metrics
    assert parent.data.tags["dme.cost_device"].startswith("cpu-")
    assert [a.path for a in c.list_artifacts(parent.info.run_id)] == ["report", "sweep.json"]
    published = {a.path for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/results.csv", "report/plots"} <= published  # the sweep published its report
    import pandas as pd

    csv = pd.read_csv(c.download_artifacts(parent.info.run_id, "report/results.csv", str(sweep_env["dir"])))
    assert sorted(csv["fidelity"].round(6)) == sorted(round(r["fidelity"], 6) for r in out.rows)

    trials = _runs(sweep_env["uri"], "e2e")
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}, [t.data.tags for t in trials]
    combos = {(t.data.params["optimizer"], t.data.params["policy"]) for t in trials}
    assert combos == {(o, p) for o in ("adam", "sgd") for p in ("probabilities", "label")}
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.data.tags["dme.attack"] == "random" and t.data.tags["dme.budget"] == "60"
        assert t.data.metrics["queries_used"] == 60
        # MLflow holds what the trial measured: its row, found by run id, has the run's factors and every figure of
        # the run (the phase times too, which tell trials apart where tiny clones score alike)
        (row,) = [r for r in out.rows if r["mlflow_run_id"] == t.info.run_id]
        assert (row["optimizer"], row["policy"]) == (t.data.params["optimizer"], t.data.params["policy"])
        measured = {k: row[k] for k in METRIC_NAMES if row.get(k) is not None}
        assert {"accuracy", "fidelity", "adversarial_fidelity", "victim_accuracy", "seconds_train"} <= set(measured)
        assert {k: t.data.metrics.get(k) for k in measured} == pytest.approx(measured)
        assert t.data.metrics["victim_utility"] > 0.9  # probabilities and label keep the victim's top-1
        per_epoch = c.get_metric_history(t.info.run_id, "train_loss")
        assert sorted(m.step for m in per_epoch) == [1, 2]
        assert {"seconds_selection", "seconds_query", "seconds_train", "seconds_eval"} <= set(t.data.metrics)
        # each trial logs its projection (corrected and raw) beside its actual times, per phase and in total
        for prefix in ("projected_seconds_", "projected_raw_seconds_"):
            assert t.data.metrics[f"{prefix}total"] > 0 and t.data.metrics[f"{prefix}train"] > 0
        assert t.data.tags["dme.cost_device"] == parent.data.tags["dme.cost_device"]
        assert [a.path for a in c.list_artifacts(t.info.run_id)] == ["piracy_model.pt"]

    log = read_query_log(out.path / "querylog")
    assert log["count"].to_numpy().sum() == 4 * 60

    report = write_report("e2e", sweep_env["dir"] / "report")
    assert report.markdown.is_file() and len(report.plots) == 6 and all(p.stat().st_size > 0 for p in report.plots)
    assert "projection_vs_actual.png" in {p.name for p in report.plots}
    assert "sgd" in report.table and "label" in report.table


def test_a_sweep_joins_the_long_lived_victim_service_an_earlier_sweep_left_running(sweep_env, capsys):
    """``keep_victims``: the first sweep deploys the service and leaves it running; the next sweep needing the same
    victims joins it (no deployment of its own), its trials' keys are new clients of the same ledger, and the
    service's query log (under DME_HOME, absolute) holds both sweeps' queries."""
    from ray import serve

    from distributed_me.serving.ledger import read_query_log
    from distributed_me.sweep import service
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    over = {"policies": ["probabilities"], "attack": {"optimizer": "adam", "epochs": 1},
            "resources": {"keep_victims": True}}
    import pandas as pd

    started = pd.Timestamp.now(tz="UTC")
    lines: list[str] = []
    try:
        first = run_sweep(parse_sweep(_doc("service-a", **over)), num_cpus=2)
        apps = [name for name in serve.status().applications if name.startswith("victims-")]
        assert len(apps) == 1 and service.running(apps[0]), serve.status().applications  # left running
        assert first.seconds["deploy_background"] > 0 and first.errors == []
        second = run_sweep(parse_sweep(_doc("service-b", **over)), num_cpus=2, on_progress=lines.append)
        assert any(ln.startswith(f"joining the running victim service {apps[0]} (") for ln in lines), lines
        assert "deploy_background" not in second.seconds and second.errors == [] and len(second.rows) == 1
        assert service.running(apps[0])
        # `dme services` lists the service and stops it (in this process: the cluster is the one above)
        from distributed_me.cli import main

        capsys.readouterr()
        assert main(["services"]) == 0
        listed = capsys.readouterr().out
        assert apps[0] in listed and "RUNNING" in listed and "digits" in listed, listed
        assert main(["services", "--stop", "victims-nope"]) == 2 and apps[0] in capsys.readouterr().err
        assert main(["services", "--stop", apps[0]]) == 0 and not service.running(apps[0])
        assert "no victim services running" in capsys.readouterr().out
    finally:
        _shutdown_ray()
    # the joining sweep's plan drops the wait for Serve's start (what later plans learn from stays honest)
    (plan_a,), (plan_b,) = _runs(sweep_env["uri"], "service-a", "sweep"), _runs(sweep_env["uri"], "service-b", "sweep")
    key = "sweep_projected_raw_seconds_trials"
    planned = _metric_values(sweep_env["uri"], plan_b, key)
    assert len(planned) == 2 and max(planned) - min(planned) > 1, planned  # planned, then without Serve's start
    assert plan_b.data.metrics[key] == min(planned) and len(_metric_values(sweep_env["uri"], plan_a, key)) == 1
    assert "sweep_seconds_deploy_background" in plan_a.data.metrics
    assert "sweep_seconds_deploy_background" not in plan_b.data.metrics
    log = read_query_log(sweep_env["home"] / "serving" / apps[0] / "querylog").to_pandas()
    mine = log[log["time"] >= started]
    assert mine["count"].sum() == 2 * 60 and mine["key"].nunique() == 2  # one fresh key per trial, one ledger


def test_a_sweep_over_the_cost_limit_is_refused_before_anything_starts(sweep_env):
    """Priced on the cluster it joined, over the limit: refused with the projection, the cpu-small preset (with its
    own projection) and the flag, before the MLflow parent run, the Serve app or any trial."""
    from ray import serve

    from distributed_me.cost.guard import CostLimitError
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    doc = _doc("over-limit", presets={"cpu-small": {"attack": {"budget": 30, "epochs": 1}}})
    try:
        with pytest.raises(CostLimitError) as e:
            run_sweep(parse_sweep(doc), num_cpus=2, max_hours=1e-4)
        apps = serve.status().applications if serve.context._global_client is not None else {}
    finally:
        _shutdown_ray()
    msg = str(e.value)
    assert "sweep 'over-limit' is projected to take" in msg and "on the Ray cluster (2 CPUs)" in msg
    assert "--preset cpu-small (projected" in msg and "--no-cost-limit" in msg and "nothing was started" in msg
    assert _runs(sweep_env["uri"], "over-limit", "sweep") == [] and _runs(sweep_env["uri"], "over-limit") == []
    assert not any("over-limit" in name for name in apps)


def test_failed_trials_leave_failed_runs_exit_1_and_fresh_starts_again(sweep_env):
    """Through the real `dme sweep`: a sweep whose trials fail exits 1 and names each failure; the same name again is
    one `error:` line, exit 2, nothing run; `--fresh` runs it again from scratch."""
    spec = sweep_env["dir"] / "fails.yaml"
    spec.write_text(yaml.safe_dump(_doc("fails", pool_options={"n": 40}, attack={"optimizer": "adam"},
                                        policies=["probabilities"], retries=1)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = ["sweep", str(spec), "--num-cpus", "2", "-q"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        proc = _dme([*argv, *extra], env)
        out, _ = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    first = run()
    assert first.returncode == 1, first.stdout[-3000:]
    assert "1 failed" in first.stdout and "budget 60 is larger than the pool" in first.stdout
    trials = _runs(sweep_env["uri"], "fails")
    assert len(trials) == 2  # the attempt and its one retry
    for t in trials:
        assert t.info.status == "FAILED" and "larger than the pool" in t.data.tags["dme.error"]
    (parent,) = _runs(sweep_env["uri"], "fails", "sweep")
    assert parent.info.status == "FAILED"

    again = run()
    assert again.returncode == 2 and again.stdout.startswith("error: sweep 'fails' already exists"), again.stdout
    assert again.stdout.count("\n") == 1 and "--fresh" in again.stdout and "--resume fails" in again.stdout
    assert len(_runs(sweep_env["uri"], "fails")) == 2

    fresh = run("--fresh")
    assert fresh.returncode == 1, fresh.stdout[-3000:]
    assert len(_runs(sweep_env["uri"], "fails")) == 4 and len(_runs(sweep_env["uri"], "fails", "sweep")) == 2


def test_optuna_search_with_asha(sweep_env):
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    doc = _doc("optuna", policies=["probabilities"], attack={"optimizer": "adam", "epochs": 4},
               search={"kind": "optuna", "num_samples": 4, "space": {"lr": {"loguniform": [1e-4, 3e-2]},
                                                                    "optimizer": {"choice": ["adam", "sgd"]}}},
               asha={"grace_period": 1, "reduction_factor": 2})
    try:
        out = run_sweep(parse_sweep(doc), num_cpus=2)
    finally:
        _shutdown_ray()
    assert out.errors == [] and len(out.rows) == 4
    # ASHA decides on every epoch: each reaches Tune (4 epochs and the final result for a trial that ran them all)
    assert all(r["tune_reports"] == 5 for r in out.rows if r["completed"]), [r["tune_reports"] for r in out.rows]
    assert any(r["completed"] for r in out.rows)
    trials = _runs(sweep_env["uri"], "optuna")
    assert len(trials) == 4 and {t.info.status for t in trials} <= {"FINISHED", "KILLED"}
    lrs = [float(t.data.params["lr"]) for t in trials]
    assert len(set(lrs)) == 4 and all(1e-4 <= lr <= 3e-2 for lr in lrs)  # sampled by Optuna, not the grid
    for t in trials:
        epochs = len({m.step for m in _history(sweep_env["uri"], t.info.run_id, "train_loss")})
        assert 1 <= epochs <= 4
        if t.info.status == "KILLED":  # stopped by ASHA after fewer epochs than asked
            assert t.data.tags["dme.stopped"] and epochs < 4


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow import MlflowClient

    return [m for m in MlflowClient(uri).get_metric_history(run_id, key) if m.step >= 1]


def _dme(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dme"), *args], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_the_driver_is_killed_reruns_no_finished_trial(sweep_env):
    spec = sweep_env["dir"] / "resume.yaml"
    doc = _doc("resume", attack={"optimizer": ["adam", "sgd", "adamw"], "epochs": 3}, policies=["probabilities"],
               resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = _dme(["sweep", str(spec), "--num-cpus", "2", "-q"], env)
    try:
        done_before = wait_for(lambda: [t for t in _runs(sweep_env["uri"], "resume") if t.info.status == "FINISHED"],
                            300, "a first finished trial")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its private Ray cluster die together
        first.wait(30)
    finished_ids = {t.info.run_id for t in done_before}
    second = _dme(["sweep", "--resume", "resume", "--num-cpus", "2", "-q"], env)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    trials = _runs(sweep_env["uri"], "resume")
    finished = [t for t in trials if t.info.status == "FINISHED"]
    assert len(finished) == 3, [(t.info.status, t.data.params.get("optimizer")) for t in trials]
    assert sorted(t.data.params["optimizer"] for t in finished) == ["adam", "adamw", "sgd"]
    assert finished_ids <= {t.info.run_id for t in finished}  # the ones done before the kill were not run again
    assert {t.info.status for t in trials} <= {"FINISHED", "KILLED"}
    (parent,) = _runs(sweep_env["uri"], "resume", "sweep")
    assert parent.info.status == "FINISHED"


def test_ctrl_c_ends_the_sweep_killed_with_the_resume_command_and_no_finished_parent(sweep_env):
    """Ctrl-C (SIGINT) makes Tune save its state and return normally: the sweep must still end KILLED (exit 130,
    the resume command printed), never FINISHED, whose partial trials phase would teach the cost model that the
    sweep is short (seen: a 4.8 h sweep resumed with "29 min projected")."""
    spec = sweep_env["dir"] / "interrupt.yaml"
    # 12 trials of about a second each, one at a time: the signal (sent once the first has finished, seen through
    # MLflow) must land with trials left. With 3, a fast machine finished them all first (exit 0, seen once)
    doc = _doc("interrupt", attack={"optimizer": ["adam", "sgd", "adamw"], "epochs": 3, "seed": [0, 1, 2, 3]},
               policies=["probabilities"], resources={"cpus_per_trial": 1, "max_concurrent_trials": 1})
    spec.write_text(yaml.safe_dump(doc))
    first = _dme(["sweep", str(spec), "--num-cpus", "2", "-q"], {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: [t for t in _runs(sweep_env["uri"], "interrupt") if t.info.status == "FINISHED"], 300,
                 "a first finished trial")
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(30)
    assert first.returncode == 130, output[-3000:]
    assert "interrupted" in output and "dme sweep --resume interrupt" in output, output[-3000:]
    (parent,) = _runs(sweep_env["uri"], "interrupt", "sweep")
    assert parent.info.status == "KILLED", parent.info
    assert "dme sweep --resume interrupt" in parent.data.tags["dme.error"], parent.data.tags
    assert "RUNNING" not in {t.info.status for t in _runs(sweep_env["uri"], "interrupt")}


def test_sweep_as_a_ray_job_on_a_head_node(sweep_env, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_doc("job", attack={"optimizer": "adam"}, policies=["probabilities"])))
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard",
                            "true", "--disable-usage-stats",
                            # fixed defaults (52365, ...) would collide with any other Ray cluster on this machine
                            "--dashboard-agent-listen-port", str(free_port()),
                            "--dashboard-agent-grpc-port", str(free_port()),
                            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        runtime_env = {"env_vars": {**{k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "DME_HOME", "DME_SWEEP_DIR",
                                                                  "HF_HUB_OFFLINE")},
                                    # joining a cluster, the sweep serves HTTP too: on a free port, not 8000
                                    "DME_SERVE_PORT": str(free_port())}}
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                  str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--", "dme", "sweep", str(spec), "-q"]
        deadline = time.monotonic() + 120
        while True:  # the head's job agent comes up some seconds after `ray start` returns (longer on a busy machine)
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout
    finally:
        _stop_cluster(port)
    trials = _runs(sweep_env["uri"], "job")
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.metrics["queries_used"] == 60


def _stop_cluster(port: int) -> None:
    """Stop only the cluster whose GCS listens on ``port``: every one of its processes names that address (GCS
    itself: ``--gcs_server_port``). `ray stop` would kill every Ray cluster on the machine, the user's too."""
    patterns = [f"127.0.0.1:{port}", f"gcs_server_port={port}"]
    for sig in ("TERM", "KILL"):
        for pat in patterns:
            subprocess.run(["pkill", f"-{sig}", "-f", pat], capture_output=True)
        if all(subprocess.run(["pgrep", "-f", pat], capture_output=True).returncode != 0 for pat in patterns):
            break
        time.sleep(5)
    marker = Path("/tmp/ray/ray_current_cluster")  # `ray start` recorded this head as the machine's cluster
    if marker.exists() and f":{port}" in marker.read_text():
        marker.unlink()


def test_dme_ui_serves_the_store_on_loopback_and_stops_whole_on_sigterm(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"DME_HOME": str(tmp_path)}
    proc = subprocess.Popen([str(BIN / "dme"), "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/health"), 120, "dme ui")
        if not Path("/proc/net/tcp").exists():
            pytest.skip("no /proc/net/tcp on this system: cannot read which address the UI listens on")
        assert listening_addresses(port) == {"127.0.0.1"}  # the UI listens on loopback only
        # stopped by its PID alone, as a process manager would: the MLflow server and its worker go too
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        wait_for(lambda: not listening_addresses(port), 30, "the UI's port to be released")
        assert not _get(f"http://127.0.0.1:{port}/health")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed stop left behind
        proc.wait(30)


def _get(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_pool_strategies_in_a_sweep_over_a_parquet_pool(sweep_env):
    """SwiftTheft, ActiveThief and KnockoffNets as trials over a Parquet pool: SwiftTheft's reference set is trained
    once and stored in MLflow, the pool's features come from a Ray Data pass before the trials, and every trial
    spends exactly its budget."""
    import numpy as np
    from mlflow import MlflowClient

    from distributed_me.data import ArrayPool, write_pool_shards
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    rng = np.random.default_rng(0)
    pool_dir = sweep_env["dir"] / "pool"
    write_pool_shards(ArrayPool(rng.integers(0, 256, (400, 20, 20, 3), dtype=np.uint8), name="labeled-noise",
                                labels=rng.integers(0, 5, 400)), pool_dir, rows_per_shard=150, row_group_size=50)
    strategies = ["swifttheft", "activethief-kcenter", "knockoff"]
    doc = _doc("pools", pool=str(pool_dir), policies=["probabilities"],
               attack={"strategy": strategies, "optimizer": "adam", "budget": 40, "epochs": 1,
                       "strategy_options": {
                           "swifttheft": {"n_seed": 10, "k_per_iter": 10, "n_reference": 2, "reference_arch":
                                          "tiny_cnn", "reference_epochs": 1, "reference_size": 16},
                           "activethief-kcenter": {"n_seed": 20, "per_round": 10}}})
    doc["pool_options"] = {}
    lines: list[str] = []
    try:
        out = run_sweep(parse_sweep(doc), num_cpus=2, on_progress=lines.append)
    finally:
        _shutdown_ray()
    assert out.errors == [] and sorted(r["strategy"] for r in out.rows) == sorted(strategies)
    # the preparation is announced with its projection before it runs, and logged beside what it took
    (announced,) = [ln for ln in lines if ln.startswith("prepare swifttheft on ")]
    assert "projected, before any trial" in announced and "\r" not in "".join(lines)
    assert all(r["queries_used"] == 40 and r["completed"] for r in out.rows)

    (parent,) = _runs(sweep_env["uri"], "pools", "sweep")
    key = parent.data.tags["dme.prepare.swifttheft.reference_key"]
    assert parent.data.metrics["prepare.swifttheft.feature_pass_images_per_s"] > 0
    assert parent.data.metrics["prepare.swifttheft.projected_seconds"] > 0 and \
        parent.data.metrics["prepare.swifttheft.seconds"] > 0
    features = parent.data.tags["dme.prepare.swifttheft.features"]  # what every SwiftTheft trial was given
    c = MlflowClient(sweep_env["uri"])
    refs = c.search_runs([c.get_experiment_by_name("dme-references").experiment_id],
                         f"tags.`dme.reference_key` = '{key}'")
    assert len(refs) == 1 and [a.path for a in c.list_artifacts(refs[0].info.run_id)] == ["reference.pt"]
    # the trials read the sweep's pass, never recompute it (cache identity, not timing): the SwiftTheft trial was given
    # exactly that file, and the file was last written before any trial started
    (trial,) = [r for r in _runs(sweep_env["uri"], "pools") if r.data.tags["dme.attack"] == "swifttheft"]
    assert json.loads(trial.data.params["strategy_options"])["features"] == features
    first_trial_start = min(r.info.start_time for r in _runs(sweep_env["uri"], "pools")) / 1000
    assert Path(features).stat().st_mtime < first_trial_start


def test_a_plugin_strategy_with_a_preparation_step_runs_in_a_sweep(sweep_env, tmp_path):
    """The lifecycle: a strategy the package has never heard of (a plugin file) declares ``prepare``; the sweep runs
    it once per pool of the grid, before the trials, through Ray Data, and every trial reads its own pool's product
    (the toy refuses to run unprepared; each trial's run records the product it was given). No sweep code names it.
    Each pool gets its own loader options."""
    from mlflow import MlflowClient

    from distributed_me.data import load_pool
    from distributed_me.data.features import read_features
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    plugin = str(ROOT / "tests" / "plugins" / "toy_prepared.py")
    marker = tmp_path / "marker"
    doc = _doc("lifecycle", plugins=[plugin], policies=["probabilities"], pool=["photos", "digits-unseen"],
               attack={"strategy": "toy-prepared", "strategy_options": {"toy-prepared": {"marker_dir": str(marker)}},
                       "optimizer": "adam"})
    doc["pool_options"] = {"photos": {"n": 2000}, "digits-unseen": {"variants": 2}}
    try:
        out = run_sweep(parse_sweep(doc), num_cpus=2)
    finally:
        _shutdown_ray()
    assert out.errors == [] and len(out.rows) == 2 and all(r["completed"] for r in out.rows)
    assert {r["pool"] for r in out.rows} == {"photos", "digits-unseen"}
    assert len([p for p in marker.iterdir() if p.name.startswith("prepare-")]) == 2  # once per pool, not per trial
    parent = MlflowClient(sweep_env["uri"]).get_run(out.parent_run_id).data
    for name, options in (("photos", {"n": 2000}), ("digits-unseen", {"variants": 2})):
        pool = load_pool(name, **options)
        feats = read_features(marker / f"brightness-{name}.parquet", pool)
        np.testing.assert_allclose(feats[:, 0], pool.get(np.arange(len(pool))).reshape(len(pool), -1).mean(1),
                                   rtol=1e-5)
        assert parent.metrics[f"prepare.toy-prepared.{name}.images"] == len(pool)
        assert parent.metrics[f"prepare.toy-prepared.{name}.seconds"] > 0
        assert parent.tags[f"dme.prepare.toy-prepared.{name}.features"] == str(marker / f"brightness-{name}.parquet")
    assert all(r["seconds_setup"] > 0 and r["queries_used"] == 60 for r in out.rows)
    given = {t.data.params["pool"]: json.loads(t.data.params["strategy_options"])["features"]
             for t in _runs(sweep_env["uri"], "lifecycle") if t.info.status == "FINISHED"}
    assert given == {name: str(marker / f"brightness-{name}.parquet") for name in ("photos", "digits-unseen")}


def test_a_watched_sweep_records_detection_kits_and_the_defenders_cost(sweep_env):
    """A sweep whose victims are watched by PRADA and whose grid names MAD: the driver builds the MAD kit once before
    the victims deploy and measures each policy's cost to the defender; each trial records whether (and after how
    many queries) its key was flagged; benign clients give PRADA's false-positive rate; the report has both.
    Measured: the JBA trial (seed 30, rounds doubling the set) is flagged within its 240 queries, as the JBA-like
    stream of tests/test_detectors_on_victim.py is at query 130; the benign keys are not."""
    from mlflow import MlflowClient

    from distributed_me.report import write_report
    from distributed_me.sweep.runner import run_sweep
    from distributed_me.sweep.spec import parse_sweep

    doc = _doc("watched", policies=["probabilities", "mad"], detectors=["prada"], benign_keys=2, benign_queries=300,
               attack={"strategy": ["jba", "random"], "budget": 240, "optimizer": "adam",
                       "strategy_options": {"jba": {"n_seed": 30, "epochs_per_round": 1}}})
    try:
        out = run_sweep(parse_sweep(doc), num_cpus=2)
    finally:
        _shutdown_ray()
    assert out.errors == [] and len(out.rows) == 4
    (parent,) = _runs(sweep_env["uri"], "watched", "sweep")
    assert parent.data.tags["dme.kit.digits.mad"].endswith("/mad")  # built by the driver, before the deployment
    assert parent.data.metrics["detection.digits.0.prada.benign_fpr"] == 0.0
    assert parent.data.metrics["detection.digits.1.prada.benign_fpr"] == 0.0
    assert parent.data.tags["dme.defense.digits.1"] == "mad"
    trials = {(t.data.params["strategy"], t.data.params["policy"]): t.data.metrics
              for t in _runs(sweep_env["uri"], "watched")}
    for policy in ("probabilities", "mad"):
        jba = trials[("jba", policy)]
        assert jba["detection.prada.flagged"] == 1.0 and 100 <= jba["detection.prada.queries"] <= 240, jba
        assert "detection.prada.flagged" in trials[("random", policy)]
    mad = trials[("random", "mad")]
    assert mad["victim_kl"] > 0 and mad["victim_kl_train"] > 0 and mad["victim_agreement"] > 0.9
    assert mad["victim_kl"] == pytest.approx(parent.data.metrics["defense.digits.1.kl_test"])
    report = write_report("watched", sweep_env["dir"] / "report", "test-sweeps")
    assert report.detection is not None
    row = report.detection.set_index(["policy", "strategy"]).loc[("mad", "jba")]
    assert row["flagged_rate"] == 1.0 and row["benign_fpr"] == 0.0
    assert "## Detectors" in report.markdown.read_text()
    assert any(p.name == "detection_curves.png" for p in report.plots)
    assert MlflowClient(sweep_env["uri"]).get_run(parent.info.run_id).info.status == "FINISHED"
