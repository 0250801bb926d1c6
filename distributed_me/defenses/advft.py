"""AdvFT, adversarial fine-tuning: "Poisoning-free defense against black-box model extraction" (paper 002, §2.3,
Algorithm 1, losses (1)-(3)). A model-side defense: it produces a new *version* of the victim, served like any other
(no output policy, nothing in the serving path), whose answers to in-distribution queries stay those of the original
while its features for out-of-distribution (generated) queries move away.

Notation (§2.3): ``M_R`` the original (reference) model, ``M_F`` the protected (fine-tuned) one, initialized from
``M_R``; ``F_R``, ``F_F`` their penultimate features (the input of the last linear layer); ``G`` a generator.

- Generator step, eq. (1): ``L_G = ||F_F(x_fake) − F_R(x_fake)||²`` — ``G`` learns samples the two models still see
  alike; repeated ``I_G`` times per epoch with both models fixed.
- Model step, eq. (2)-(3): ``L_F1 = max{ ||F_F(x_train) − F_R(x_train)||² − ||F_F(x_fake) − F_R(x_fake)||² + m, 0 }``
  and ``L_F2 = ||F_F(x_train) − F_R(x_train)||²``, ``L_F = L_F1 + L_F2`` — ``M_F`` keeps its ID features and pushes
  the generated ones at least ``m`` further; repeated ``I_F`` times per epoch with ``G`` fixed. The last layer of
  ``M_F`` is frozen throughout (Algorithm 1, line 2), so the classifier over the features is the original's.
- ``N`` epochs of both (Algorithm 1, line 3).

Defaults from the paper: ``m = 100`` (Tables 2 and 3, all tasks but FMNIST against KnockoffNets, 150) and
``N = 30`` (CIFAR10-ResNet18, Tables 2 and 3; MNIST 6 and 75, FMNIST 83 and 59: the paper tunes N per task). The
paper does not give the rest; our choices, visible:

- ``I_G`` and ``I_F`` are not given. An "epoch" is read as one pass over the training data: ``I_F`` defaults to the
  number of training batches, and ``I_G`` to the same (the paper alternates the two without a ratio).
- The generator is DFME's (the paper's attack of Table 2 and the usual choice for synthetic OOD samples;
  :class:`~distributed_me.models.generator.Generator`), images ``(tanh + 1) / 2`` in the victim's [0, 1] input space,
  with Adam (lr 1e-3) as in DFME. ``M_F``: Adam, lr 1e-4 (fine-tuning). Batches of 128 real and 128 generated.
- The squared norms are averaged over the batch, and the hinge of eq. (2) is taken on the two batch means (the
  paper writes one pair; batches of ID and generated samples are independent draws, so there is no pairing).
- ``M_F`` runs in eval mode: batch-norm statistics stay those of the training data (updating them on generated
  samples would change the ID answers the loss protects); its affine parameters are fine-tuned.
- **Symmetry breaking** (a finding, not in the paper): with ``M_F ← M_R`` exactly (Algorithm 1, line 1) every
  feature gap is 0 and so is the gradient of a squared gap, for ``M_F`` in (2)-(3) and for ``G`` in (1): the
  algorithm as written stays at its start (measured: L_F1 = m and L_F2 = 0 at every epoch). In the authors' setting
  something else must break the tie (train-mode batch norm or dropout would). We add Gaussian noise to each of
  ``M_F``'s trainable tensors at the start, ``init_noise`` (default 0.01) times that tensor's standard deviation,
  and count its effect in the metrics (Acc_MF and KL are measured on the final model).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..device import get_device
from ..metrics import KL_TRAIN_IMAGES
from ..models.generator import Generator, to_images
from ..victims.bundle import Victim, load_bundle
from .mad import _last_linear
from .versions import save_defended_bundle

log = logging.getLogger(__name__)

#: the margin m of eq. (2) (Tables 2 and 3)
ADVFT_MARGIN = 100.0
#: N, AdvFT epochs (Tables 2 and 3, CIFAR10-ResNet18)
ADVFT_EPOCHS = 30
ADVFT_BATCH = 128
#: generator and protected model learning rates (ours: DFME's generator Adam; a fine-tuning rate for M_F)
ADVFT_LR_G = 1e-3
ADVFT_LR_F = 1e-4
ADVFT_NZ = 256
ADVFT_NGF = 64
#: relative scale of the noise that breaks M_F = M_R's symmetry (ours; see the module docstring)
ADVFT_INIT_NOISE = 0.01


def feature_gap(f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """``||f_a − f_b||²`` per sample (rows of penultimate features)."""
    return (f_a - f_b).pow(2).flatten(1).sum(dim=1)


def generator_loss(ff_fake: torch.Tensor, fr_fake: torch.Tensor) -> torch.Tensor:
    """Eq. (1), averaged over the batch."""
    return feature_gap(ff_fake, fr_fake).mean()


def model_loss(ff_train: torch.Tensor, fr_train: torch.Tensor, ff_fake: torch.Tensor, fr_fake: torch.Tensor,
               margin: float = ADVFT_MARGIN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eqs. (2) and (3) on batch means: ``(L_F1, L_F2, L_F)``."""
    l_f2 = feature_gap(ff_train, fr_train).mean()
    l_f1 = torch.clamp(l_f2 - feature_gap(ff_fake, fr_fake).mean() + margin, min=0.0)
    return l_f1, l_f2, l_f1 + l_f2


