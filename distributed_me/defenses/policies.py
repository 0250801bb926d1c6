"""Output policies: how much of a victim's confidence vector an API reveals.

A policy is a typed (pydantic) object; a :class:`PolicyChain` applies zero or more *transforms* (scores → scores:
rounding, quantization, noise, …) and ends in one *format* (full ``probabilities``, ``topk``, or ``label``). The chain
is the defense: it runs inside the victim's ``predict`` (in process or in the Serve deployment), so attackers only ever
see its output.

Spec strings, as used on the command line and in YAML: ``"probabilities"``, ``"topk:3"``, ``"label"``,
``"round:2"``, ``"quantize:5"``, ``"noise:0.05"``, ``"reverse_sigmoid:beta=1.0:gamma=0.1"``, and chains such as
``"round:2,topk:1"`` or ``"quantize:10,topk:1"`` (comma = chain, applied left to right; ``name:value`` sets the
policy's first parameter, ``name:field=value`` any of them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..answer import Answer, AnswerKind
from ..errors import DmeError
from ..registry import Registry, parse_spec_item

POLICIES: Registry[type["OutputPolicy"]] = Registry("output policy")


@dataclass
class PolicyContext:
    """What a transform may read besides the scores: the queried images (float NCHW in [0, 1]), the victim's logits
    (``None`` where the caller has only probabilities) and the defense kits the chain was bound to, by name."""

    images: np.ndarray | None = None
    logits: np.ndarray | None = None
    kits: Mapping[str, Any] = field(default_factory=dict)
    #: the client (its key's salted fingerprint behind Serve, ``""`` in process)
    stream: str = ""
    #: where watermarking policies record what they marked (``dawn.WatermarkSink``); ``None``: nowhere
    sink: Any = None

    def image_tensor(self, policy: str) -> Any:
        """The queried images as a float tensor, for a policy that runs a model on them (``policy`` names it in the
        error when the caller gave none)."""
        import torch

        if self.images is None:
            raise DmeError(f"output policy {policy!r} needs the queried images")
        return torch.from_numpy(np.ascontiguousarray(self.images))


class OutputPolicy(BaseModel):
    """Base class. Transforms override :meth:`transform`; formats set ``kind`` and override :meth:`format`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    #: a format ends the chain and decides the response kind; a transform maps scores to scores
    is_format: ClassVar[bool] = False
    #: transforms that never change which class has the top score (rounding, quantization) keep the victim's label
    preserves_argmax: ClassVar[bool] = True
    #: the defense kit (models, calibration data; ``defenses/kits.py``) this policy reads, ``None`` for none
    needs_kit: ClassVar[str | None] = None
    #: records evidence through the chain's watermark sink (DAWN)
    needs_sink: ClassVar[bool] = False

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        return scores

    def apply(self, scores: np.ndarray, rng: RowStreams, ctx: PolicyContext) -> np.ndarray:
        """What the chain calls: stateless transforms need only the scores; model-carrying defenses override this
        to read the images, logits and their kit from ``ctx``."""
        return self.transform(scores, rng)

    def format(self, scores: np.ndarray, labels: np.ndarray) -> Answer:
        raise NotImplementedError

    def spec(self) -> str:
        params = self.model_dump()
        return self.name + "".join(f":{k}={v}" for k, v in params.items())


def register_policy(cls: type[OutputPolicy]) -> type[OutputPolicy]:
    POLICIES.register(cls.name)(cls)
    return cls


# ---------------------------------------------------------------- formats
@register_policy
class Probabilities(OutputPolicy):
    """The full confidence vector (Amazon, Microsoft, Face++ in MEBench Table 14)."""

    name: ClassVar[str] = "probabilities"
    is_format: ClassVar[bool] = True

    def format(self, scores: np.ndarray, labels: np.ndarray) -> Answer:
        return Answer("probabilities", labels, scores.astype(np.float32))


@register_policy
class TopK(OutputPolicy):
    """Only the k highest scores (Google's FER API returns the top-1 score only, MEBench Table 14)."""

    name: ClassVar[str] = "topk"
    is_format: ClassVar[bool] = True
    k: int = Field(1, ge=1, description="number of classes returned")

    def format(self, scores: np.ndarray, labels: np.ndarray) -> Answer:
        k = min(self.k, scores.shape[1])
        full = np.argsort(-scores, axis=1, kind="stable")
        # the API's named class comes first even where rounding tied it with another (rare rows: fix them one by one)
        for i in np.flatnonzero(full[:, 0] != labels):
            full[i] = [labels[i], *(c for c in full[i] if c != labels[i])]
        order = full[:, :k]
        out = np.zeros_like(scores, dtype=np.float32)
        np.put_along_axis(out, order, np.take_along_axis(scores, order, axis=1), axis=1)
        return Answer("topk", labels, out, order)


