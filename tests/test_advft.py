"""AdvFT (paper 002, Algorithm 1, losses (1)-(3)): the losses on hand-computed tensors, the frozen last layer, the
symmetry that stalls Algorithm 1 as written, the fine-tuning doing what its loss says on a tiny model, and `dme
defense advft` registering the protected model as the next version of the victim with its lineage."""

from __future__ import annotations

import pytest
import torch

from distributed_me.defenses.advft import (
    AdvFTConfig,
    Penultimate,
    advft,
    feature_gap,
    generator_loss,
    model_loss,
)
from distributed_me.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def test_losses_on_hand_computed_features():
    ff_tr, fr_tr = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 2)  # gaps 1 and 4: mean 2.5
    ff_fk, fr_fk = torch.tensor([[0.0, 3.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # 4 and 0: mean 2
    assert feature_gap(ff_tr, fr_tr).tolist() == [1.0, 4.0]
    assert generator_loss(ff_fk, fr_fk).item() == 2.0  # eq. (1)
    l1, l2, lf = model_loss(ff_tr, fr_tr, ff_fk, fr_fk, margin=5.0)  # eq. (2): max(2.5 - 2 + 5, 0) = 5.5
    assert (l1.item(), l2.item(), lf.item()) == (5.5, 2.5, 8.0)  # eq. (3): 5.5 + 2.5
    l1, _, lf = model_loss(ff_tr, fr_tr, ff_fk * 3, fr_fk, margin=5.0)  # fake gaps 64 and 8: mean 36, hinge off
    assert (l1.item(), lf.item()) == (0.0, 2.5)


def test_the_hinge_only_pushes_generated_features_while_it_is_active():
    ff_tr = torch.tensor([[1.0, 0.0]], requires_grad=True)
    ff_fk = torch.tensor([[0.0, 1.0]], requires_grad=True)
    _, _, lf = model_loss(ff_tr, torch.zeros(1, 2), ff_fk, torch.zeros(1, 2), margin=5.0)
    lf.backward()
    assert ff_tr.grad.tolist() == [[4.0, 0.0]] and ff_fk.grad.tolist() == [[0.0, -2.0]]  # 2·(L_F1 + L_F2), −2·gap


def test_penultimate_reads_the_input_of_the_last_linear_layer():
    net = create_model("tiny_cnn", 3, in_chans=1, img_size=8).eval()
    x = torch.rand(4, 1, 8, 8)
    feats, logits = Penultimate(net)(x)
    assert torch.allclose(net.fc(feats), logits) and feats.shape == (4, 16)


def _tiny(seed: int = 0):
    """A tiny CNN trained on a 4-class toy task (the bright quadrant is the class), and its training images."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = torch.arange(96) % 4
    x = torch.rand(96, 1, 8, 8, generator=gen) * 0.3
    for c in range(4):
        r, k = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * k : 4 * k + 4] += 0.7
    net = create_model("tiny_cnn", 4, in_chans=1, img_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.95
    return net, x


def test_the_last_layer_stays_bit_identical_and_the_original_is_untouched():
    net, x = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    prot, _ = advft(net, x, AdvFTConfig(epochs=2, gen_steps=2, model_steps=3, batch_size=32, nz=8, ngf=8,
                                        lr_f=1e-2), device=CPU)
    assert torch.equal(prot.fc.weight, before["fc.weight"]) and torch.equal(prot.fc.bias, before["fc.bias"])
    assert not torch.equal(prot.features[0].weight, before["features.0.weight"])  # the rest was fine-tuned
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_algorithm_1_as_written_stays_at_its_start_without_symmetry_breaking():
    """M_F = M_R exactly: every gap is 0 and so is the gradient of every squared gap (the docstring's finding)."""
    net, x = _tiny()
    prot, hist = advft(net, x, AdvFTConfig(epochs=2, gen_steps=2, model_steps=2, batch_size=32, nz=8, ngf=8,
                                           margin=3.0, init_noise=0.0, lr_f=1e-2), device=CPU)
    assert hist.l_f1 == [3.0, 3.0] and hist.l_f2 == [0.0, 0.0] and hist.l_g == [0.0, 0.0]
    assert all(torch.equal(a, b) for a, b in zip(prot.state_dict().values(), net.state_dict().values(), strict=True))


def test_fine_tuning_moves_out_of_distribution_features_and_keeps_in_distribution_answers():
    """The paper's claim (§2.3, Fig. 5) on a toy task: features of unseen ID images stay put and their answers too,
    those of OOD images (uniform noise, which the generator never produced) move and their answers change.
    Measured here: ID gap 0.7 and agreement 1.0, noise gap 26 and agreement 0.25 (m = 10)."""
    net, x = _tiny()
    fresh_id, noise = _tiny(1)[1], torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    cfg = AdvFTConfig(epochs=8, gen_steps=2, model_steps=6, batch_size=32, nz=8, ngf=8, margin=10.0, lr_f=1e-2)
    prot, hist = advft(net, x, cfg, device=CPU)
    assert hist.l_f1[-1] < 0.2 * max(hist.l_f1), hist.l_f1  # the hinge gets satisfied
    pr, pf = Penultimate(net), Penultimate(prot)
    with torch.no_grad():
        (fr_id, lr_id), (ff_id, lf_id) = pr(fresh_id), pf(fresh_id)
        (fr_ood, lr_ood), (ff_ood, lf_ood) = pr(noise), pf(noise)
    assert feature_gap(ff_ood, fr_ood).mean() > 10 * feature_gap(ff_id, fr_id).mean()
    assert (lf_id.argmax(1) == lr_id.argmax(1)).float().mean() >= 0.95
    assert (lf_ood.argmax(1) == lr_ood.argmax(1)).float().mean() <= 0.6


@pytest.mark.slow
def test_dme_defense_advft_registers_the_next_version_with_its_lineage(capsys):
    from mlflow import MlflowClient

    from distributed_me.cli import main
    from distributed_me.tracking import use_store
    from distributed_me.victims import load_victim, register_victim, victim_bundle_path

    parent = register_victim(victim_bundle_path(None), "digits-advft")
    assert parent == "models:/digits-advft/1"
    code = main(["defense", "advft", "--victim", parent, "--epochs", "1", "--gen-steps", "2", "--model-steps", "3",
                 "--batch-size", "32", "--alias", "protected", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "models:/digits-advft/2" in out and "Acc_MR / Acc_MF" in out, out
    client = MlflowClient(use_store())
    v2 = client.get_model_version("digits-advft", "2")
    assert str(client.get_model_version_by_alias("digits-advft", "protected").version) == "2"
    assert v2.tags["dme.defense"] == "advft" and v2.tags["dme.parent"] == parent
    assert v2.tags["dme.advft.margin"] == "100.0" and v2.tags["dme.advft.epochs"] == "1"
    run = client.get_run(v2.run_id)
    for k in ("acc_mr", "acc_mf", "agreement", "kl_test", "kl_train"):
        assert k in run.data.metrics, k
    assert len(client.get_metric_history(v2.run_id, "advft.l_f1")) == 1
    original, protected = load_victim(parent), load_victim("models:/digits-advft/2")
    assert run.data.metrics["acc_mr"] == pytest.approx(original.meta.test_accuracy, abs=1e-9)
    assert torch.equal(protected.model.net.fc.weight, original.model.net.fc.weight)
    assert protected.meta.train_config["parent_weights_sha256"] == original.meta.weights_sha256
