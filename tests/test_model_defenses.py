"""MAD, AM and CIP as served output policies on the embedded digits victim (no Ray): each with its kit built by the
code `dme defense train` runs, each answer checked against the defense's math on the same inputs, and a missing kit
refused with the command that builds it. Through the real Serve deployment: ``tests/test_serving.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import serve_env

from distributed_me.data import EMBEDDED_POOL, load_pool, to_tensor
from distributed_me.defenses import KITS, POLICIES, find_kit, parse_policy, train_kit
from distributed_me.defenses.cip import (
    CONFIDENT_OOD,
    ID,
    UNCERTAIN_OOD,
    _weak,
    calibrate_cip,
    cip_regimes,
    energy_score,
)
from distributed_me.defenses.kits import kit_dir
from distributed_me.defenses.mad import mad_perturb, surrogate_jacobian
from distributed_me.defenses.misinformation import calibrate_tau, max_softmax_score
from distributed_me.errors import DmeError
from distributed_me.oracle import LocalOracle
from distributed_me.victims import load_victim, victim_test_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    with serve_env(tmp_path_factory.getbasetemp()):  # the session's home, as the tests see it (module fixtures come
        return load_victim(None)                     # before the per-test one)


@pytest.fixture(scope="module")
def kits(victim, tmp_path_factory):
    """Every registered kit, on disk only (the MLflow round trip has its own test); AM's model trained 2 epochs."""
    with serve_env(tmp_path_factory.getbasetemp()):
        return {name: train_kit(victim, name, epochs=2, track=False) for name in KITS.names()}


@pytest.fixture(scope="module")
def test_images(victim) -> torch.Tensor:
    return victim_test_split(victim)[0][:120]


@pytest.fixture(scope="module")
def pool_images(victim) -> torch.Tensor:
    """Out-of-distribution queries: natural-image crops, as a KnockoffNets attacker sends."""
    c, s, _ = victim.input_shape
    return to_tensor(load_pool(EMBEDDED_POOL).get(np.arange(120), size=s, channels=c))


def _probs(victim, x: torch.Tensor) -> np.ndarray:
    return victim.predict_probs(x).numpy()


