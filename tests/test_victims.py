"""Victim bundles: training writes one, MLflow registers it, and it loads back by path, name and URI unchanged."""

import json

import pytest
import torch

from distributed_me.errors import BundleError
from distributed_me.runner import evaluator_for
from distributed_me.train import TrainConfig
from distributed_me.victims import load_bundle, load_victim, register_victim, train_victim


@pytest.fixture(scope="module")
def tiny_victim(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "digits-tiny"
    cfg = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=3e-3, seed=0)
    victim, path = train_victim("digits", "tiny_cnn", out, cfg, img_size=8, name="digits-tiny", progress=False)
    return victim, path


def test_bundle_has_metadata_and_reloads_identically(tiny_victim):
    victim, path = tiny_victim
    meta = json.loads((path / "victim.json").read_text())
    assert meta["arch"] == "tiny_cnn" and meta["img_size"] == 8 and meta["in_chans"] == 1
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["split_seed"] == 0
    assert len(meta["weights_sha256"]) == 64
    # the recorded accuracy is the bundle's own on its test split, rebuilt from the recorded dataset and split seed
    # (this tiny victim, 3 epochs at 8 px, reaches only ~0.14: its value is not the point, its provenance is)
    assert meta["test_accuracy"] == pytest.approx(evaluator_for(load_bundle(path)).victim_accuracy)
    assert set(meta["normalization"]) == {"mean", "std"}
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(load_bundle(path).predict_probs(x), victim.predict_probs(x))
    # the victim in hand names the same weights as its reload: a defense kit built for a freshly trained victim
    # (e.g. the embedded one on a machine's first run) is found again once it is loaded from disk
    from distributed_me.defenses.kits import victim_key

    assert victim.meta.weights_sha256 == meta["weights_sha256"]
    assert victim_key(victim) == victim_key(load_bundle(path))


def test_register_and_resolve_by_name_uri_and_path(tiny_victim):
    victim, path = tiny_victim
    uri = register_victim(path, "digits-tiny-test")
    assert uri.startswith("models:/digits-tiny-test/")
    x = torch.rand(5, 1, 8, 8)
    expected = victim.predict_probs(x)
    for spec in (uri, "digits-tiny-test", str(path)):
        torch.testing.assert_close(load_victim(spec).predict_probs(x), expected)
    second = register_victim(path, "digits-tiny-test")
    assert int(second.rsplit("/", 1)[1]) == int(uri.rsplit("/", 1)[1]) + 1


def test_a_name_registered_in_the_default_store_resolves_in_a_fresh_process_from_any_directory(tiny_victim, tmp_path,
                                                                                                 monkeypatch):
    """Without ``MLFLOW_TRACKING_URI`` the store is ``$DME_HOME/mlflow.db``. MLflow's model registry has its own
    default (``./mlflow.db`` of the working directory): a fresh process (``dme sweep`` after ``dme train-victim``) that
    resolves ``models:/NAME/1`` must look in the same store, and leave no stray ``mlflow.db`` where it runs."""
    import subprocess
    import sys

    _, path = tiny_victim
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DME_HOME", str(tmp_path / "home"))
    where = {}
    for step, code in (("register", f"from distributed_me.victims import register_victim as r; "
                                    f"print(r({str(path)!r}, 'digits-fresh'))"),
                       ("resolve", "from distributed_me.victims import load_victim as l; "
                                   "print(l('digits-fresh').meta.arch)")):
        cwd = tmp_path / step
        cwd.mkdir()
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        where[step] = done.stdout.strip().splitlines()[-1]
        assert not (cwd / "mlflow.db").exists(), f"{step} wrote a store in its working directory"
    assert where == {"register": "models:/digits-fresh/1", "resolve": "tiny_cnn"}
    assert (tmp_path / "home" / "mlflow.db").exists()


def test_a_name_deleted_and_registered_again_never_loads_the_old_cached_model(tiny_victim, tmp_path):
    """models:/NAME/1 names a different model once NAME is deleted and registered again: the download cache must
    not hand back the first one."""
    from mlflow import MlflowClient

    from distributed_me.tracking import use_store

    sha = load_bundle(tiny_victim[1]).meta.weights_sha256
    first = register_victim(tiny_victim[1], "digits-reregistered")
    assert load_victim(first).meta.weights_sha256 == sha
    MlflowClient(use_store()).delete_registered_model("digits-reregistered")
    cfg = TrainConfig(epochs=1, batch_size=64, optimizer="adam", lr=3e-3, seed=1)
    _, other_path = train_victim("digits", "tiny_cnn", tmp_path / "other", cfg, img_size=8, progress=False)
    other_sha = load_bundle(other_path).meta.weights_sha256
    assert other_sha != sha
    again = register_victim(other_path, "digits-reregistered")
    assert again == first == "models:/digits-reregistered/1"
    assert load_victim(again).meta.weights_sha256 == other_sha


def test_unknown_registered_name_is_a_clear_error():
    with pytest.raises(BundleError, match="no registered victim named 'never-trained'"):
        load_victim("never-trained")


def test_tampered_weights_fail_the_hash_check(tiny_victim, tmp_path):
    _, path = tiny_victim
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "victim.json").write_text((path / "victim.json").read_text())
    (copy / "weights.pt").write_bytes((path / "weights.pt").read_bytes()[:-10])
    with pytest.raises(BundleError, match="does not match the hash"):
        load_bundle(copy)


def test_attack_run_is_logged_to_mlflow(tiny_victim):
    import mlflow

    from distributed_me.extraction import AttackSpec
    from distributed_me.runner import attack_in_process

    victim, _ = tiny_victim
    spec = AttackSpec(budget=64, arch="tiny_cnn", epochs=1, adv_eval_samples=16)
    result = attack_in_process(spec, victim=victim, experiment="test-attack-logging")
    runs = mlflow.search_runs(experiment_names=["test-attack-logging"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["fidelity"] == pytest.approx(result.fidelity)
    assert run.data.metrics["queries_used"] == 64
    assert run.data.params["budget"] == "64" and run.data.tags["dme.attack"] == "random"


def test_a_victim_trained_by_the_cli_on_a_relative_npz_finds_its_test_split_from_anywhere(tmp_path, monkeypatch,
                                                                                        capsys):
    """``dme train-victim --dataset data/x_train.npz`` loads the files before training: the bundle must record where
    they are (absolute), not the dataset's name, or a later sweep evaluates against a dataset it cannot find."""
    import numpy as np

    from distributed_me.cli import main
    from distributed_me.victims import victim_test_split

    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for split, n in (("train", 60), ("test", 20)):
        np.savez_compressed(tmp_path / "data" / f"toy_{split}_{n}.npz",
                            images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), labels=np.arange(n) % 3)
    monkeypatch.chdir(tmp_path)
    assert main(["train-victim", "--dataset", "data/toy_train_60.npz", "--arch", "tiny_cnn", "--epochs", "1",
                 "--no-mlflow", "--out", "bundle", "--quiet"]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    victim = load_bundle(tmp_path / "bundle")
    assert victim.meta.dataset == str((tmp_path / "data" / "toy_train_60.npz").resolve())
    x, y = victim_test_split(victim)
    assert x.shape == (20, 3, 8, 8)
    np.testing.assert_array_equal(y.numpy(), np.arange(20) % 3)
