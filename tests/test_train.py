import math

import pytest
import torch
from torch import nn

from distributed_me.errors import UnknownNameError
from distributed_me.train import OPTIMIZERS, TrainConfig, create_optimizer, fit, hard_cross_entropy, soft_cross_entropy
from distributed_me.train.augment import random_crop_resize


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    t = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, t).item() == pytest.approx(expected, rel=1e-6)


def test_soft_equals_hard_on_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    assert soft_cross_entropy(logits, torch.eye(4)[y]).item() == pytest.approx(hard_cross_entropy(logits, y).item())


def test_optimizer_defaults_follow_mebench():
    assert {n: (OPTIMIZERS.get(n).lr, OPTIMIZERS.get(n).betas) for n in OPTIMIZERS.names()} == {
        "sgd": (3e-2, (0.9, 0.999)), "adam": (3e-4, (0.9, 0.999)), "adamw": (3e-4, (0.9, 0.999)),
        "lion": (3e-4, (0.9, 0.99)), "sgd-m0.5": (1e-2, (0.5, 0.999)),  # the last: SwiftTheft §IV.1
    }
    opt = create_optimizer("sgd-m0.5", [nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.5 and opt.defaults["lr"] == 1e-2
    with pytest.raises(UnknownNameError, match="adam, adamw, lion, sgd, sgd-m0.5"):
        create_optimizer("rmsprop", [nn.Parameter(torch.zeros(1))])


def _one_step(name: str, grad: float = 2.0) -> float:
    p = nn.Parameter(torch.tensor([1.0]))
    opt = create_optimizer(name, [p], weight_decay=0.0)
    p.grad = torch.tensor([grad])
    opt.step()
    return p.item()


def test_each_optimizer_first_step_hand_computed():
    # SGD with momentum: first step is plain lr * g
    assert _one_step("sgd") == pytest.approx(1.0 - 3e-2 * 2.0)
    # Adam/AdamW first step: m̂ / (sqrt(v̂) + eps) = g/|g| → lr in magnitude
    assert _one_step("adam") == pytest.approx(1.0 - 3e-4, abs=1e-7)
    assert _one_step("adamw") == pytest.approx(1.0 - 3e-4, abs=1e-7)
    # Lion: sign of the interpolated momentum → exactly lr
    assert _one_step("lion") == pytest.approx(1.0 - 3e-4, abs=1e-7)


def test_adamw_applies_decoupled_weight_decay():
    p = nn.Parameter(torch.tensor([1.0]))
    opt = create_optimizer("adamw", [p], lr=0.1, weight_decay=0.5)
    p.grad = torch.tensor([0.0])
    opt.step()
    assert p.item() == pytest.approx(1.0 * (1 - 0.1 * 0.5))


def _toy(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    return x, y


def _net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "lion"])
def test_fit_is_deterministic_and_learns(optimizer):
    x, y = _toy()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = _net()
        lr = 0.1 if optimizer == "sgd" else 1e-2
        h = fit(m, x, torch.eye(2)[y], TrainConfig(epochs=10, batch_size=16, optimizer=optimizer, lr=lr, seed=3))
        runs.append((h, [p.detach().clone() for p in m.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    assert runs[0][0][-1]["train_loss"] < runs[0][0][0]["train_loss"]


def test_fit_with_hard_labels_and_callback():
    x, y = _toy()
    seen = []
    h = fit(_net(), x, y, TrainConfig(epochs=3, batch_size=16, augment=False, lr=1e-2),
            on_epoch=lambda e, row: seen.append(e) or {"extra": float(e)})
    assert seen == [1, 2, 3] and h[-1]["extra"] == 3.0


def test_augmentation_is_seeded_and_keeps_range():
    x = torch.rand(4, 3, 16, 16)
    a = random_crop_resize(x, torch.Generator().manual_seed(1))
    b = random_crop_resize(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