def test_a_missing_kit_is_refused_with_the_command_that_builds_it(victim, tmp_path, monkeypatch):
    from distributed_me.serving.app import check_kits
    from distributed_me.serving.spec import VictimService
    from distributed_me.victims import victim_bundle_path

    bundle = str(victim_bundle_path(None))  # the session's, before the home is emptied
    monkeypatch.setenv("DME_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    for policy, kit in (("mad", "mad"), ("mad-argmax:eps=0.2", "mad"), ("am", "am"), ("cip", "cip")):
        with pytest.raises(DmeError, match=rf"dme defense train --victim SOURCE --defense {kit}\b"):
            LocalOracle(victim, policy)
    for field in ("output_policy", "degrade_policy"):  # `dme serve` refuses before anything deploys
        with pytest.raises(DmeError, match=r"victims\['guarded'\]: output policy 'cip' needs .* --defense cip"):
            check_kits(VictimService(name="guarded", source="embedded", **{field: "cip"}), bundle)
    check_kits(VictimService(name="plain", source="embedded", output_policy="dp"), bundle)
    with pytest.raises(DmeError, match="bind_kits"):  # a chain used without its kits says how to bind them
        parse_policy("am")(np.full((1, 10), 0.1, np.float32), queries=np.zeros((1, 1, 16, 16), np.float32))


@pytest.mark.parametrize("spec, words", [
    ("mad:eps=3", ["eps", "3"]), ("mad:norm=l3", ["norm", "l3"]), ("am:fpr=1.5", ["fpr", "1.5"]),
    ("am:tau=0", ["tau"]), ("cip:id_quantile=0.9995", ["id_quantile", "open_quantile"]), ("madd", ["mad-argmax"]),
])
def test_bad_parameters_are_refused_naming_the_field_and_value(spec, words):
    with pytest.raises(DmeError) as e:
        parse_policy(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_mad_answers_are_the_perturbation_along_the_kit_surrogate_within_eps(victim, kits, test_images, pool_images):
    x = torch.cat([test_images[:40], pool_images[:40]])
    y = _probs(victim, x)
    G = surrogate_jacobian(kits["mad"].model("surrogate"), x)
    for spec, argmax, eps in (("mad", False, 0.5), ("mad-argmax:eps=0.8", True, 0.8), ("mad:eps=1.5", False, 1.5)):
        a = LocalOracle(victim, spec).query(x)
        np.testing.assert_array_equal(a.scores, mad_perturb(y, G, eps, argmax_preserving=argmax))
        dist = np.abs(a.scores.astype(np.float64) - y).sum(axis=1)
        assert dist.max() <= eps + 1e-6 and dist.mean() > 0.5 * eps, (spec, dist.max(), dist.mean())
        np.testing.assert_allclose(a.scores.sum(axis=1), 1.0, atol=1e-5)
        if argmax:
            np.testing.assert_array_equal(a.labels, y.argmax(1))
    # with a budget larger than the victim's confidence, plain MAD moves the top class of most answers
    assert (LocalOracle(victim, "mad:eps=1.5").query(x).labels != y.argmax(1)).mean() > 0.5


def test_am_leaves_confident_in_distribution_answers_and_misinforms_out_of_distribution_ones(
        victim, kits, test_images, pool_images):
    """Measured (2 epochs of the misinformation model): about 5 % of the digits' test images and 47 % of the natural
    crops score below τ. The victim has no outlier exposure (see ``build_am_kit``), so it is confident on many crops:
    AM misinforms under half of a KnockoffNets-like stream here, ten times the benign rate."""
    kit = kits["am"]
    tau = calibrate_tau(kit.array("id_scores"), 0.05)
    mis = kit.model("misinformation")
    rates = {}
    for x, kind in ((test_images, "ID"), (pool_images, "OOD")):
        y = _probs(victim, x)
        s = max_softmax_score(y)
        a = LocalOracle(victim, "am").query(x)
        clear_id, clear_ood = s > tau + 0.01, s < tau - 0.01  # ν = 10⁴: α is 1 or 0 to 1e-40 here
        assert clear_id.any() and clear_ood.any(), kind
        np.testing.assert_allclose(a.scores[clear_id], y[clear_id], atol=1e-6)
        np.testing.assert_allclose(a.scores[clear_ood], mis(x).softmax(1).detach().numpy()[clear_ood], atol=1e-6)
        rates[kind] = ((s < tau).mean(), (a.labels != y.argmax(1)).mean())
    assert rates["ID"][0] <= 0.1 and rates["ID"][1] <= 0.1, rates
    assert rates["OOD"][0] >= 0.3 and rates["OOD"][1] >= 0.3 and rates["OOD"][0] >= 4 * rates["ID"][0], rates


def test_cip_answers_each_regime_as_its_rule_says(victim, kits, test_images, pool_images):
    x = torch.cat([test_images, pool_images])
    logits = victim.predict_logits(x).numpy()
    y = _probs(victim, x)
    t = calibrate_cip(kits["cip"].array("id_energy"))
    regime = cip_regimes(energy_score(logits), t.e1, t.e2)
    assert {ID, UNCERTAIN_OOD, CONFIDENT_OOD} <= set(regime.tolist()), np.bincount(regime)
    a = LocalOracle(victim, "cip").query(x)
    ident = regime == ID
    np.testing.assert_array_equal(a.scores[ident], y[ident].astype(np.float32))
    weak = regime == UNCERTAIN_OOD
    np.testing.assert_allclose(a.scores[weak], _weak(y[weak].astype(np.float64), 0.9, 0.6), atol=1e-6)
    strong = regime == CONFIDENT_OOD
    # SPPD moves the top value off the victim's class; its 10 dB noise may hand it back to a few rows
    assert (a.labels[strong] != y[strong].argmax(1)).mean() > 0.8
    assert (a.labels[ident] == y[ident].argmax(1)).all()


def test_every_kit_policy_answers_with_its_kit_and_is_deterministic(victim, kits, test_images):
    users = [n for n in POLICIES.names() if POLICIES.get(n).needs_kit]
    assert set(users) >= {"mad", "mad-argmax", "am", "cip"}
    for name in users:
        a, b = LocalOracle(victim, name).query(test_images[:30]), LocalOracle(victim, name).query(test_images[:30])
        assert a.kind == "probabilities" and np.array_equal(a.scores, b.scores), name


def test_a_kit_logged_to_mlflow_is_found_by_a_machine_without_the_disk_copy(victim, tmp_path):
    from mlflow import MlflowClient

    from distributed_me.tracking import use_store
    from distributed_me.victims import register_victim, victim_bundle_path

    uri = register_victim(victim_bundle_path(None), "digits-kits")
    built = train_kit(victim, "cip", source=uri)
    tag = MlflowClient(use_store()).get_model_version("digits-kits", uri.rsplit("/", 1)[1]).tags
    assert tag["dme.defense.cip"].startswith("runs:/") and tag["dme.defense.cip"].endswith("/kit")
    import shutil

    shutil.rmtree(kit_dir(victim, "cip"))
    found = find_kit(victim, "cip")
    assert found is not None and found.meta["victim_sha"] == built.meta["victim_sha"]
    np.testing.assert_array_equal(found.array("id_energy"), built.array("id_energy"))