@register_policy
class LabelOnly(OutputPolicy):
    """The predicted class alone: the hardest black-box setting (SwiftTheft's assumption, paper 003 §II)."""

    name: ClassVar[str] = "label"
    is_format: ClassVar[bool] = True

    def format(self, scores: np.ndarray, labels: np.ndarray) -> Answer:
        return Answer("label", labels)


# ---------------------------------------------------------------- transforms
@register_policy
class Round(OutputPolicy):
    """Round every score to ``decimals`` decimal places (no renormalization: what the client sees)."""

    name: ClassVar[str] = "round"
    decimals: int = Field(2, ge=0, le=8)

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        return np.round(scores, self.decimals)


@register_policy
class Quantize(OutputPolicy):
    """Confidence quantization, MEBench's defense (paper 004 §3.5, "Q4: Defenses"), after Google's FER API.

    Defends against extraction attacks that learn from the exact confidence values (soft-label distillation):
    [0, 1] is cut into ``intervals`` equal-width bins and every score is replaced by the midpoint of its bin
    (MEBench's example: [0.5, 0.7] → 0.6). Bins are half-open, ``[i/n, (i+1)/n)``, except the last, which also
    holds 1.0; a score within float32 rounding of a bin edge counts as on the edge (float32 0.7 is 0.69999999, but
    with ``intervals=10`` it goes to [0.7, 0.8)). Scores outside [0, 1] go to the first / last bin.

    ``intervals``: number of bins (≥ 1; default 5, as Google's five likelihood descriptors "very_unlikely" …
    "very_likely"). No renormalization: the midpoints are what the client sees. Quantization is monotone, so it
    can tie the top classes but never reorder them; the API still names the victim's own argmax class.
    """

    name: ClassVar[str] = "quantize"
    intervals: int = Field(5, ge=1, description="number of equal-width bins over [0, 1]")

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        n = self.intervals
        # round in bin units first so float32 representation error at an edge does not drop a score one bin down
        idx = np.floor(np.round(np.asarray(scores, dtype=np.float64) * n, 6))
        idx = np.clip(idx, 0, n - 1)
        return ((idx + 0.5) / n).astype(np.float32)


@register_policy
class Noise(OutputPolicy):
    """Additive Gaussian noise on the probabilities, then clipped at 0 and renormalized so each row sums to 1.

    Defends against attacks that distil the victim's exact confidence vector (and against equation-solving on it):
    every answer carries ``N(0, std²)`` noise per class, the classic output-perturbation baseline (ART's
    postprocessors perturb outputs the same way; cf. Lee et al., S&P Workshops 2019, §II). The noise comes from the
    chain's :class:`RowStreams`: a row's noise depends on the chain's seed, the client's key and the queried image
    only, so a key gets the same answer to the same image on any replica, whatever else shares its batch. A row
    whose every score clips to 0 falls back to the original row.

    ``std``: standard deviation of the noise, in probability units (≥ 0; default 0.05; 0 leaves a normalized row
    unchanged). The label follows the noisy scores: a large ``std`` really changes the API's answers.
    """

    name: ClassVar[str] = "noise"
    preserves_argmax: ClassVar[bool] = False
    std: float = Field(0.05, ge=0, description="standard deviation of the Gaussian noise added to each score")

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        clean = np.asarray(scores, dtype=np.float64)
        noisy = np.clip(clean + rng.normal(0.0, self.std, size=clean.shape), 0.0, None)
        total = noisy.sum(axis=1, keepdims=True)
        dead = total[:, 0] <= 0
        out = noisy / np.where(total > 0, total, 1.0)
        out[dead] = clean[dead]
        return out.astype(np.float32)


