"""The command line: results on the embedded default, and clear one-line errors (exit 2, no traceback)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_me.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_attack_json_on_embedded_default(capsys):
    """The JSON is the run's result: every figure equals what the same run logged to MLflow. A tiny_cnn trained for 2
    epochs on 200 answers stays at chance (measured over seeds 0-5: accuracy 0.100-0.102, the clone predicts one
    class), so learning is not what this shows (test_extraction's registry-wide test does); what holds for any clone
    is checked instead: accuracy and fidelity, scored on the same test images, differ by at most the victim's error."""
    import mlflow

    code, out, _ = run(capsys, "attack", "--budget", "200", "--epochs", "2", "--json", "--adv-samples", "50",
                       "--arch", "tiny_cnn", "--experiment", "cli-json-on-embedded-default")
    assert code == 0
    r = json.loads(out)
    from distributed_me.extraction import METRIC_NAMES, TIME_NAMES

    assert set(METRIC_NAMES) <= set(r)  # the one result schema, every phase timed (setup included)
    assert r["queries_used"] == 200 and r["budget"] == 200
    phases = [r[t] for t in TIME_NAMES if t != "seconds_total"]
    assert all(p > 0 for p in phases) and sum(phases) <= r["seconds_total"]  # disjoint phases inside the total
    assert r["victim_accuracy"] > 0.9  # the embedded victim is 0.99 accurate
    assert abs(r["accuracy"] - r["fidelity"]) <= 1 - r["victim_accuracy"] + 1e-6
    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("cli-json-on-embedded-default").experiment_id])
    assert logged.info.status == "FINISHED"
    metrics = {k: v for k, v in r.items() if k not in ("budget", "spec")}
    assert {k: logged.data.metrics[k] for k in metrics} == metrics
    assert (logged.data.params["budget"], logged.data.params["epochs"], logged.data.params["arch"]) == \
        ("200", "2", "tiny_cnn")
    assert r["victim_utility"] == pytest.approx(r["victim_accuracy"])  # full probabilities: the API's top-1
    assert r["spec"]["arch"] == "tiny_cnn" and r["spec"]["epochs"] == 2 and r["spec"]["optimizer"] == "adam"


def test_unset_attack_flags_fall_back_to_attackspec_defaults(monkeypatch):
    """Flags the user did not give are dropped, so AttackSpec's defaults (a real piracy model, not the test one)
    apply; given flags win."""
    from distributed_me import cli
    from distributed_me.extraction import AttackSpec

    class Stop(Exception):
        pass

    seen = {}

    def record(spec, **kw):
        seen["spec"] = spec
        raise Stop

    monkeypatch.setattr("distributed_me.runner.attack_in_process", record)
    with pytest.raises(Stop):
        cli.main(["attack", "--budget", "123", "--no-mlflow"])
    spec = seen["spec"]
    assert spec.budget == 123
    assert spec.model_dump(exclude={"budget"}) == AttackSpec().model_dump(exclude={"budget"})
    assert AttackSpec().arch == "cnn32"


