"""MAD, prediction poisoning: Orekondy, Schiele, Fritz, "Prediction Poisoning: Towards Defenses Against DNN Model
Stealing Attacks" (ICLR 2020, arXiv 1906.10908). The paper's text was not readable here (its approach section,
"maximizing angular deviation", is cited from memory, without equation numbers); the algorithm below is checked line
by line against the authors' code, tribhuvanesh/prediction-poisoning ``defenses/victim/bb_mad.py`` (class ``MAD``)
and its README.

Threat model: the attacker sees the full probability vector and trains a clone on it (soft-label distillation,
KnockoffNets, JBDA). MAD answers ``ŷ`` instead of ``y`` so that the gradient the clone takes on ``ŷ`` points away from
the one it would take on ``y``, while ``||ŷ − y|| ≤ ε`` (the utility budget, per answer, in L1 or L2).

The defender does not know the clone, so it uses a *surrogate* ``F_A`` and ``G``, the Jacobian of ``log softmax(F_A)``
w.r.t. the surrogate's last linear layer's weights (``bb_mad.py`` ``compute_jacobian_nll`` takes ``params[-2]``, the
FC weight; its README: "jacobians (from the FC-layer) of surrogate models ... essentially randomly-initialized models
exhibiting chance-level performance"). A clone training with cross-entropy on a label ``y`` moves along ``Gᵀy``.

The answer, for one query (``mad_perturb`` does it for a batch):

1. *Target* ``y*``: the candidate maximizing the objective. MAD: the K simplex vertices (``oracle_extreme``).
   MAD-argmax: the vertices of the argmax-preserving polytope ``{ỹ ∈ Δ : ỹ_k ≥ ỹ_j}`` (k = y's top-1), i.e. the
   uniform distributions over subsets S ∋ k, with ``1e-5`` added to ``k`` before normalizing so that k stays the
   strict top (``oracle_argmax_preserving``). Exhaustive for K ≤ 10 (``2^(K−1)`` subsets, as the authors); for
   K > 10 the authors' greedy search: grow S one class at a time, best first, for at most 1024 evaluations.
2. *Line search* ``ŷ = (1 − α) y + α y*`` with ``α = min(1, ε / ||y* − y||)`` (``linesearch`` with
   ``closed_form_alpha_estimate``, the default ``optim='linesearch'``): the largest step towards ``y*`` inside the
   ε-ball. A convex combination of two points of the simplex stays on it, so no projection is needed.

Objectives (``objective=``): ``"angular"`` is the paper's, ``||Gᵀỹ/||Gᵀỹ|| − Gᵀy/||Gᵀy||||²`` = 2 − 2 cos of the angle
between the two gradient directions (``calc_objective``); ``"surrogate"`` is ``||Gᵀ(ỹ − y)||²``
(``calc_surrogate_objective``). The code's *class* default is the surrogate (``objmax=False``), but every run its
README documents passes ``objmax:True``, the angular objective; we default to ``"angular"``. Note: with ``G`` of the
last layer only, ``Gᵀ(e_k − y) = vec((e_k − y) hᵀ)`` for penultimate features ``h``, so the surrogate objective
reduces to ``||e_k − y||²`` and always picks the least likely class whatever the surrogate, which is why it matters.

Defaults from the authors' README ("Running Experiments"): ``eps=0.5``, ``norm="l1"`` (``ydist=l1``),
``objective="angular"``; MAD-argmax is their ``oracle=argmax``. Sign of ``G``: we use ``∇ log softmax`` (the code uses
``∇ −log softmax``); both objectives are invariant under ``G → −G``, so the choice of target is the same.

Our choices where the code is silent or fragile, all visible here:

- Ties between candidates go to the first one (the code's strict ``>``). A zero gradient direction (``Gᵀc = 0``) is
  taken as the zero vector in the angular objective (the code would produce NaN); with ``G ≡ 0`` every candidate
  ties and MAD moves towards class 0 (the code: also class 0 with ``objmax=False``, the last class with NaNs).
- Answers are float32. The step is shortened by a float32 rounding margin (``K·2⁻²⁴`` in L1, ``√K·2⁻²⁴`` in L2) so
  the returned float32 row is within ε of ``y`` as given, not only before rounding. ``eps=0`` returns ``y``.
- MAD-argmax checks the float32 row: if rounding tied the top class with an earlier index, α is halved until it
  does not (then ``y`` itself). The greedy search evaluates the singleton ``{k}`` too and stops when every class is
  in S (the code raises on an empty candidate list for 10 < K < 46).
- ``surrogate_jacobian`` runs the model in eval mode (batch-norm statistics, no dropout) and restores its mode.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..train import predict_probs
from .kits import KitInputs, new_model_like, register_kit, save_model
from .policies import OutputPolicy, PolicyContext, RowStreams, register_policy

log = logging.getLogger(__name__)

Norm = Literal["l1", "l2"]
Objective = Literal["angular", "surrogate"]

#: utility budget ||ŷ − y|| per answer (authors' README: ``eps=0.5``, ``ydist=l1``)
MAD_EPSILON = 0.5
MAD_NORM: Norm = "l1"
#: authors' README passes ``objmax:True``: maximize the angular deviation itself
MAD_OBJECTIVE: Objective = "angular"
#: MAD-argmax enumerates every vertex up to this many classes, then searches greedily (``bb_mad.py``: ``K > 10``)
ARGMAX_EXACT_MAX_CLASSES = 10
#: greedy search budget, in objective evaluations (``oracle_argmax_preserving_approx``: ``max_iters=1024``)
ARGMAX_GREEDY_EVALS = 1024
#: weight added to the top class of an argmax-preserving vertex so it stays the strict top (``bb_mad.py``)
ARGMAX_TIE_BREAK = 1e-5

#: a gradient direction whose squared norm is below this fraction of trace(G Gᵀ) counts as zero
_ZERO_NORM = 1e-12


def _gram(G: np.ndarray) -> np.ndarray:
    """``G Gᵀ`` per row (N, K, K): every objective only needs inner products of gradient directions."""
    return np.matmul(G, np.swapaxes(G, 1, 2))


def _objective(cands: np.ndarray, y: np.ndarray, A: np.ndarray, objective: Objective) -> np.ndarray:
    """Objective of candidates ``cands`` (N, M, K) against ``y`` (N, K) given ``A = G Gᵀ`` (N, K, K) → (N, M)."""
    cA = np.matmul(cands, A)  # (N, M, K)
    cAc = np.einsum("nmk,nmk->nm", cA, cands)
    cAy = np.einsum("nmk,nk->nm", cA, y)
    yAy = np.einsum("nk,nkj,nj->n", y, A, y)[:, None]
    if objective == "surrogate":
        return cAc - 2 * cAy + yAy
    scale = np.trace(A, axis1=1, axis2=2)[:, None]
    cz, yz = cAc <= _ZERO_NORM * scale, yAy <= _ZERO_NORM * scale
    denom = np.sqrt(np.where(cz, 1.0, cAc) * np.where(yz, 1.0, yAy))
    cos = np.where(cz | yz, 0.0, np.clip(cAy / denom, -1.0, 1.0))
    return (~cz).astype(float) + (~yz).astype(float) - 2 * cos


def _subset_vertices(K: int, k: int) -> np.ndarray:
    """Vertices of the polytope where class ``k`` stays on top: uniform over each subset S ∋ k, k up-weighted."""
    bits = np.array(list(itertools.product([0.0, 1.0], repeat=K - 1))).reshape(-1, K - 1)
    S = np.insert(bits, k, 1.0, axis=1)
    S[:, k] += ARGMAX_TIE_BREAK
    return S / S.sum(axis=1, keepdims=True)


def _greedy_argmax_target(y: np.ndarray, A: np.ndarray, objective: Objective) -> np.ndarray:
    """The authors' greedy search over argmax-preserving vertices, for one row (K > 10)."""
    K = y.shape[0]
    k = int(np.argmax(y))

    def vertex(members: np.ndarray) -> np.ndarray:
        v = members.astype(float)
        v[..., k] += ARGMAX_TIE_BREAK
        return v / v.sum(axis=-1, keepdims=True)

    fixed = np.zeros(K, dtype=bool)
    fixed[k] = True
    best = vertex(fixed)
    best_val = _objective(best[None, None], y[None], A[None], objective)[0, 0]
    evals = 1
    while evals < ARGMAX_GREEDY_EVALS and not fixed.all():
        free = np.flatnonzero(~fixed)
        members = np.repeat(fixed[None], len(free), axis=0)
        members[np.arange(len(free)), free] = True
        cands = vertex(members)
        vals = _objective(cands[None], y[None], A[None], objective)[0]
        evals += len(free)
        i = int(np.argmax(vals))
        if vals[i] > best_val:
            best, best_val = cands[i], vals[i]
        fixed[free[i]] = True
    return best


