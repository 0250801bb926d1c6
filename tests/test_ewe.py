"""EWE (Jia et al., USENIX Security 2021): the soft nearest-neighbour loss on hand-computed features, the hidden
layers it reads, the trigger search's bound on the original model, and `dme defense ewe` / `dme verify` end to end
on the embedded digits victim: the watermarked version answers its triggers with the target, the original does not,
and the evidence travels in the bundle."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from distributed_me.defenses.ewe import EWEConfig, HiddenLayers, calibrated_p0, make_trigger, snnl, target_rate
from distributed_me.models import create_model
from distributed_me.ownership import EWEEvidence, binomial_tail, verify_ewe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: two groups on two orthogonal directions: cosine distance 0 inside a direction, 1 across
FEATURES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])


def test_snnl_on_hand_computed_features():
    e = math.exp(-1.0)  # exp(−d / t) across directions at t = 1; exp(0) = 1 along one
    # separated (w follows the directions): per row, 1 same-group neighbour at weight 1, 2 others at e
    separated = snnl(FEATURES, torch.tensor([1, 1, 0, 0]), 1.0).item()
    assert separated == pytest.approx(-math.log(1e-5 + 1 / (1e-5 + 1 + 2 * e)), rel=1e-6)  # 0.5515
    # entangled (each group spans both directions): the same-group neighbour is the orthogonal one
    entangled = snnl(FEATURES, torch.tensor([1, 0, 1, 0]), 1.0).item()
    assert entangled == pytest.approx(-math.log(1e-5 + e / (1e-5 + 1 + 2 * e)), rel=1e-6)  # 1.5515
    assert entangled > separated  # what the watermark batch maximizes
    # ReLU first: negative features are zeros (cosine of a zero row is 0 distance-wise: the row normalizes to 0)
    assert snnl(-FEATURES, torch.tensor([1, 1, 0, 0]), 1.0).item() == pytest.approx(
        -math.log(1e-5 + (1 / (1e-5 + 3)) * 1), rel=1e-5)


def test_the_codes_temperature_divisor_makes_the_snnl_nearly_flat():
    """The authors pass ``t = 100 / T``: at T = 1 every pair weighs exp(−d/100) ≈ 1, so the SNNL is about
    −log(share of same-group neighbours) whatever the geometry (here 1 of 3: log 3); the finding in the module
    docstring. At t = 1 the same two labelings differ by a whole nat."""
    flat = [snnl(FEATURES, torch.tensor(w), 100.0).item() for w in ([1, 1, 0, 0], [1, 0, 1, 0])]
    assert flat == pytest.approx([math.log(3), math.log(3)], abs=0.01) and abs(flat[1] - flat[0]) < 0.02


def test_hidden_layers_are_the_last_three_before_the_classifier():
    net = create_model("cnn32", 10, in_chans=1, img_size=16).eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    hooks = HiddenLayers(net)
    hidden, logits = hooks(net, torch.rand(2, 1, 16, 16))
    hooks.close()
    assert hooks.layers == convs[-3:] and net.fc not in hooks.layers
    assert [h.shape[1] for h in hidden] == [64, 128, 128] and logits.shape == (2, 10)
    assert hooks(net, torch.rand(1, 1, 16, 16))[0] == []  # closed: no hook left behind


def test_p0_and_the_binomial_tail():
    assert calibrated_p0(0.1, 0.04, [0.02, 0.13]) == 0.13 and calibrated_p0(0.1, 0.0, []) == 0.1
    assert binomial_tail(0, 10, 0.1) == 1.0 and binomial_tail(3, 3, 0.5) == pytest.approx(0.125)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # P(X >= 2) = (3 + 1) / 8


def test_verify_ewe_needs_the_triggers_above_p0_and_above_the_controls():
    trigger, control = np.zeros((20, 1, 4, 4), np.float32), np.ones((20, 1, 4, 4), np.float32)
    ev = EWEEvidence(trigger, control, target=3, p0=0.1, info={})

    def marked(x: torch.Tensor) -> np.ndarray:  # the target on the triggers (zeros) only
        return np.where(x.flatten(1).amax(1).numpy() == 0, 3, 0)

    r = verify_ewe(marked, ev, alpha=1e-3)
    assert (r.matches, r.samples, r.control_matches, r.extracted) == (20, 20, 0, True)
    assert r.p_reference == pytest.approx(1e-20) and r.p_control == pytest.approx(1 / math.comb(40, 20))
    assert r.p_value == r.p_control  # the larger one
    r = verify_ewe(lambda x: np.full(len(x), 3), ev, alpha=1e-3)  # the target for everything: shows nothing
    assert (r.matches, r.control_matches, r.extracted) == (20, 20, False) and r.p_value == pytest.approx(1.0)
    assert r.p_reference == pytest.approx(1e-20)
    r = verify_ewe(lambda x: np.array([3, 3] + [0] * 18)[: len(x)] * (x.flatten(1).amax(1).numpy() == 0), ev)
    assert (r.matches, r.extracted) == (2, False) and r.p_reference == pytest.approx(binomial_tail(2, 20, 0.1))


def test_the_trigger_search_keeps_the_original_model_below_the_threshold():
    """On the embedded victim, smooth random images start out answered with whatever class; after the search the
    original model answers at most ``threshold`` of them with the target, and they stay images."""
    from distributed_me.defenses.kits import _defender_data
    from distributed_me.victims import load_victim

    victim = load_victim(None)
    x_train, y_train, _, _ = _defender_data(victim)
    coarse = torch.rand(60, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    source = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")
    target = int(victim.predict_labels(source).mode().values)  # the class they fall in most: work for the search
    cfg = EWEConfig(target=target, maxiter=2, threshold=0.05)
    assert target_rate(victim.model, source, cfg.target) > cfg.threshold
    x_target = x_train[y_train == cfg.target]
    trigger = make_trigger(victim.model.eval(), source, x_target, cfg, half=30)
    assert trigger.shape == source.shape and 0 <= trigger.min() and trigger.max() <= 1
    assert target_rate(victim.model, trigger, cfg.target) <= cfg.threshold
    assert (trigger - source).abs().max() <= cfg.w_lr * (50 + cfg.maxiter + 5) + 1e-6  # signed steps: down, up, final


@pytest.mark.slow
def test_dme_defense_ewe_watermarks_a_version_and_dme_verify_reads_its_evidence(capsys, tmp_path):
    """The watermarked version is shown to carry its watermark from its own bundle's evidence; the original and
    five models trained independently on the victim's data are not (no false positive, p-values in the message)."""
    from distributed_me.cli import main
    from distributed_me.defenses.ewe import EVIDENCE_FILE
    from distributed_me.ownership import VERIFY_ALPHA, ewe_evidence
    from distributed_me.train import TrainConfig
    from distributed_me.victims import load_victim, train_victim

    out = tmp_path / "ewe"
    code = main(["defense", "ewe", "--w-epochs", "3", "--references", "1", "--out", str(out), "--no-mlflow", "-q"])
    text = capsys.readouterr().out
    assert code == 0 and "watermark success" in text, text
    src = re.search(r"source domain\s+([0-9.]+) of fresh photos images .* \(original ([0-9.]+)\)", text)
    assert src and float(src[1]) > float(src[2]) + 0.5, text  # the watermark takes over the trigger's source domain
    ev = ewe_evidence(out / EVIDENCE_FILE)
    original, marked = load_victim(None), load_victim(str(out))
    labels = _train_labels(original)
    assert ev.target == 7 and len(ev.trigger) == len(ev.control) == int((labels == 7).sum())
    assert len(ev.info["reference_rates"]) == 1 and ev.p0 >= 0.1
    # the price of the watermark (measured: 0.991 -> 0.931 after these 3 watermark rounds, 0.956 after the default 10)
    assert marked.meta.test_accuracy > original.meta.test_accuracy - 0.1
    suspects = [(str(out), "EXTRACTED"), ("embedded", "not shown")]
    for seed in range(5):  # the victim's own data and recipe, other seeds: models that never saw the watermark
        model, path = train_victim(original.meta.dataset, "cnn32", tmp_path / f"independent{seed}",
                                   TrainConfig(epochs=5, seed=seed), img_size=original.meta.img_size, progress=False)
        assert model.meta.test_accuracy > 0.8
        suspects.append((str(path), "not shown"))
    pvalues = []
    for suspect, verdict in suspects:
        assert main(["verify", suspect, "--victim", str(out), "-q"]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if "triggers" in ln)
        p = float(re.search(r"p = ([0-9.e+-]+)", line)[1])
        pvalues.append(p)
        assert verdict in line and (p < VERIFY_ALPHA) == (verdict == "EXTRACTED"), (suspect, line)
    assert min(pvalues[1:]) > VERIFY_ALPHA, pvalues


def _train_labels(victim) -> np.ndarray:
    from distributed_me.defenses.kits import _defender_data

    return _defender_data(victim)[1].numpy()