class Penultimate:
    """Reads a model's penultimate features: the input of its last ``nn.Linear`` (a forward hook), with its logits.
    :meth:`close` removes the hook."""

    def __init__(self, model: nn.Module):
        self.model, self.layer = model, _last_linear(model)
        self._seen: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._hook)

    def close(self) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._seen = inputs[0]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        assert self._seen is not None
        feats, self._seen = self._seen, None
        return feats, logits


def freeze_last_layer(model: nn.Module) -> nn.Linear:
    """Algorithm 1, line 2: the last linear layer gets no gradient (returned, for checks)."""
    layer = _last_linear(model)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


class AdvFTConfig(BaseModel):
    """Algorithm 1's inputs besides the models and data (defaults: see the module docstring). ``None`` for a step
    count means one pass over the training batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    margin: float = Field(ADVFT_MARGIN, gt=0, description="m of eq. (2)")
    epochs: int = Field(ADVFT_EPOCHS, ge=1, description="N, outer iterations of Algorithm 1")
    gen_steps: int | None = Field(None, ge=1, description="I_G, generator updates per epoch")
    model_steps: int | None = Field(None, ge=1, description="I_F, protected-model updates per epoch")
    batch_size: int = Field(ADVFT_BATCH, ge=1)
    lr_g: float = Field(ADVFT_LR_G, gt=0)
    lr_f: float = Field(ADVFT_LR_F, gt=0)
    nz: int = Field(ADVFT_NZ, ge=1, description="generator noise dimension")
    ngf: int = Field(ADVFT_NGF, ge=1, description="generator width (DFME's 64)")
    init_noise: float = Field(ADVFT_INIT_NOISE, ge=0, description="relative noise breaking M_F = M_R's symmetry")
    seed: int = 0

    @classmethod
    def from_given(cls, **given: Any) -> AdvFTConfig:
        """``None`` means "not given": the default here (CLI flags and sweep fields fall back to it)."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def steps(self, n_train: int) -> tuple[int, int]:
        per_pass = max(1, -(-n_train // self.batch_size))
        return self.gen_steps or per_pass, self.model_steps or per_pass


@dataclass
class AdvFTHistory:
    """Per epoch, the mean of each loss over its steps (what MLflow and the tests read)."""

    l_g: list[float] = field(default_factory=list)
    l_f1: list[float] = field(default_factory=list)
    l_f2: list[float] = field(default_factory=list)


def advft(model_r: nn.Module, x_train: torch.Tensor, cfg: AdvFTConfig | None = None, *,
          device: torch.device | None = None,
          on_epoch: Callable[[int, AdvFTHistory], None] | None = None) -> tuple[nn.Module, AdvFTHistory]:
    """Algorithm 1: the protected model ``M_F`` (a new module; ``model_r`` is not modified) and the loss history.
    ``x_train``: the defender's training images, float NCHW in [0, 1] (what the model takes)."""
    cfg = cfg or AdvFTConfig()
    device = device or get_device()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ref = copy.deepcopy(model_r).to(device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    prot = copy.deepcopy(model_r).to(device).eval()
    freeze_last_layer(prot)
    with torch.no_grad():  # break the symmetry of M_F = M_R (module docstring)
        for p in prot.parameters():
            if p.requires_grad and p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen).to(device) * (cfg.init_noise * float(p.std())))
    f_r, f_f = Penultimate(ref), Penultimate(prot)
    g = Generator(tuple(x_train.shape[1:]), nz=cfg.nz, ngf=cfg.ngf).to(device).train()
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr_g)
    opt_f = torch.optim.Adam([p for p in prot.parameters() if p.requires_grad], lr=cfg.lr_f)
    i_g, i_f = cfg.steps(len(x_train))
    hist = AdvFTHistory()

    def fake(n: int) -> torch.Tensor:
        return to_images(g(torch.randn(n, cfg.nz, generator=gen).to(device)))

    order = torch.randperm(len(x_train), generator=gen)
    cursor = 0
    for epoch in range(cfg.epochs):
        sums = [0.0, 0.0, 0.0]
        for _ in range(i_g):  # lines 4-8: G against the two fixed models
            x_fake = fake(cfg.batch_size)
            loss = generator_loss(f_f(x_fake)[0], f_r(x_fake)[0])
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            sums[0] += loss.item()
        for _ in range(i_f):  # lines 9-13: M_F against the fixed G
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(x_train), generator=gen), 0
            x_tr = x_train[order[cursor : cursor + cfg.batch_size]].to(device)
            cursor += cfg.batch_size
            with torch.no_grad():
                x_fake = fake(cfg.batch_size)
                fr_tr, fr_fake = f_r(x_tr)[0], f_r(x_fake)[0]
            l_f1, l_f2, l_f = model_loss(f_f(x_tr)[0], fr_tr, f_f(x_fake)[0], fr_fake, cfg.margin)
            opt_f.zero_grad(set_to_none=True)
            l_f.backward()
            opt_f.step()
            sums[1] += l_f1.item()
            sums[2] += l_f2.item()
        hist.l_g.append(sums[0] / i_g)
        hist.l_f1.append(sums[1] / i_f)
        hist.l_f2.append(sums[2] / i_f)
        log.info("AdvFT epoch %d/%d: L_G %.4g, L_F1 %.4g, L_F2 %.4g", epoch + 1, cfg.epochs, hist.l_g[-1],
                 hist.l_f1[-1], hist.l_f2[-1])
        if on_epoch is not None:
            on_epoch(epoch, hist)
    f_r.close()
    f_f.close()
    for p in prot.parameters():
        p.requires_grad_(True)
    return prot.cpu(), hist


