import pytest
import torch
from torch import nn

from distributed_me.metrics import accuracy, adversarial_fidelity, fidelity, kl_divergence, pgd


def test_accuracy_and_fidelity_hand_computed():
    assert accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 0])) == 0.5
    assert fidelity(torch.tensor([3, 3, 1]), torch.tensor([3, 2, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(torch.tensor([1]), torch.tensor([1, 2]))


def test_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.25, 0.75]])
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert kl_divergence(p, q) == pytest.approx(expected.item(), rel=1e-5)


class Threshold(nn.Module):
    """logit_1 − logit_0 = 10·(mean pixel − 0.5): a model whose PGD step is known in closed form."""

    def forward(self, x):
        s = 10 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([-s / 2, s / 2], dim=1)


def test_pgd_stays_in_the_ball_and_moves_against_the_label():
    x = torch.full((3, 1, 4, 4), 0.51)
    y = torch.ones(3, dtype=torch.long)
    adv = pgd(Threshold(), x, y, eps=4 / 255, alpha=2 / 255, steps=7, random_start=False)
    # the gradient sign is −1 everywhere for label 1, so after ≥2 steps every pixel sits at x − ε
    assert torch.allclose(adv, x - 4 / 255, atol=1e-6)
    adv_r = pgd(Threshold(), x, y, generator=torch.Generator().manual_seed(0))
    assert (adv_r - x).abs().max() <= 4 / 255 + 1e-6 and adv_r.min() >= 0 and adv_r.max() <= 1


def test_adversarial_fidelity_hand_computed():
    # images at 0.51 (class 1, margin 0.01 < ε): PGD pushes them to 0.494 → class 0 for the piracy model.
    x = torch.full((4, 1, 4, 4), 0.51)
    y = torch.ones(4, dtype=torch.long)
    same_victim = lambda a: Threshold()(a).argmax(1)  # noqa: E731
    always_one = lambda a: torch.ones(len(a), dtype=torch.long)  # noqa: E731
    assert adversarial_fidelity(Threshold(), same_victim, x, y) == 1.0
    assert adversarial_fidelity(Threshold(), always_one, x, y) == 0.0
    # far from the boundary (0.9) PGD cannot flip the piracy model, so a victim saying 1 agrees everywhere
    assert adversarial_fidelity(Threshold(), always_one, torch.full((4, 1, 4, 4), 0.9), y) == 1.0