@register_policy
class ReverseSigmoid(OutputPolicy):
    """Reverse sigmoid perturbation: Lee et al., "Defending Against NN Model Stealing Attacks Using Deceptive
    Perturbations" (IEEE S&P Workshops 2019, §III; arXiv 1806.00054), same formula as ART's
    ``art/defences/postprocessor/reverse_sigmoid.py``.

    Defends against extraction by distillation on the confidence vector: the perturbation
    ``r(y) = beta * (sigmoid(gamma * logit(y)) - 0.5)`` pushes scores towards 0.5 by a non-linear amount, so a clone
    trained on the answers with a cross-entropy loss is misled (its gradients point the wrong way). The answer is
    ``y' = alpha * clip(y - r(y), 0, 1)`` with ``alpha`` normalizing each row to sum 1; ``logit(y) = log(y / (1-y))``
    with ``y`` clipped into [1e-6, 1 - 1e-6] (ART clips at 1e-9), so exact 0s and 1s stay finite. A row whose
    perturbed scores all clip to 0 falls back to the original row. For a single-column (binary, C == 1) score ``y``,
    as in ART, both ``y`` and ``1 - y`` are perturbed and the answer is ``y'_1 / (y'_1 + y'_2)``.

    ``beta``: magnitude of the perturbation (> 0; default 1.0). ``gamma``: convergence parameter, dataset- and
    model-specific (> 0; default 0.1). Defaults are ART's. The perturbation raises low scores and lowers high ones,
    so for a large ``beta`` the top class can flip (beta=5, gamma=0.1: [0.6, 0.4, 0.0] → [0.27, 0.23, 0.50], the
    zero class on top; beta=20: [0.6, 0.4] → [0.40, 0.60]). ART does not guard against this, and neither do we: the
    label follows the perturbed scores (``preserves_argmax = False``), the answer the defended API really gives.
    """

    name: ClassVar[str] = "reverse_sigmoid"
    preserves_argmax: ClassVar[bool] = False
    beta: float = Field(1.0, gt=0, description="magnitude of the perturbation")
    gamma: float = Field(0.1, gt=0, description="convergence parameter (dataset- and model-specific)")

    #: clipping before the logit, so log(0) and division by zero never happen
    eps: ClassVar[float] = 1e-6

    def _perturbed(self, y: np.ndarray) -> np.ndarray:
        yc = np.clip(y, self.eps, 1.0 - self.eps)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * np.log(yc / (1.0 - yc)))) - 0.5)
        return np.clip(y - r, 0.0, 1.0)

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        y = np.asarray(scores, dtype=np.float64)
        if y.shape[1] == 1:
            num = self._perturbed(y)
            total = num + self._perturbed(1.0 - y)
        else:
            num = self._perturbed(y)
            total = num.sum(axis=1, keepdims=True)
        dead = total[:, 0] <= 0
        out = num / np.where(total > 0, total, 1.0)
        out[dead] = y[dead]
        return out.astype(np.float32)


@register_policy
class DeceptivePerturbation(ReverseSigmoid):
    """DP, deceptive perturbation (Lee et al., IEEE S&P Workshops 2019, the baseline [15] of AdvFT, paper 002 §2:
    "it poisons the soft labels while keeping the top1 unaltered"): the reverse sigmoid above, with the top-1 kept.

    Lee et al. present the perturbation as label-preserving, but its formula alone is not (for ``γ < 1`` it raises the
    smallest scores faster than the top one, see :class:`ReverseSigmoid`), and neither the authors' reference
    (tribhuvanesh/prediction-poisoning ``defenses/victim/bb_reversesigmoid.py``) nor ART enforces it. Our choice,
    stated: where the perturbed row's top class is not the victim's, the two scores swap places, so the victim's class
    is on top with the largest perturbed value and the row still sums to 1; where clipping ties several classes at the
    top (large ``beta``), the victim's class is lifted 1e-6 above them and the row renormalized. The API's label is
    always the victim's.

    ``beta``, ``gamma``: as :class:`ReverseSigmoid` (ART's defaults 1.0 and 0.1; AdvFT gives no values, and the
    authors' code default γ = 1 makes every answer uniform).
    """

    name: ClassVar[str] = "dp"
    preserves_argmax: ClassVar[bool] = True

    def transform(self, scores: np.ndarray, rng: RowStreams) -> np.ndarray:
        out = super().transform(scores, rng)
        if out.shape[1] < 2:
            return out
        top, new = np.asarray(scores).argmax(axis=1), out.argmax(axis=1)
        rows = np.flatnonzero(top != new)
        if len(rows):
            a, b = out[rows, top[rows]].copy(), out[rows, new[rows]].copy()
            out[rows, top[rows]], out[rows, new[rows]] = b, a
        # clipping can tie several classes at the top (large beta): the victim's class is lifted by 1e-6 over them
        idx = np.arange(len(out))
        others = out.copy()
        others[idx, top] = -np.inf
        tied = np.flatnonzero(others.max(axis=1) >= out[idx, top])
        if len(tied):
            out[tied, top[tied]] = others[tied].max(axis=1) + np.float32(1e-6)
            out[tied] /= out[tied].sum(axis=1, keepdims=True)
        return out


def _u64s(data: bytes, words: int) -> list[int]:
    digest = hashlib.blake2b(data, digest_size=8 * words).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(words)]