@pytest.mark.parametrize("argv,needle", [
    (["attack", "--arch", "nope"], "valid model names: "),
    (["attack", "--optimizer", "nope"], "valid optimizer names: adam, adamw, lion, sgd"),
    (["attack", "--output-policy", "nope"], "valid output policy names: "),
    (["attack", "--strategy", "nope"], "valid attack strategy names: "),
    (["attack", "--pool", "nope"], "nope"),
    (["attack", "--budget", "10000000", "--no-mlflow"], "larger than the pool"),
    (["attack", "--budget", "0"], "budget"),
    (["train-victim", "--dataset", "nope", "--no-mlflow"], "nope"),
    (["attack", "--victim", "/nonexistent/bundle"], "does not exist"),
])
def test_bad_input_is_one_clear_error(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv,needle", [
    (["attack", "--budget", "0", "--epochs", "0"],
     "attack field 'budget' = 0: Input should be greater than 0; attack field 'epochs' = 0"),
    (["attack", "--optimizer", "rmsprop"], "valid optimizer names: adam, adamw, lion, sgd, sgd-m0.5"),
    (["serve", "/nonexistent/serve.yaml"], "serve config /nonexistent/serve.yaml not found; see "
                                          "deployments/local.yaml"),
    (["report", "no-such-sweep"], "no finished trials of sweep 'no-such-sweep'"),
    (["pool", "features", "photos", "--strategy", "random"],
     "attack strategy 'random' has no preparation step, so there is nothing to compute for a pool; strategies with "
     "one: swifttheft"),
    (["pool", "features", "photos", "--strategy", "nope"], "valid attack strategy names: activethief-dfal"),
    (["bench", "nope"], "unknown benchmark 'nope'; valid benchmark names: cost, extraction, "),
    (["sweep", "--resume", "no-such-sweep"], "no sweep named 'no-such-sweep' to resume"),
    (["sweep", "sweeps/quickstart.yaml", "--preset", "nope"], "unknown preset 'nope'; this sweep has: smoke"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "resources"], "--set takes DOTTED.FIELD=VALUE"),
    (["sweep", "sweeps/quickstart.yaml", "--set", "attack.optimizer=rmsprop", "--dry-run"],
     "sweep field 'attack.optimizer' = 'rmsprop': unknown optimizer 'rmsprop'; valid: adam, adamw, lion, sgd"),
    (["sweep", "--resume", "x", "sweeps/quickstart.yaml"], "not both"),
    (["defense", "train", "--defense", "nope"],
     "unknown defense kit 'nope'; valid defense kit names: am, cip, dawn, mad"),
    (["defense", "advft", "--margin", "-1"], "margin"),
])
def test_every_command_says_what_was_wrong_in_one_error_line(capsys, monkeypatch, tmp_path, argv, needle):
    """Every command's user mistakes: exit status 2 and exactly one line, ``error: `` + what was wrong + the valid
    values, on stderr; nothing on stdout."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DME_SWEEP_DIR", str(tmp_path / "sweeps"))
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert needle in err, err


def test_dme_debug_shows_the_traceback():
    """DME_DEBUG=1: the same mistake raises with its traceback (for bug reports), instead of the one line."""
    env = {**os.environ, "DME_DEBUG": "1"}
    out = subprocess.run([sys.executable, "-m", "distributed_me.cli", "attack", "--optimizer", "rmsprop"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert "UnknownNameError" in out.stderr and "rmsprop" in out.stderr


def test_corrupt_bundle_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "victim.json").write_text("{not json")
    (tmp_path / "weights.pt").write_bytes(b"garbage")
    code, _, err = run(capsys, "attack", "--victim", str(tmp_path))
    assert code == 2 and "unreadable or invalid" in err


def test_missing_data_file_says_where(capsys, tmp_path):
    code, _, err = run(capsys, "attack", "--pool", str(tmp_path / "pool.npz"))
    assert code == 2 and "pool.npz" in err


def test_shape_the_model_cannot_take(capsys):
    code, _, err = run(capsys, "train-victim", "--arch", "alexnet", "--img-size", "8", "--epochs", "1", "--no-mlflow")
    assert code == 2 and "alexnet" in err


def test_a_victim_trained_by_dataset_name_records_a_name_that_loads_its_data_again(capsys, tmp_path):
    """The defender's commands (`dme defense advft/ewe/train`) reload the victim's training data from the bundle's
    `dataset` field: `train-victim --dataset digits` must record `digits`, not where sklearn got the digits from."""
    from distributed_me.defenses.kits import _defender_data
    from distributed_me.victims import load_bundle

    code, _, err = run(capsys, "train-victim", "--dataset", "digits", "--arch", "tiny_cnn", "--img-size", "8",
                       "--epochs", "1", "--no-mlflow", "--out", str(tmp_path / "v"))
    assert code == 0, err
    victim = load_bundle(tmp_path / "v")
    assert victim.meta.dataset == "digits"
    x_train, _, x_test, _ = _defender_data(victim)
    assert tuple(x_train.shape[1:]) == tuple(x_test.shape[1:]) == (1, 8, 8)
    assert (len(x_train), len(x_test)) == (899, 450)


def test_no_traceback_from_the_real_entry_point():
    out = subprocess.run([sys.executable, "-m", "distributed_me.cli", "attack", "--optimizer", "rmsprop"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "rmsprop" in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_dme_serve_stops_cleanly_on_sigterm(tmp_path):
    """Stopped by its PID (a process manager, `kill`): exit 0 without Ray's abort dump, the port released, and the
    query log flushed into a Parquet part on the way out."""
    import signal

    import httpx
    import numpy as np
    import yaml
    from helpers import free_port, listening_addresses, wait_for

    from distributed_me.serving.ledger import read_query_log
    from distributed_me.wire import encode_npy

    port, log = free_port(), tmp_path / "querylog"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"victims": [{"name": "digits", "source": "embedded", "num_cpus": 0.25}],
                                      "clients": [{"key": "key-sigterm-01", "budget": 100}], "query_log": str(log)}))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dme"), "serve", str(config), "--port", str(port),
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 240, "dme serve")
        x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
        r = httpx.post(f"{url}/victims/digits/predict", content=encode_npy(x), timeout=60,
                       headers={"Content-Type": "application/x-npy", "X-API-Key": "key-sigterm-01"})
        assert r.status_code == 200
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == 0 and "SIGTERM received" not in out, out[-3000:]
    assert not listening_addresses(port)
    assert list(log.glob("part-*.parquet")) and read_query_log(log)["count"].to_pylist() == [5]


def test_defense_train_builds_the_kit_and_prints_the_defenders_cost(capsys):
    """`dme defense train` on the embedded victim: the kit lands where LocalOracle finds it, and both policies on the
    MAD kit are priced (utility, agreement, KL_test, KL_train) against the victim's accuracy."""
    from distributed_me.defenses import find_kit
    from distributed_me.victims import load_victim

    code, out, _ = run(capsys, "defense", "train", "--defense", "mad", "--no-mlflow", "-q", "--probe-pool", "photos",
                       "--probe-images", "200")
    assert code == 0
    assert find_kit(load_victim(None), "mad") is not None
    for needle in ("surrogate_test_accuracy", "mad: utility / agreement", "mad-argmax: KL_test / KL_train",
                   "(victim accuracy 0.9", "mad on photos: top-1 kept / KL", "(200 pool images)"):
        assert needle in out, out
    # the argmax-preserving variant keeps every pool answer's top-1, and still bends it (KL > 0)
    kept, kl = re.search(r"mad-argmax on photos: top-1 kept / KL\s+([\d.]+) / ([\d.]+) nats", out).groups()
    assert float(kept) == 1.0 and float(kl) > 0, out


