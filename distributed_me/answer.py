"""What an MLaaS API returns for a batch of queries, as one value type shared by every Oracle and every output policy.

The three response kinds mirror the APIs studied in MEBench (paper 004 §3.1, Table 14): full confidence scores,
the top-k scores (Google returns only the highest), or a label alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

AnswerKind = Literal["probabilities", "topk", "label"]
ANSWER_KINDS: tuple[str, ...] = ("probabilities", "topk", "label")


@dataclass
class Answer:
    """A defended response for N queries.

    ``labels`` (N,) is the class the API names for each query. ``scores`` (N, C) float32 holds the confidence values
    the API returned: all of them for ``probabilities``; for ``topk`` only the k returned classes are non-zero
    (``topk`` (N, k) lists which); ``None`` for ``label``. Scores may not sum to one after rounding or noise — they
    are exactly what a client would see.
    """

    kind: AnswerKind
    labels: np.ndarray
    scores: np.ndarray | None = None
    topk: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to_json(self) -> dict:
        out: dict = {"kind": self.kind, "labels": self.labels.tolist()}
        if self.kind == "probabilities":
            out["probabilities"] = self.scores.tolist()  # type: ignore[union-attr]
        elif self.kind == "topk":
            rows = np.arange(len(self.labels))[:, None]
            out["topk"] = {"classes": self.topk.tolist(), "scores": self.scores[rows, self.topk].tolist()}  # type: ignore
        return out

    @classmethod
    def from_json(cls, d: dict, num_classes: int) -> "Answer":
        labels = np.asarray(d["labels"], dtype=np.int64)
        kind = d["kind"]
        if kind == "probabilities":
            return cls(kind, labels, np.asarray(d["probabilities"], dtype=np.float32))
        if kind == "topk":
            classes = np.asarray(d["topk"]["classes"], dtype=np.int64)
            scores = np.zeros((len(labels), num_classes), dtype=np.float32)
            np.put_along_axis(scores, classes, np.asarray(d["topk"]["scores"], dtype=np.float32), axis=1)
            return cls(kind, labels, scores, classes)
        if kind == "label":
            return cls(kind, labels)
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {ANSWER_KINDS}")

    @staticmethod
    def concat(parts: list["Answer"]) -> "Answer":
        if not parts:
            raise ValueError("no answers to concatenate")
        kind = parts[0].kind
        labels = np.concatenate([p.labels for p in parts])
        scores = None if parts[0].scores is None else np.concatenate([p.scores for p in parts])  # type: ignore[misc]
        topk = None if parts[0].topk is None else np.concatenate([p.topk for p in parts])  # type: ignore[misc]
        return Answer(kind, labels, scores, topk)

    def soft_targets(self) -> np.ndarray | None:
        """Training targets as a distribution per query, or ``None`` for label-only answers.

        Full scores are clipped at 0 and renormalized (rounding can break the sum). For top-k, the unreturned mass is
        spread evenly over the unreturned classes — the maximum-entropy imputation of MEBench eq. 6 (paper 004 §4.1).
        """
        if self.scores is None:
            return None
        s = np.clip(self.scores.astype(np.float64), 0.0, None)
        if self.kind == "topk":
            c = s.shape[1]
            k = self.topk.shape[1]  # type: ignore[union-attr]
            rest = np.clip(1.0 - s.sum(axis=1, keepdims=True), 0.0, None)
            mask = np.ones_like(s, dtype=bool)
            np.put_along_axis(mask, self.topk, False, axis=1)  # type: ignore[arg-type]
            if c > k:
                s = np.where(mask, rest / (c - k), s)
        total = s.sum(axis=1, keepdims=True)
        onehot = np.eye(s.shape[1])[self.labels]
        s = np.where(total > 0, s / np.where(total > 0, total, 1.0), onehot)  # all-zero rows fall back to the label
        return s.astype(np.float32)