class RowStreams:
    """A ``numpy.random.Generator``-like source whose row ``i`` draws from its own generator, seeded by
    ``(seed, stream, blake2b(rows[i]))``. Only ``normal`` is offered (what the registered transforms use); a transform
    that needs another distribution adds it here, keeping the per-row keying."""

    def __init__(self, seed: int, stream: str, rows: np.ndarray):
        self._prefix = [int(seed) & (2**64 - 1), *_u64s(stream.encode(), 1)]
        self._rows = np.ascontiguousarray(rows).reshape(len(rows), -1)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([*self._prefix, *_u64s(self._rows[i].tobytes(), 2)])

    def normal(self, loc: float, scale: float, size: tuple[int, int]) -> np.ndarray:
        n, c = size
        if n != len(self._rows):
            raise ValueError(f"RowStreams keyed on {len(self._rows)} rows asked for {n}")
        if n == 0:
            return np.zeros((0, c))
        return np.stack([self._rng(i).normal(loc, scale, c) for i in range(n)])


class PolicyChain:
    """Transforms then one format; validated at construction so a bad chain fails before any work starts."""

    def __init__(self, policies: list[OutputPolicy], seed: int = 0):
        if not policies or not policies[-1].is_format:
            policies = [*policies, Probabilities()]
        for p in policies[:-1]:
            if p.is_format:
                raise DmeError(
                    f"output policy {p.name!r} decides the response format and must come last in the chain "
                    f"(got {', '.join(q.name for q in policies)})"
                )
        self.transforms, self.formatter = policies[:-1], policies[-1]
        self.seed = seed
        self.kits: dict[str, Any] = {}
        self.sink: Any = None

    def kits_needed(self) -> dict[str, str]:
        """Kit name → the first policy of the chain that needs it."""
        out: dict[str, str] = {}
        for p in self.transforms:
            if p.needs_kit:
                out.setdefault(p.needs_kit, p.name)
        return out

    def bind(self, kits: Mapping[str, Any]) -> PolicyChain:
        """Give the chain its defense kits (``defenses.kits.bind_kits`` loads them for a victim)."""
        self.kits = dict(kits)
        return self

    @property
    def needs_sink(self) -> bool:
        return any(p.needs_sink for p in self.transforms)

    def bind_sink(self, sink: Any) -> PolicyChain:
        """Give the chain the watermark sink its watermarking policies record into (``dawn.FolderSink``)."""
        self.sink = sink
        return self

    @property
    def policies(self) -> list[OutputPolicy]:
        return [*self.transforms, self.formatter]

    @property
    def returns(self) -> AnswerKind:
        return self.formatter.format(np.ones((1, 2), np.float32) / 2, np.zeros(1, np.int64)).kind

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.policies)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": p.name, **p.model_dump()} for p in self.policies]

    def __call__(self, probs: np.ndarray, queries: np.ndarray | None = None, stream: str = "",
                 logits: np.ndarray | None = None) -> Answer:
        """Apply the chain to a batch of victim probabilities (N, C).

        ``queries`` are the N images the probabilities answer (what randomized transforms key each row's draws on;
        without them, the probability rows themselves are the key; model-carrying defenses run their models on
        them) and ``stream`` names the client (the API key's fingerprint behind Serve; ``""`` in process), see
        :class:`RowStreams`. ``logits``: the victim's logits, for defenses that score energies (CIP).
        """
        probs = np.asarray(probs, dtype=np.float32)
        if queries is not None and len(queries) != len(probs):
            raise ValueError(f"{len(queries)} queries for {len(probs)} answers")
        missing = [k for k in self.kits_needed() if k not in self.kits]
        if missing:
            raise DmeError(f"output policy chain {self.spec()!r} needs the defense kits {missing} bound first "
                           "(defenses.kits.bind_kits(chain, victim); the Serve deployment and LocalOracle do it)")
        rows = RowStreams(self.seed, stream, probs if queries is None else np.asarray(queries))
        ctx = PolicyContext(None if queries is None else np.asarray(queries), logits, self.kits, stream, self.sink)
        scores = probs
        for t in self.transforms:
            scores = t.apply(scores, rows, ctx)
        if all(t.preserves_argmax for t in self.transforms):
            labels = probs.argmax(axis=1)
        else:
            labels = scores.argmax(axis=1)
        return self.formatter.format(scores.astype(np.float32), labels.astype(np.int64))


def parse_one(text: str) -> OutputPolicy:
    """One output policy from its spec string (``"topk:3"``, ``"reverse_sigmoid:beta=1.0:gamma=0.1"``)."""
    return parse_spec_item(text, POLICIES)


def parse_policy(spec: "str | list[str] | PolicyChain | None", seed: int = 0) -> PolicyChain:
    """Parse ``"round:2,topk:1"`` (or a list of such items) into a validated :class:`PolicyChain`."""
    if isinstance(spec, PolicyChain):
        return spec
    if spec is None or spec == "":
        return PolicyChain([], seed)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return PolicyChain([parse_one(s) for s in items if s.strip()], seed)
