"""Output policies: how much of a victim's confidence vector an API reveals.

A policy is a typed (pydantic) object; a :class:`PolicyChain` applies zero or more *transforms* (scores → scores:
rounding, quantization, noise, …) and ends in one *format* (full ``probabilities``, ``topk``, or ``label``). The chain
is the defense: it runs inside the victim's ``predict`` (in process or in the Serve deployment), so attackers only ever
see its output.

Spec strings, as used on the command line and in YAML: ``"probabilities"``, ``"topk:3"``, ``"label"``,
``"round:2,topk:1"`` (comma = chain, applied left to right; ``name:value`` sets the policy's first parameter,
``name:field=value`` any of them).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..answer import Answer, AnswerKind
from ..errors import DmeError
from ..registry import Registry

POLICIES: Registry[type["OutputPolicy"]] = Registry("output policy")


class OutputPolicy(BaseModel):
    """Base class. Transforms override :meth:`transform`; formats set ``kind`` and override :meth:`format`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: ClassVar[str]
    #: a format ends the chain and decides the response kind; a transform maps scores to scores
    is_format: ClassVar[bool] = False
    #: transforms that never change which class has the top score (rounding, quantization) keep the victim's label
    preserves_argmax: ClassVar[bool] = True

    def transform(self, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return scores

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

    def transform(self, scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.round(scores, self.decimals)


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
        self._rng = np.random.default_rng(seed)

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

    def __call__(self, probs: np.ndarray) -> Answer:
        """Apply the chain to a batch of victim probabilities (N, C)."""
        probs = np.asarray(probs, dtype=np.float32)
        scores = probs
        for t in self.transforms:
            scores = t.transform(scores, self._rng)
        if all(t.preserves_argmax for t in self.transforms):
            labels = probs.argmax(axis=1)
        else:
            labels = scores.argmax(axis=1)
        return self.formatter.format(scores.astype(np.float32), labels.astype(np.int64))


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_one(text: str) -> OutputPolicy:
    name, *args = [s.strip() for s in text.strip().split(":")]
    cls = POLICIES.get(name)
    fields = list(cls.model_fields)
    kwargs: dict[str, Any] = {}
    for i, arg in enumerate(args):
        if "=" in arg:
            key, val = arg.split("=", 1)
            kwargs[key.strip()] = _coerce(val.strip())
        elif i < len(fields):
            kwargs[fields[i]] = _coerce(arg)
        else:
            raise DmeError(f"output policy {name!r} takes {len(fields)} parameter(s) ({', '.join(fields) or 'none'}); "
                           f"got {text!r}")
    try:
        return cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        allowed = ", ".join(f"{k}" for k in fields) or "none"
        raise DmeError(f"output policy {name!r}: field {field!r} = {err.get('input')!r}: {err['msg']} "
                       f"(parameters: {allowed})") from None


def parse_policy(spec: "str | list[str] | PolicyChain | None", seed: int = 0) -> PolicyChain:
    """Parse ``"round:2,topk:1"`` (or a list of such items) into a validated :class:`PolicyChain`."""
    if isinstance(spec, PolicyChain):
        return spec
    if spec is None or spec == "":
        return PolicyChain([], seed)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return PolicyChain([parse_one(s) for s in items if s.strip()], seed)