def mad_target(
    y: np.ndarray,
    G: np.ndarray,
    *,
    objective: Objective = MAD_OBJECTIVE,
    argmax_preserving: bool = False,
) -> np.ndarray:
    """Step 1 of MAD: the candidate ``y*`` (N, K) that maximizes ``objective`` for each row (see the module doc)."""
    y = np.asarray(y, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    if y.ndim != 2 or G.ndim != 3 or G.shape[:2] != y.shape:
        raise ValueError(f"y must be (N, K) and G (N, K, D); got {y.shape} and {G.shape}")
    if objective not in ("angular", "surrogate"):
        raise ValueError(f"objective must be 'angular' or 'surrogate', got {objective!r}")
    N, K = y.shape
    A = _gram(G)
    if not argmax_preserving:
        cands = np.broadcast_to(np.eye(K), (N, K, K))
        best = np.argmax(_objective(cands, y, A, objective), axis=1)
        return np.eye(K)[best]
    out = np.empty_like(y)
    top = np.argmax(y, axis=1)
    if K <= ARGMAX_EXACT_MAX_CLASSES:
        for k in np.unique(top):
            rows = np.flatnonzero(top == k)
            V = _subset_vertices(K, int(k))
            vals = _objective(np.broadcast_to(V, (len(rows), *V.shape)), y[rows], A[rows], objective)
            out[rows] = V[np.argmax(vals, axis=1)]
        return out
    for i in range(N):
        out[i] = _greedy_argmax_target(y[i], A[i], objective)
    return out


def _norm(d: np.ndarray, norm: Norm) -> np.ndarray:
    return np.abs(d).sum(axis=1) if norm == "l1" else np.sqrt((d * d).sum(axis=1))


def mad_perturb(
    y: np.ndarray,
    G: np.ndarray,
    eps: float = MAD_EPSILON,
    *,
    norm: Norm = MAD_NORM,
    argmax_preserving: bool = False,
    objective: Objective = MAD_OBJECTIVE,
) -> np.ndarray:
    """MAD (or MAD-argmax) answers for victim probabilities ``y`` (N, K) and surrogate Jacobians ``G`` (N, K, D).

    Returns float32 rows on the simplex with ``||ŷ − y||_norm ≤ eps``; ``eps=0`` returns ``y``. With
    ``argmax_preserving`` every answer keeps ``y``'s top-1 (first index among ties).
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    y64 = np.asarray(y, dtype=np.float64)
    if y64.ndim != 2:
        raise ValueError(f"y must be (N, K), got shape {y64.shape}")
    N, K = y64.shape
    if N == 0 or eps == 0:
        return y64.astype(np.float32)
    target = mad_target(y64, G, objective=objective, argmax_preserving=argmax_preserving)
    step = target - y64
    dist = _norm(step, norm)
    margin = (K if norm == "l1" else np.sqrt(K)) * 2.0**-24
    budget = max(eps - margin, 0.0)
    alpha = np.where(dist > 0, np.minimum(1.0, budget / np.where(dist > 0, dist, 1.0)), 0.0)
    out = (y64 + alpha[:, None] * step).astype(np.float32)
    return _keep_top(y64, step, alpha, out) if argmax_preserving else out


def _keep_top(y: np.ndarray, step: np.ndarray, alpha: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows of ``out = float32(y + alpha·step)`` whose rounding tied y's top class with an earlier index: halve the
    step until the float32 row names y's top class again (at worst, y itself)."""
    top = np.argmax(y, axis=1)
    for i in np.flatnonzero(np.argmax(out, axis=1) != top):
        a = alpha[i]
        for _ in range(60):
            a /= 2
            row = (y[i] + a * step[i]).astype(np.float32)
            if np.argmax(row) == top[i]:
                break
        else:
            row = y[i].astype(np.float32)
        log.debug("MAD-argmax row %d: float32 rounding tied the top class, step shortened to %.3g", i, a)
        out[i] = row
    return out


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer: pass last_layer explicitly")
    return linears[-1]


def surrogate_jacobian(
    model: nn.Module,
    images: torch.Tensor,
    last_layer: nn.Linear | None = None,
    *,
    chunk_size: int = 32,
) -> np.ndarray:
    """``G`` (N, K, D): the Jacobian of ``log softmax(model(x))`` w.r.t. ``last_layer.weight`` (flattened, D = out·in),
    one (K, D) block per image, by autograd. ``last_layer`` defaults to the model's last ``nn.Linear`` (in module
    registration order), the FC weight the authors differentiate. Batched with ``torch.func`` (vmap of jacrev,
    ``chunk_size`` images at a time); a model ``torch.func`` cannot trace falls back to one image at a time."""
    layer = last_layer if last_layer is not None else _last_linear(model)
    name = next((n for n, p in model.named_parameters() if p is layer.weight), None)
    if name is None:
        raise ValueError("last_layer is not a layer of model")
    was_training = model.training
    model.eval()
    try:
        params = {n: p.detach() for n, p in model.named_parameters()}
        W = params[name]

        def log_probs(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(model, {**params, name: w}, (x.unsqueeze(0),))
            return torch.log_softmax(out, dim=1).squeeze(0)

        try:
            jac = torch.func.vmap(torch.func.jacrev(log_probs), in_dims=(None, 0), chunk_size=chunk_size)(W, images)
        except (RuntimeError, NotImplementedError) as e:
            log.debug("torch.func could not trace %s (%s): one image at a time", type(model).__name__, e)
            jac = torch.stack([_jacobian_one(model, layer.weight, x) for x in images])
    finally:
        model.train(was_training)
    return jac.reshape(jac.shape[0], jac.shape[1], -1).detach().cpu().numpy().astype(np.float32)


def _jacobian_one(model: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The authors' loop (``compute_jacobian_nll``): one backward pass per class, only down to the weight."""
    with torch.enable_grad():
        logp = torch.log_softmax(model(x.unsqueeze(0)), dim=1)[0]
        rows = [torch.autograd.grad(logp[k], weight, retain_graph=True)[0] for k in range(logp.shape[0])]
    return torch.stack(rows)


# ---------------------------------------------------------------- MAD in the serving path
@register_kit("mad")
def build_mad_kit(inputs: KitInputs, out: Path) -> dict:
    """The surrogate: a randomly initialized model of the victim's architecture (authors' README: "essentially
    randomly-initialized models exhibiting chance-level performance"), seeded, never trained."""
    model = new_model_like(inputs.victim.meta, inputs.seed)
    save_model(model, out / "surrogate.pt")
    acc = float((predict_probs(model, inputs.x_test).argmax(1) == inputs.y_test).float().mean())
    return {"surrogate": f"random init of {inputs.victim.meta.arch}", "metrics": {"surrogate_test_accuracy": acc}}


@register_policy
class Mad(OutputPolicy):
    """MAD (prediction poisoning, Orekondy et al. ICLR 2020; see this module's doc) as an output policy: each answer
    moves up to ``eps`` (in ``norm``) from the victim's towards the target that most turns the surrogate's gradient
    (``objective``). Needs the ``mad`` kit (the surrogate): ``dme defense train --defense mad``. Defaults: the
    authors' README (ε = 0.5, L1, angular). It should come first in a chain (it perturbs what it is given). The label
    follows the perturbed scores; ``mad-argmax`` keeps the victim's."""

    name: ClassVar[str] = "mad"
    preserves_argmax: ClassVar[bool] = False
    needs_kit: ClassVar[str | None] = "mad"
    argmax_preserving: ClassVar[bool] = False
    eps: float = Field(MAD_EPSILON, ge=0, le=2, description="utility budget ||ŷ − y|| per answer (L1 ≤ 2 on the "
                                                            "simplex)")
    norm: Norm = Field(MAD_NORM, description="distance of the budget: l1 or l2")
    objective: Objective = Field(MAD_OBJECTIVE, description="angular (the paper's) or surrogate")

    def apply(self, scores: np.ndarray, rng: RowStreams, ctx: PolicyContext) -> np.ndarray:
        if len(scores) == 0:
            return scores
        G = surrogate_jacobian(ctx.kits["mad"].model("surrogate"), ctx.image_tensor(self.name))
        return mad_perturb(scores, G, self.eps, norm=self.norm, argmax_preserving=self.argmax_preserving,
                           objective=self.objective)


@register_policy
class MadArgmax(Mad):
    """MAD-argmax: MAD restricted to answers that keep the victim's top-1 (the authors' ``oracle=argmax``), so a
    label-only user sees no change; same kit and defaults as ``mad``."""

    name: ClassVar[str] = "mad-argmax"
    preserves_argmax: ClassVar[bool] = True
    argmax_preserving: ClassVar[bool] = True
