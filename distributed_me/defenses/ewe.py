"""EWE, entangled watermarks: Jia, Choquette-Choo, Chandrasekaran, Papernot, "Entangled Watermarks as a Defense
against Model Extraction" (USENIX Security 2021, arXiv 2002.12200). A training-time watermark meant to survive
extraction: the owner trains the victim to answer a *trigger set* (out-of-distribution images) with a chosen target
class, and entangles the triggers' hidden representations with those of real target-class data, so that a clone
which learns the task from the API's answers on legitimate data also learns the watermark. Like AdvFT it produces a
new *version* of the victim (``dme defense ewe``); its trigger set is the owner's evidence for ``dme verify``.

The paper's text was not available here; what follows is checked against the authors' code
(cleverhans-lab/entangled-watermark, ``train.py`` and ``models.py``), whose MNIST defaults are ours (``train.py
--default 1``): batch 512, ratio 1, ``w_epochs`` 10, factors (32, 32, 32), temperatures (1, 1, 1), cosine
distance, threshold 0.1, ``maxiter`` 10, ``w_lr`` 0.01, ``t_lr`` 0.1, Adam lr 1e-3 (β 0.9, 0.99, ε 1e-5), source
class 1 → target class 7, out-of-distribution triggers.

- **SNNL** (:func:`snnl`, ``models.py``): on ReLU'd, flattened hidden features, pairwise cosine distance ``d``,
  ``e = clip(exp(−d / t) − I, 0, 1)`` and ``loss = −mean(log(1e-5 + Σ_j e_ij [w_i = w_j] / (1e-5 + Σ_j e_ij)))``
  with ``w`` = 1 for triggers and 0 for target-class data. The code passes ``t = 100 / T`` for a temperature ``T``
  (its "inv_temp"), so the effective temperature is ``100 / T``: we keep that.
- **Layers**: the code's 2-conv net entangles the pre-activations of its three hidden layers (conv, conv, fc). Ours,
  for any architecture: the outputs of the last three ``Conv2d`` / ``Linear`` modules before the classifier (for
  CNN32 its last three convolutions). Our choice, visible.
- **Triggers** (``train.py``, ``distribution == "out"``): as many images of the source as the training set has of
  the target class (repeated if fewer), from a dataset other than the victim's (MNIST's are Fashion-MNIST class 1).
  Ours: any pool, by default the embedded natural-photo crops (``photos``) adapted to the victim's input shape, or a
  labeled pool's ``source_class``. Per half-batch: ``maxiter`` rounds of [while the model answers more than
  ``threshold`` of them with the target (at most 50 steps in all): one signed step down the target logit] then one
  signed step up the SNNL of (triggers, target data); finally 5 signed steps down the target logit; ``w_lr`` steps,
  clipped to [0, 1]. So the *original* model answers at most ``threshold`` of the triggers with the target.
- **Training**: the code trains ``epochs`` without the watermark first; we start from the trained victim instead
  (that phase is done). Then ``round(w_epochs · num_batch / w_num_batch)`` rounds over the trigger half-batches,
  each of ``ratio`` normal batches (cross-entropy) and one watermark batch (half triggers, half target-class data,
  all labeled target) with ``loss = CE − Σ_i factor_i · SNNL_i``, the CE *summed* over the batch as in the code
  (the factors are calibrated against that sum). After each watermark batch ``T ← T − t_lr · ∂(Σ SNNL)/∂T``. A
  fractional ``ratio`` spreads ``floor(ratio · (b+1)) − floor(ratio · b)`` normal batches before batch ``b``. The
  code does not shuffle on MNIST (``--shuffle 0``); we reshuffle the normal data each round (our choice).
- **Verification**: the code measures the watermark success (the share of triggers answered with the target) of the
  victim, an extracted model and a clean one, and gives no test. Ours (:func:`calibrated_p0`, used by
  ``distributed_me.ownership.verify_ewe``): under H0 "the suspect was not derived from this victim" a suspect
  answers each trigger with the target with probability at most ``p0``, so ``P(Binomial(n, p0) ≥ matches)`` is the
  p-value. ``p0`` is calibrated when the watermark is made: the largest of ``threshold`` (what the trigger search
  enforced on the original model), the original model's rate, and the rates of ``references`` models trained from
  scratch on the defender's own data with the victim's recipe (different seeds) — the models H0 describes.
  A suspect that answers (nearly) *everything* with the target is not shown to carry the watermark by that alone,
  and a clone trained on a natural pool can be such a model: measured on the embedded digits victim (``dme bench
  ownership``), the watermarked version answers 99.2 % of 500 fresh photo crops with the target (the original
  3.0 %: the trigger is the whole source domain, as "Fashion-MNIST trousers → 7" is in the code), so a 2,000-query
  photo clone reached fidelity 0.20 and answered all 89 triggers, and 81 of 89 controls, with the target. So the
  evidence also keeps as many *control* images: the defender's in-distribution
  test images of the other classes, which any useful model answers with their own class. A second one-sided test
  (Fisher's exact) asks whether the suspect answers the triggers with the target more often than the controls, and
  the verdict needs both p-values below ``alpha`` (an intersection-union test: its p-value is the larger of the
  two). Our choice, visible.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..device import get_device
from ..errors import DmeError
from ..victims.bundle import Victim, load_bundle
from .versions import save_defended_bundle

log = logging.getLogger(__name__)

#: the owner's evidence, written into the protected bundle (and so logged to MLflow with it)
EVIDENCE_FILE = "ewe_watermark.npz"
#: fresh source-pool images (after the trigger sources) whose target rate shows the watermark's reach in that domain
SOURCE_PROBES = 500
EWE_BATCH = 512
EWE_RATIO = 1.0
EWE_W_EPOCHS = 10
EWE_LR = 1e-3
EWE_FACTORS = (32.0, 32.0, 32.0)
EWE_TEMPERATURES = (1.0, 1.0, 1.0)
EWE_THRESHOLD = 0.1
EWE_MAXITER = 10
EWE_W_LR = 0.01
EWE_T_LR = 0.1
EWE_TARGET = 7
EWE_SOURCE_POOL = "photos"
#: models trained from scratch to calibrate p0 (ours)
EWE_REFERENCES = 3
#: at most this many trigger-search steps down the target logit per half-batch (the code's 50)
MAX_DOWN_STEPS = 50


class EWEConfig(BaseModel):
    """EWE's parameters (defaults: the authors' MNIST values, see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    w_epochs: int = Field(EWE_W_EPOCHS, ge=1, description="epochs of watermarked training")
    batch_size: int = Field(EWE_BATCH, ge=2)
    ratio: float = Field(EWE_RATIO, ge=0, description="normal batches per watermark batch")
    lr: float = Field(EWE_LR, gt=0)
    factors: tuple[float, float, float] = EWE_FACTORS
    temperatures: tuple[float, float, float] = EWE_TEMPERATURES
    threshold: float = Field(EWE_THRESHOLD, gt=0, lt=1, description="the original model's largest target rate")
    maxiter: int = Field(EWE_MAXITER, ge=0)
    w_lr: float = Field(EWE_W_LR, gt=0)
    t_lr: float = Field(EWE_T_LR, ge=0)
    target: int = Field(EWE_TARGET, ge=0, description="class the triggers are answered with")
    source_pool: str = Field(EWE_SOURCE_POOL, description="pool the triggers come from (out of distribution)")
    source_class: int | None = Field(None, ge=0, description="class of a labeled source pool (None: any image)")
    references: int = Field(EWE_REFERENCES, ge=0, description="from-scratch models calibrating p0")
    reference_epochs: int | None = Field(None, ge=1, description="their epochs (None: the victim's recipe's)")
    seed: int = 0

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"temperatures must be positive, got {v}")
        return v

    @classmethod
    def from_given(cls, **given: Any) -> EWEConfig:
        """``None`` means "not given": the default here (CLI flags fall back to it)."""
        return cls(**{k: v for k, v in given.items() if v is not None})