@dataclass
class Protected:
    """A protected victim version and what it costs / changes (Table 2's columns)."""

    victim: Victim
    path: Path
    metrics: dict[str, float]
    history: AdvFTHistory
    config: AdvFTConfig


def protect_victim(victim: Victim, cfg: AdvFTConfig | None = None, *, out: str | Path | None = None,
                   progress: bool = False) -> Protected:
    """Run AdvFT on ``victim`` with its own training split (the defender's data) and save the protected model as a
    bundle (default: ``$DME_HOME/victims/advft/<parent sha>-<config hash>``). Metrics: ``acc_mr`` and ``acc_mf``
    (test accuracy before and after), ``agreement`` (top-1 agreement of the two on the test split), ``kl_test`` and
    ``kl_train`` (KL(M_R ‖ M_F) of their softmax on the test split and on up to ``KL_TRAIN_IMAGES`` training images,
    as the defender's metrics of output policies are)."""
    from ..metrics import accuracy, kl_divergence
    from ..train import predict_probs
    from .kits import _defender_data

    cfg = cfg or AdvFTConfig()
    x_train, _, x_test, y_test = _defender_data(victim)

    def every(epoch: int, hist: AdvFTHistory) -> None:
        if progress:
            print(f"AdvFT epoch {epoch + 1}/{cfg.epochs}: L_G {hist.l_g[-1]:.4g}  L_F1 {hist.l_f1[-1]:.4g}  "
                  f"L_F2 {hist.l_f2[-1]:.4g}", flush=True)

    model, hist = advft(victim.model, x_train, cfg, on_epoch=every)
    model.eval()
    p_r, p_f = predict_probs(victim.model, x_test), predict_probs(model, x_test)
    x_kl = x_train[:KL_TRAIN_IMAGES]
    metrics = {"acc_mr": accuracy(p_r.argmax(1), y_test), "acc_mf": accuracy(p_f.argmax(1), y_test),
               "agreement": float((p_r.argmax(1) == p_f.argmax(1)).float().mean()),
               "kl_test": kl_divergence(p_r, p_f),
               "kl_train": kl_divergence(predict_probs(victim.model, x_kl), predict_probs(model, x_kl))}
    path = save_defended_bundle(victim, model, "advft", cfg.model_dump(), metrics["acc_mf"], out)
    log.info("AdvFT: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return Protected(load_bundle(path), path, metrics, hist, cfg)


__all__ = ["AdvFTConfig", "AdvFTHistory", "Penultimate", "Protected", "advft", "feature_gap", "freeze_last_layer",
           "generator_loss", "model_loss", "protect_victim"]