# ------------------------------------------------------------------ --help lists the registered names
def _registries() -> dict:
    from distributed_me.attacks import ATTACKS
    from distributed_me.data import DATASETS, POOLS
    from distributed_me.defenses import KITS, POLICIES
    from distributed_me.models import MODELS
    from distributed_me.train import OPTIMIZERS

    return {"strategies": ATTACKS, "architectures": MODELS, "optimizers": OPTIMIZERS, "policies": POLICIES,
            "datasets": DATASETS, "pools": POOLS, "kits": KITS}


#: which registries' names each command's --help must list, every one of them
HELP_LISTS = {
    ("train-victim",): ("datasets", "architectures", "optimizers"),
    ("attack",): ("strategies", "architectures", "optimizers", "policies", "datasets", "pools"),
    ("sweep",): ("strategies", "architectures", "optimizers", "policies", "datasets", "pools"),
    ("serve",): ("policies",),
    ("pool", "build"): ("datasets", "pools"),
    ("pool", "features"): ("datasets", "pools"),
    ("defense", "train"): ("kits",),
}


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _words(text: str) -> set[str]:
    """The help as whole words: a name wrapped at a hyphen, or only a prefix of a longer one, does not count."""
    import re

    return set(re.split(r"[\s,;:()]+", text))


@pytest.mark.parametrize("command", list(HELP_LISTS), ids=" ".join)
def test_every_help_lists_every_registered_name(capsys, monkeypatch, command):
    """Generated from the registries at parser build time; a narrow terminal wraps more, and must not split a name."""
    monkeypatch.setenv("COLUMNS", "50")
    words = _words(_help(capsys, *command))
    registries = _registries()
    for kind in HELP_LISTS[command]:
        missing = [n for n in registries[kind].names() if n not in words]
        assert not missing, f"dme {' '.join(command)} --help lacks these {kind}: {missing}"