def pairwise_cosine_distance(x: torch.Tensor) -> torch.Tensor:
    x = nn.functional.normalize(x, dim=1)
    return 1 - x @ x.T


def snnl(features: torch.Tensor, w: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The soft nearest-neighbour loss of ``features`` (one row per sample) with binary labels ``w``, at divisor
    ``t`` (``100 / T``; module docstring). High when the two groups are entangled."""
    x = torch.relu(features).flatten(1)
    same = (w[:, None] == w[None, :]).float()
    e = torch.clamp(torch.exp(-pairwise_cosine_distance(x) / t) - torch.eye(len(x), device=x.device), 0, 1)
    prob = e / (1e-5 + e.sum(1, keepdim=True)) * same
    return -torch.log(1e-5 + prob.sum(1)).mean()


class HiddenLayers:
    """Outputs of the last three ``Conv2d`` / ``Linear`` modules before a model's classifier (forward hooks)."""

    def __init__(self, model: nn.Module, count: int = 3):
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if len(layers) < count + 1:
            raise DmeError(f"EWE needs {count} hidden Conv2d/Linear layers before the classifier; "
                           f"{type(model).__name__} has {len(layers) - 1}")
        self.layers = layers[-count - 1 : -1]
        self._seen: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._seen.append(output)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self._seen = []
        logits = model(x)
        seen, self._seen = self._seen, []
        return seen, logits

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def entangle_loss(hidden: list[torch.Tensor], w: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """``Σ_i SNNL_i`` over the hidden layers with divisors ``100 / T_i`` (unweighted: the trigger search's and the
    temperature update's objective)."""
    return sum(snnl(h, w, 100.0 / temperatures[i]) for i, h in enumerate(hidden))  # type: ignore[return-value]


def watermark_loss(logits: torch.Tensor, y: torch.Tensor, hidden: list[torch.Tensor], w: torch.Tensor,
                   temperatures: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    """A watermark batch's loss: summed cross-entropy minus the factor-weighted SNNL of each hidden layer."""
    ce = nn.functional.cross_entropy(logits, y, reduction="sum")
    return ce - sum(f * snnl(h, w, 100.0 / temperatures[i]) for i, (f, h) in enumerate(zip(factors, hidden)))


def target_rate(model: nn.Module, images: torch.Tensor, target: int, batch_size: int = 512) -> float:
    """The share of ``images`` the model answers with ``target`` (the watermark success)."""
    from ..train import predict_labels

    if len(images) == 0:
        return float("nan")
    return float((predict_labels(model, images, batch_size) == target).float().mean())


def _signed_step(x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], step: float) -> torch.Tensor:
    """``clip(x + step · sign(∂objective/∂x), 0, 1)`` (a negative ``step`` descends)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    return torch.clamp(x.detach() + step * grad.sign(), 0, 1)


def make_trigger(model: nn.Module, source: torch.Tensor, x_target: torch.Tensor, cfg: EWEConfig,
                 half: int) -> torch.Tensor:
    """The trigger search (module docstring) on the original model, per half-batch of ``source``."""
    model.eval()
    hooks = HiddenLayers(model)
    temps = torch.tensor(cfg.temperatures)
    device = next(model.parameters()).device
    out = []
    try:
        for b in range(0, len(source), half):
            cur = source[b : b + half].to(device)
            tgt = x_target[b % len(x_target) :][: len(cur)].to(device)
            if len(tgt) < len(cur):
                tgt = x_target[: len(cur)].to(device)
            w = torch.cat([torch.ones(len(cur)), torch.zeros(len(tgt))]).to(device)

            def down(x: torch.Tensor) -> torch.Tensor:
                return model(x)[:, cfg.target].sum()

            def up(x: torch.Tensor, tgt: torch.Tensor = tgt, w: torch.Tensor = w) -> torch.Tensor:
                hidden, _ = hooks(model, torch.cat([x, tgt]))
                return entangle_loss(hidden, w, temps.to(device))

            steps = 0
            for _ in range(cfg.maxiter):
                while target_rate(model, cur, cfg.target) > cfg.threshold and steps < MAX_DOWN_STEPS:
                    steps += 1
                    cur = _signed_step(cur, down, -cfg.w_lr)
                cur = _signed_step(cur, up, cfg.w_lr)
            for _ in range(5):
                cur = _signed_step(cur, down, -cfg.w_lr)
            out.append(cur.cpu())
    finally:
        hooks.close()
    return torch.cat(out)


@dataclass
class EWEHistory:
    """Per round: the mean normal-batch CE, the watermark batch's summed SNNL, and the temperatures."""

    ce: list[float] = field(default_factory=list)
    snnl: list[float] = field(default_factory=list)
    temperatures: list[list[float]] = field(default_factory=list)


def ewe_train(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, trigger: torch.Tensor,
              cfg: EWEConfig, *, device: torch.device | None = None,
              on_round: Callable[[int, int, EWEHistory], None] | None = None) -> tuple[nn.Module, EWEHistory]:
    """Watermarked training (module docstring) of a copy of ``model``; ``model`` is not modified."""
    device = device or get_device()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = copy.deepcopy(model).to(device)
    hooks = HiddenLayers(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-5)
    temps = torch.tensor(cfg.temperatures, device=device)
    x_target = x_train[y_train == cfg.target]
    bs = min(cfg.batch_size, len(x_train))
    half = max(1, min(bs // 2, len(x_target), len(trigger)))
    num_batch = max(1, len(x_train) // bs)
    w_num_batch = max(1, min(len(x_target), len(trigger)) // half)
    rounds = max(1, round(cfg.w_epochs * num_batch / w_num_batch))
    hist = EWEHistory()
    for r in range(rounds):
        net.train()
        order, j = torch.randperm(len(x_train), generator=gen), 0
        ce_sum, ce_n, sn_sum = 0.0, 0, 0.0
        for b in range(w_num_batch):
            for _ in range(int(np.floor(cfg.ratio * (b + 1))) - int(np.floor(cfg.ratio * b))):
                if j + bs > len(order):
                    j = 0
                idx = order[j : j + bs]
                j += bs
                logits = net(x_train[idx].to(device))
                loss = nn.functional.cross_entropy(logits, y_train[idx].to(device), reduction="sum")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum, ce_n = ce_sum + loss.item() / len(idx), ce_n + 1
            xb = torch.cat([trigger[b * half : (b + 1) * half], x_target[b * half : (b + 1) * half]]).to(device)
            n_trig = len(trigger[b * half : (b + 1) * half])
            w = torch.cat([torch.ones(n_trig), torch.zeros(len(xb) - n_trig)]).to(device)
            y = torch.full((len(xb),), cfg.target, dtype=torch.long, device=device)
            t_var = temps.clone().requires_grad_(True)
            hidden, logits = hooks(net, xb)
            loss = watermark_loss(logits, y, hidden, w, t_var.detach(), cfg.factors)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # the temperatures follow the gradient of the SNNL (on this batch's features) with respect to them
            sn = entangle_loss([h.detach() for h in hidden], w, t_var)
            (t_grad,) = torch.autograd.grad(sn, t_var)
            temps = (temps - cfg.t_lr * t_grad).clamp_min(1e-3)
            sn_sum += sn.item()
        hist.ce.append(ce_sum / max(ce_n, 1))
        hist.snnl.append(sn_sum / w_num_batch)
        hist.temperatures.append([float(t) for t in temps])
        if on_round is not None:
            on_round(r, rounds, hist)
    hooks.close()
    net.eval()
    return net.cpu(), hist


def victim_recipe(victim: Victim) -> dict[str, Any]:
    """The victim's training recipe (the :class:`~distributed_me.train.TrainConfig` fields of its metadata)."""
    from ..train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in victim.meta.train_config.items() if k in known}


def _reference_rates(victim: Victim, x_train: torch.Tensor, y_train: torch.Tensor, trigger: torch.Tensor,
                     cfg: EWEConfig, progress: bool) -> list[float]:
    """Target rates on ``trigger`` of ``cfg.references`` models trained from scratch with the victim's recipe."""
    from ..models import NormalizedModel, create_model
    from ..train import TrainConfig, fit

    recipe = victim_recipe(victim)
    rates = []
    for i in range(cfg.references):
        seed = cfg.seed + 1000 + i
        torch.manual_seed(seed)
        net = create_model(victim.meta.arch, victim.meta.num_classes, victim.meta.in_chans, victim.meta.img_size,
                           **victim.meta.arch_kwargs)
        model = NormalizedModel(net, victim.model.normalization)
        epochs = {"epochs": cfg.reference_epochs} if cfg.reference_epochs else {}
        fit(model, x_train, y_train, TrainConfig(**{**recipe, **epochs, "seed": seed}), progress=progress,
            desc=f"EWE reference {i + 1}/{cfg.references}")
        rates.append(target_rate(model, trigger, cfg.target))
    return rates


def calibrated_p0(threshold: float, original_rate: float, reference_rates: list[float]) -> float:
    """H0's per-trigger target probability (module docstring): the largest of the three."""
    return float(max([threshold, original_rate, *reference_rates]))


def _source_images(victim: Victim, cfg: EWEConfig, n: int, skip: int = 0) -> torch.Tensor:
    """``n`` images of ``cfg.source_pool`` in a fixed shuffled order from position ``skip`` on (the order repeats
    where the pool has fewer, as the code does): ``skip=0`` gives the trigger sources, ``skip=n_sources`` fresh ones
    for measuring how much of the source domain the watermark took over."""
    from ..data import load_pool
    from ..data.base import to_tensor

    pool = load_pool(cfg.source_pool, seed=cfg.seed)
    ids = np.arange(len(pool))
    if cfg.source_class is not None:
        if pool.labels is None:
            raise DmeError(f"EWE source_class {cfg.source_class} needs a labeled source pool; {cfg.source_pool!r} "
                           "has no labels (leave source_class unset to draw any of its images)")
        ids = ids[np.asarray(pool.labels) == cfg.source_class]
        if len(ids) == 0:
            raise DmeError(f"EWE source pool {cfg.source_pool!r} has no image of class {cfg.source_class}")
    ids = np.resize(np.random.default_rng(cfg.seed).permutation(ids), skip + n)[skip:]
    c, s, _ = victim.input_shape
    return to_tensor(pool.get(ids, size=s, channels=c))


def control_images(x_test: torch.Tensor, y_test: torch.Tensor, target: int, n: int, seed: int) -> torch.Tensor:
    """Up to ``n`` of the defender's test images whose class is not ``target`` (the verification's controls)."""
    others = torch.nonzero(y_test != target).flatten()
    pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n]]
    return x_test[pick]


@dataclass
class Watermarked:
    """An EWE-watermarked victim version, its evidence and what it costs."""

    victim: Victim
    path: Path
    metrics: dict[str, float]
    history: EWEHistory
    config: EWEConfig


def save_evidence(path: Path, trigger: torch.Tensor, control: torch.Tensor, target: int, p0: float,
                  info: dict[str, Any]) -> Path:
    np.savez_compressed(path, trigger=trigger.numpy().astype(np.float32),
                        control=control.numpy().astype(np.float32), target=np.int64(target),
                        p0=np.float64(p0), info=np.array(json.dumps(info)))
    return path


def watermark_victim(victim: Victim, cfg: EWEConfig | None = None, *, out: str | Path | None = None,
                     progress: bool = False) -> Watermarked:
    """EWE on ``victim`` with its own training split; saves the watermarked bundle with :data:`EVIDENCE_FILE`
    (default folder ``$DME_HOME/victims/ewe/<parent sha>-<config hash>``). Metrics: ``acc_before`` / ``acc_after``
    (test accuracy), ``agreement``, ``kl_test``, ``kl_train`` (as AdvFT's), ``wm_original`` / ``wm_victim`` (target
    rate on the triggers of the original and the watermarked model), ``control_victim`` (the watermarked model's
    on the controls: its test images of other classes), ``source_original`` / ``source_victim`` (target rate on
    :data:`SOURCE_PROBES` fresh images of the source pool: how much of that domain the watermark took over),
    ``wm_reference_max`` and ``p0``."""
    from ..metrics import KL_TRAIN_IMAGES, accuracy, kl_divergence
    from ..train import predict_probs
    from .kits import _defender_data

    cfg = cfg or EWEConfig()
    k = victim.meta.num_classes
    if cfg.target >= k:
        raise DmeError(f"EWE target {cfg.target} is not a class of victim {victim.meta.name!r} (0..{k - 1}); "
                       "pass --target")
    x_train, y_train, x_test, y_test = _defender_data(victim)
    x_target = x_train[y_train == cfg.target]
    if len(x_target) == 0:
        raise DmeError(f"victim {victim.meta.name!r}'s training split has no image of target class {cfg.target}")
    half = max(1, min(min(cfg.batch_size, len(x_train)) // 2, len(x_target)))
    original = victim.model.eval()
    source = _source_images(victim, cfg, len(x_target))
    control = control_images(x_test, y_test, cfg.target, len(x_target), cfg.seed)
    trigger = make_trigger(copy.deepcopy(original).to(get_device()), source, x_target, cfg, half)
    wm_original = target_rate(original, trigger, cfg.target)

    def every(r: int, rounds: int, hist: EWEHistory) -> None:
        if progress and (r + 1 == rounds or (r + 1) % max(1, rounds // 10) == 0):
            print(f"EWE round {r + 1}/{rounds}: CE {hist.ce[-1]:.4g}  SNNL {hist.snnl[-1]:.4g}  "
                  f"T {', '.join(f'{t:.3g}' for t in hist.temperatures[-1])}", flush=True)

    model, hist = ewe_train(original, x_train, y_train, trigger, cfg, on_round=every)
    refs = _reference_rates(victim, x_train, y_train, trigger, cfg, progress)
    p0 = calibrated_p0(cfg.threshold, wm_original, refs)
    probes = _source_images(victim, cfg, SOURCE_PROBES, skip=len(source))
    p_r, p_w = predict_probs(original, x_test), predict_probs(model, x_test)
    x_kl = x_train[:KL_TRAIN_IMAGES]
    metrics = {"acc_before": accuracy(p_r.argmax(1), y_test), "acc_after": accuracy(p_w.argmax(1), y_test),
               "agreement": float((p_r.argmax(1) == p_w.argmax(1)).float().mean()),
               "kl_test": kl_divergence(p_r, p_w),
               "kl_train": kl_divergence(predict_probs(original, x_kl), predict_probs(model, x_kl)),
               "wm_original": wm_original, "wm_victim": target_rate(model, trigger, cfg.target),
               "control_victim": target_rate(model, control, cfg.target),
               "source_original": target_rate(original, probes, cfg.target),
               "source_victim": target_rate(model, probes, cfg.target),
               "wm_reference_max": max(refs) if refs else float("nan"), "p0": p0, "triggers": float(len(trigger))}
    path = save_defended_bundle(victim, model, "ewe", cfg.model_dump(), metrics["acc_after"], out)
    save_evidence(path / EVIDENCE_FILE, trigger, control, cfg.target, p0,
                  {"reference_rates": refs, "original_rate": wm_original, "threshold": cfg.threshold,
                   "source_pool": cfg.source_pool, "source_class": cfg.source_class,
                   "parent": victim.meta.weights_sha256})
    log.info("EWE: %s", ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return Watermarked(load_bundle(path), path, metrics, hist, cfg)


__all__ = ["EVIDENCE_FILE", "SOURCE_PROBES", "EWEConfig", "EWEHistory", "HiddenLayers", "Watermarked", "calibrated_p0",
           "control_images", "entangle_loss", "ewe_train", "make_trigger", "save_evidence", "snnl", "target_rate",
           "victim_recipe", "watermark_loss", "watermark_victim"]
