"""CIP, categorical inference poisoning: Zhang, Hua, Wang, Jiang, Yang, "Categorical Inference Poisoning: Verifiable
Defense Against Black-Box DNN Model Stealing Without Constraining Surrogate Data and Query Times" (IEEE TIFS 18:1473–
1486, 2023). The paper itself was not readable here (only its abstract); the procedure below is the authors' code,
Hatins/CIP_master ``categorical_inference_poisoning/function.py`` (``poison_fun_tensor``, ``SPPD``, ``compute_noise2``,
``reliability``, ``close_set_probability_poisoned``), ``ood_detection/detection_test.py`` (thresholds) and
``Knockoff/main.py`` (which poisoning is used). AdvFT (paper 002 §2) summarizes it as "poisons confident OOD queries
strongly and uncertain OOD and ID queries mildly".

Threat model: the attacker may have in-distribution data and unlimited queries, and trains on soft labels. The victim
is fine-tuned with energy-based outlier exposure; its energy score ``E(x) = −T·logsumexp(f(x)/T)`` (T = 1; higher =
more OOD, ``energy_score``) sorts each query into one of three regimes (``cip_regimes``), with two thresholds taken
from the energies of in-distribution (training) data (``calibrate_cip``):

- ``E > E2`` (above the 99.9th percentile of ID energies): *confident OOD*, strong poisoning (PPD, ``SPPD``): the
  answer's values are randomly permuted so that the top value leaves the top class, then half-normal noise at an SNR
  of 10 dB is added (``|N(0,1)|·√(mean(p²)/10)`` per class) and the row renormalized;
- ``E1 < E ≤ E2`` (``E1`` = 95th percentile, "FPR95"): *uncertain OOD*, weak poisoning: reverse sigmoid with
  ``β = 0.9, γ = 0.6``, ``ŷ ∝ y − β(σ(γ·logit y) − ½)`` (``compute_noise2``; always positive for these values, so no
  clipping is needed);
- ``E ≤ E1``: *ID*, answered as is, except the poisoning-for-backdooring step (PBD): the least *reliable* ID queries
  (reliability ``R = (p_max² − 1/K) / (std(p without its max) + 1 − 1/K²)``, ``reliability_score``) get a wrong
  confident label, ``1/p`` after flooring the smallest entry, permuted so that the top leaves the victim's class. They
  become a backdoor in the clone that the defender verifies later ("verifiable" in the title).

What we could not carry over, and the choices made:

- PBD in the code ranks the *whole transfer set* by ``R`` and poisons the lowest ``ratio`` of them
  (``Knockoff/main.py``: 17 of 50 000 queries). A serving path sees one batch at a time, so we poison ID rows whose
  ``R`` falls below ``reliability_threshold``; ``calibrate_cip(pbd_rate=…)`` sets it from ID data (17/50 000 =
  ``CIP_PBD_RATE``). The default is ``None``: no PBD, ID rows untouched, since the trigger set must also be recorded
  to verify it later.
- The code shuffles "until the argmax changes" (it loops forever on a constant row). We draw the permutation directly
  from the same conditional distribution: the top value goes to a uniform position other than the forbidden class,
  the other values to a uniform arrangement of the rest. With a tied maximum, the result is fixed up so the forbidden
  class is not the (first) top; a constant row is returned unpermuted. SPPD's noise can still hand the top back to
  the original class, as in the code.
- The authors fine-tune the victim with energy-based outlier exposure first; here CIP scores the served victim's own
  energies (:func:`build_cip_kit`). Measured consequence (CIFAR-10 CNN32 victim at 77.7 %, 2026-12-02): of 4,000
  random queries from the 64x64 ImageNet pool, 74.3 % fall in the ID regime (answered as is), 25.0 % are weakly and
  0.6 % strongly poisoned (test split: 92.9 / 7.0 / 0.1 %). KnockoffNets with 4k queries then loses 2.5 accuracy
  points under CIP (45.9 -> 43.4 %) against 11.8 under DP (34.2 %), the reverse of AdvFT Table 3's DP above CIP at
  100K queries on a ResNet-18 (77.93 vs 49.85 %). Without outlier exposure, the energy does not tell this pool from
  the victim's data.
- Randomness comes from ``rng.normal`` only (3K draws per row: position of the top, arrangement, noise), so the
  chain's per-row :class:`~distributed_me.defenses.policies.RowStreams` can drive it and a key gets the same answer to
  the same query on any replica. The label follows the poisoned scores (the poisoning is meant to change it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from pydantic import Field, model_validator

from ..errors import DmeError
from .kits import KitInputs, register_kit
from .policies import OutputPolicy, PolicyContext, RowStreams, register_policy

log = logging.getLogger(__name__)

#: E1: quantile of ID energy scores below which a query is ID (``detection_test.py`` ``--FPR 0.95``, "FPR95")
CIP_ID_QUANTILE = 0.95
#: E2: quantile of ID energy scores above which a query is confidently OOD (``detection_test.py``: 0.999)
CIP_OPEN_QUANTILE = 0.999
#: SNR of SPPD's half-normal noise, dB (``function.py``: ``wgn(p, 10)``)
CIP_SNR_DB = 10.0
#: weak poisoning: reverse sigmoid parameters (``function.py`` ``compute_noise2``)
CIP_BETA = 0.9
CIP_GAMMA = 0.6
#: PBD: fraction of ID queries turned into backdoor triggers (``Knockoff/main.py``: ``--ratio 17`` of 50 000 queries)
CIP_PBD_RATE = 17 / 50_000

ID, UNCERTAIN_OOD, CONFIDENT_OOD = 0, 1, 2


class NormalSource(Protocol):
    """What CIP draws from: ``numpy.random.Generator`` and the chain's ``RowStreams`` both qualify."""

    def normal(self, loc: float, scale: float, size: tuple[int, int]) -> np.ndarray: ...