def test_pool_features_help_lists_the_strategies_with_a_preparation_step(capsys):
    from distributed_me.attacks import ATTACKS

    words = _words(_help(capsys, "pool", "features"))
    preparing = [n for n in ATTACKS.names() if ATTACKS.get(n).prepares()]
    assert preparing and all(n in words for n in preparing)
    assert not [n for n in ATTACKS.names() if n not in preparing and n in words]


def test_a_plugins_names_show_in_help_when_it_is_loaded_first():
    """`dme --plugin FILE` imports the plugin before the parser is built (in a fresh process: the registries of this
    one must not learn the plugin's name)."""
    plugin = str(ROOT / "tests" / "plugins" / "toy_prepared.py")
    out = subprocess.run([sys.executable, "-m", "distributed_me.cli", "--plugin", plugin, "pool", "features",
                          "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "toy-prepared" in _words(out.stdout)
    missing = subprocess.run([sys.executable, "-m", "distributed_me.cli", "--plugin", "nope.py", "attack"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: plugin file 'nope.py' not found")


# ------------------------------------------------------------------ Ray, Serve and MLflow chatter only with -v
#: a line that Ray's or Serve's loggers wrote at INFO or WARNING (in the driver, or a worker's line forwarded to it)
_RAY_LINE = (r"^(\x1b\[3\dm)?(\(\w+ pid=\d+\)(\x1b\[0m)? )?("
             r"(INFO|WARNING) \d{4}-\d\d-\d\d [\d:,]+ serve \d+ -- "  # Serve's format
             r"|\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) \S+\.py:\d+ -- )")  # Ray's and Tune's


def _chatter(output: str) -> list[str]:
    import re

    return [line for line in output.splitlines() if re.search(_RAY_LINE, line)
            or "(run_trial pid=" in line or "Token authentication is enabled" in line
            or re.match(r"^(INFO|WARNING) mlflow", line) or "View run " in line]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow_server
def test_sweep_console_is_quiet_by_default_and_verbose_with_v(sweep_env):
    """`dme sweep` prints its progress lines and table; Ray's, Serve's and MLflow's INFO/WARNING lines (driver and
    workers) only with -v. Errors would still show: nothing here lowers a logger below WARNING's neighbour ERROR."""
    import yaml

    spec = sweep_env["dir"] / "quiet.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "quiet", "experiment": "test-sweeps", "pool": "photos", "pool_options": {"n": 200},
        "victims": [{"name": "digits", "source": "embedded"}], "policies": ["probabilities"],
        "attack": {"strategy": "random", "budget": 40, "arch": "tiny_cnn", "optimizer": "adam", "epochs": 1},
        "adv_eval_samples": 10, "resources": {"cpus_per_trial": 1}, "retries": 0}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "DME_RAY_LOG_LEVEL", "MLFLOW_LOGGING_LEVEL", "RAY_ADDRESS",
                        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")}
    env["PYTHONUNBUFFERED"] = "1"

    def sweep(*extra: str) -> str:
        out = subprocess.run([str(Path(sys.executable).parent / "dme"), "sweep", str(spec), "--num-cpus", "2",
                              "--fresh", *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        both = out.stdout + out.stderr
        assert out.returncode == 0, both[-3000:]
        assert "[1/1 done · 0 running · 0 failed] finished" in out.stdout
        assert "sweep 'quiet': 1 trials done, 0 failed" in out.stdout
        return both

    quiet = sweep()
    assert _chatter(quiet) == [], quiet[-3000:]
    loud = sweep("-v")
    assert any(" serve " in line and "INFO" in line for line in _chatter(loud)), loud[-3000:]
    assert "Started a local Ray instance" in loud and "View run " in loud