@dataclass(frozen=True)
class CipThresholds:
    e1: float
    e2: float
    reliability: float | None = None


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``−T·logsumexp(logits/T)`` per row: higher = more OOD (``function.py`` ``get_ood_scores_single``, T = 1)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def reliability_score(probs: np.ndarray) -> np.ndarray:
    """``R = (p_max² − 1/K) / (std(p without its max) + 1 − 1/K²)`` per row (``function.py`` ``reliability``;
    population std; the first maximum is the one removed)."""
    p = np.asarray(probs, dtype=np.float64)
    N, K = p.shape
    top = np.argmax(p, axis=1)
    rest = p[np.arange(K)[None, :] != top[:, None]].reshape(N, K - 1)
    return (p[np.arange(N), top] ** 2 - 1.0 / K) / (rest.std(axis=1) + (1.0 - (1.0 / K) ** 2))


def _quantile_index(sorted_values: np.ndarray, q: float) -> float:
    """The code's ``sorted(x)[int(q * len(x))]``, clamped to the last element."""
    return float(sorted_values[min(int(q * sorted_values.size), sorted_values.size - 1)])


def calibrate_cip(
    id_energy: np.ndarray,
    id_probs: np.ndarray | None = None,
    *,
    id_quantile: float = CIP_ID_QUANTILE,
    open_quantile: float = CIP_OPEN_QUANTILE,
    pbd_rate: float | None = None,
) -> CipThresholds:
    """E1, E2 (and the PBD reliability threshold if ``pbd_rate`` is given, from ``id_probs``) from the victim's
    energies (and probabilities) on in-distribution data, as ``detection_test.py`` does on the training set."""
    s = np.sort(np.asarray(id_energy, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("calibrate_cip needs in-distribution energies")
    if not 0 <= id_quantile <= open_quantile <= 1:
        raise ValueError(f"need 0 ≤ id_quantile ≤ open_quantile ≤ 1, got {id_quantile}, {open_quantile}")
    rel = None
    if pbd_rate:
        if id_probs is None:
            raise ValueError("pbd_rate needs id_probs to calibrate the reliability threshold")
        r = np.sort(reliability_score(id_probs))
        i = int(np.floor(pbd_rate * r.size))
        rel = float(np.nextafter(r[-1], np.inf)) if i >= r.size else float(r[i])
    return CipThresholds(_quantile_index(s, id_quantile), _quantile_index(s, open_quantile), rel)


def cip_regimes(ood_score: np.ndarray, e1: float, e2: float) -> np.ndarray:
    """0 = ID (``E ≤ e1``), 1 = uncertain OOD (``e1 < E ≤ e2``), 2 = confident OOD (``E > e2``); int8 (N,)."""
    if e1 > e2:
        raise ValueError(f"need e1 ≤ e2, got {e1} > {e2}")
    E = np.asarray(ood_score, dtype=np.float64)
    return np.where(E > e2, CONFIDENT_OOD, np.where(E > e1, UNCERTAIN_OOD, ID)).astype(np.int8)


def _move_top(values: np.ndarray, forbidden: int, z_pos: np.ndarray, z_rest: np.ndarray) -> np.ndarray:
    """A uniform permutation of ``values`` conditioned on its top not landing on ``forbidden``, from normal draws."""
    K = values.shape[0]
    top = int(np.argmax(values))
    if values[top] == values.min():
        return values.copy()  # constant row: every permutation is the same row
    z = z_pos.copy()
    z[forbidden] = -np.inf
    dest = int(np.argmax(z))
    out = np.empty_like(values)
    out[dest] = values[top]
    positions = np.array([i for i in range(K) if i != dest])
    others = np.array([i for i in range(K) if i != top])
    out[positions[np.argsort(z_rest[positions], kind="stable")]] = values[others]
    if int(np.argmax(out)) == forbidden:  # a tied maximum landed first: swap it with a smaller value
        j = int(np.flatnonzero(out < out[forbidden])[0])
        out[forbidden], out[j] = out[j], out[forbidden]
    return out


def _strong(p: np.ndarray, z: np.ndarray, snr_db: float) -> np.ndarray:
    K = p.shape[0]
    q = _move_top(p, int(np.argmax(p)), z[:K], z[K : 2 * K])
    sigma = np.sqrt(np.mean(p**2) / 10.0 ** (snr_db / 10.0))
    q = q + np.abs(z[2 * K :]) * sigma
    return q / q.sum()


def _weak(p: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    a, b = p**gamma, (1.0 - p) ** gamma  # σ(γ·logit p) = p^γ / (p^γ + (1−p)^γ), finite at p = 0 and 1
    q = p - beta * (a / (a + b) - 0.5)
    return q / q.sum(axis=1, keepdims=True)


def _backdoor(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    K = p.shape[0]
    label = int(np.argmax(p))
    q = p + 1e-29  # the code's 10e-30
    floor = q.min() / 100
    low = int(np.argmin(q))
    q = q + 11 * floor
    q[low] = floor
    q = 1.0 / q
    return _move_top(q / q.sum(), label, z[:K], z[K : 2 * K])


def cip_perturb(
    y: np.ndarray,
    ood_score: np.ndarray,
    *,
    e1: float,
    e2: float,
    rng: NormalSource,
    snr_db: float = CIP_SNR_DB,
    beta: float = CIP_BETA,
    gamma: float = CIP_GAMMA,
    reliability_threshold: float | None = None,
) -> np.ndarray:
    """CIP answers (N, K) float32 for victim probabilities ``y`` and energy scores ``ood_score`` (higher = more OOD),
    one regime per row (``cip_regimes``). ``e1``/``e2`` come from ``calibrate_cip``; ID rows are returned as is unless
    ``reliability_threshold`` is set, in which case ID rows with ``R`` below it become backdoor triggers (PBD)."""
    p = np.asarray(y, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"y must be (N, K) with K ≥ 2, got shape {p.shape}")
    N, K = p.shape
    regime = cip_regimes(ood_score, e1, e2)
    if regime.shape != (N,):
        raise ValueError(f"{regime.shape[0] if regime.ndim else 'a scalar'} scores for {N} rows")
    out = p.copy()
    weak = regime == UNCERTAIN_OOD
    if weak.any():
        out[weak] = _weak(p[weak], beta, gamma)
    strong = regime == CONFIDENT_OOD
    backdoor = np.zeros(N, dtype=bool)
    if reliability_threshold is not None:
        backdoor = (regime == ID) & (reliability_score(p) < reliability_threshold)
    if strong.any() or backdoor.any():
        z = np.asarray(rng.normal(0.0, 1.0, size=(N, 3 * K)), dtype=np.float64)
        for i in np.flatnonzero(strong):
            out[i] = _strong(p[i], z[i], snr_db)
        for i in np.flatnonzero(backdoor):
            out[i] = _backdoor(p[i], z[i])
    if backdoor.any():
        log.debug("CIP: %d ID answers turned into backdoor triggers", int(backdoor.sum()))
    return out.astype(np.float32)


# ---------------------------------------------------------------- CIP in the serving path
@register_kit("cip")
def build_cip_kit(inputs: KitInputs, out: Path) -> dict:
    """CIP's kit: the victim's energy scores on its training split, sorted (``detection_test.py`` takes its thresholds
    from the training set). Not carried over: the authors first fine-tune the victim with energy-based outlier
    exposure; that is a new model (a victim version, the model-side defenses' issue), so CIP here scores the served
    victim's own energies."""
    energy = energy_score(inputs.victim.predict_logits(inputs.x_train).numpy())
    np.save(out / "id_energy.npy", np.sort(energy))
    t = calibrate_cip(energy)
    test_energy = energy_score(inputs.victim.predict_logits(inputs.x_test).numpy())
    regimes = cip_regimes(test_energy, t.e1, t.e2)
    return {"calibration": "victim energies on the training split",
            "metrics": {"e1": t.e1, "e2": t.e2, "test_uncertain_ood_rate": float((regimes == UNCERTAIN_OOD).mean()),
                        "test_confident_ood_rate": float((regimes == CONFIDENT_OOD).mean())}}


@register_policy
class Cip(OutputPolicy):
    """CIP (Zhang et al., IEEE TIFS 2023; see this module's doc) as an output policy: the victim's energy on each
    query picks strong poisoning (confident OOD), weak poisoning (uncertain OOD) or the plain answer (ID), with E1 and
    E2 the ``id_quantile`` and ``open_quantile`` of the kit's in-distribution energies. Needs the ``cip`` kit
    (``dme defense train --defense cip``). Defaults: the authors' code (0.95, 0.999, 10 dB, β = 0.9, γ = 0.6). PBD
    (backdoor answers to unreliable ID queries) is off: its trigger set must be recorded to be verified, which is
    the watermarking issue's. Comes first in a chain (it reads the victim's logits)."""

    name: ClassVar[str] = "cip"
    preserves_argmax: ClassVar[bool] = False
    needs_kit: ClassVar[str | None] = "cip"
    id_quantile: float = Field(CIP_ID_QUANTILE, ge=0, le=1, description="E1: quantile of ID energies (FPR95)")
    open_quantile: float = Field(CIP_OPEN_QUANTILE, ge=0, le=1, description="E2: quantile of ID energies")
    snr_db: float = Field(CIP_SNR_DB, description="SNR of strong poisoning's noise, dB")
    beta: float = Field(CIP_BETA, gt=0, lt=1, description="weak poisoning: reverse sigmoid magnitude")
    gamma: float = Field(CIP_GAMMA, gt=0, description="weak poisoning: reverse sigmoid convergence")

    @model_validator(mode="after")
    def _ordered(self) -> Cip:
        if self.id_quantile > self.open_quantile:
            raise ValueError(f"id_quantile ({self.id_quantile}) must not exceed open_quantile ({self.open_quantile})")
        return self

    def apply(self, scores: np.ndarray, rng: RowStreams, ctx: PolicyContext) -> np.ndarray:
        if ctx.logits is None:
            raise DmeError(f"output policy {self.name!r} needs the victim's logits (the serving side passes them)")
        if len(scores) == 0:
            return scores
        t = calibrate_cip(ctx.kits["cip"].array("id_energy"), id_quantile=self.id_quantile,
                          open_quantile=self.open_quantile)
        return cip_perturb(scores, energy_score(np.asarray(ctx.logits)), e1=t.e1, e2=t.e2, rng=rng,
                           snr_db=self.snr_db, beta=self.beta, gamma=self.gamma)
