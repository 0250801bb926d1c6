"""Where the per-key detectors of the victim API keep their state, and what a flag does (no Ray here).

ARCHITECTURE's second kind of defense: detectors are stateful per API key and fed by every request the ingress
answers (:mod:`distributed_me.defenses.detectors` holds the algorithms). This module is the serving side:

- **One state per (victim, key, detector)**, keyed by the key's fingerprint (``hmac:…``, as in the query log: no raw
  key is written to disk).
- **Durable like the ledger**: every observed request is first appended to the key's journal (the request's images
  and undefended probabilities, one ``.npz`` per request, numbered), then folded into the in-memory state. Every
  ``snapshot_every`` requests the state is written whole (:meth:`DetectorState.to_bytes`, atomically, with the number
  of the last request it includes) and the journal entries it covers are deleted. A restarted watch loads the
  snapshot and replays the newer entries in order, so it reaches exactly the state it had: a crash between writing a
  snapshot and deleting the journal replays nothing twice (entries at or below the snapshot's number are skipped).
- **Bounded memory**: each state is bounded by its detector; at most ``max_keys_in_memory`` keys' states are held
  at once (least recently used ones are snapshotted and dropped, and read back on their next request). The journal
  on disk is bounded by ``snapshot_every`` requests per key.
- **Actions** per rule: ``flag`` (logged, the key keeps being answered), ``degrade`` (its later answers go through the
  deployment's ``degrade_policy``), ``block`` (its later requests get 403 with the reason, charged nothing). A key's
  status is the strongest action of the rules that flagged it. The request during which a detector raises its flag
  is answered as the key's status before it: the action applies from the next request (the answer was already
  computed and paid for; a detector decides on what it has seen).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..defenses.detectors import Detector, DetectorState, Verdict, parse_detector

log = logging.getLogger(__name__)

Action = Literal["flag", "degrade", "block"]
#: the strength of each status, weakest first ("ok": no rule has flagged the key)
STATUS_ORDER: tuple[str, ...] = ("ok", "flag", "degrade", "block")

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Rule:
    """One detector and what its flag does."""

    detector: Detector
    action: Action = "flag"

    @property
    def label(self) -> str:
        return self.detector.name


@dataclass(frozen=True)
class KeyStatus:
    """What the ingress needs before it answers a key: the strongest action in force, and why."""

    status: str  # one of STATUS_ORDER
    reason: str = ""

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Slot:
    """The states of one (victim, key): one per rule, the journal number of the last request folded in, and the
    number of the last snapshot."""

    def __init__(self, folder: Path, rules: list[Rule]):
        self.folder = folder
        self.rules = rules
        self.states: list[DetectorState] = [r.detector.new_state() for r in rules]
        self.seq = 0  # last request folded into the states
        self.snapped = 0  # last request included in the snapshot on disk

    # ------------------------------------------------------------------ disk layout
    def _snapshot_path(self, i: int) -> Path:
        return self.folder / f"state-{i}-{_SAFE.sub('_', self.rules[i].label)}.npz"

    def _journal(self) -> Path:
        return self.folder / "journal"

    def _entry(self, seq: int) -> Path:
        return self._journal() / f"{seq:012d}.npz"

    def load(self) -> None:
        """Each state from its snapshot, then the journal entries after that snapshot's number, in order (states
        snapshotted at different numbers, after a crash mid-snapshot, each replay from their own)."""
        snapped = [0] * len(self.rules)
        for i, rule in enumerate(self.rules):
            path = self._snapshot_path(i)
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    self.states[i] = rule.detector.load_state(z["state"].tobytes())
                    snapped[i] = int(z["seq"])
        self.seq = max(snapped, default=0)
        entries = sorted(self._journal().glob("*.npz")) if self._journal().exists() else []
        for path in entries:
            seq = int(path.stem)
            behind = [i for i in range(len(self.rules)) if seq > snapped[i]]
            if not behind:
                continue
            with np.load(path, allow_pickle=False) as z:
                images, probs = z["images"], z["probs"]
            for i in behind:
                self.rules[i].detector.observe(self.states[i], images, probs)
            self.seq = max(self.seq, seq)
        self.snapped = min(snapped, default=0)

    def snapshot(self) -> None:
        if self.seq == self.snapped:
            return
        for i, state in enumerate(self.states):
            payload = np.frombuffer(state.to_bytes(), np.uint8)
            buf = _npz_bytes(state=payload, seq=np.array(self.seq, np.int64))
            _atomic_write(self._snapshot_path(i), buf)
        for path in sorted(self._journal().glob("*.npz")):
            if int(path.stem) <= self.seq:
                path.unlink(missing_ok=True)
        self.snapped = self.seq

    def observe(self, images: np.ndarray, probs: np.ndarray) -> list[Verdict]:
        # checked before journaling: an entry that cannot be folded in would fail every replay of this key
        if probs.ndim != 2 or images.ndim < 2 or len(images) != len(probs):
            raise ValueError(f"{len(images)} images of shape {images.shape[1:]} for probabilities of shape "
                             f"{probs.shape}")
        self._journal().mkdir(parents=True, exist_ok=True)
        seq = self.seq + 1
        _atomic_write(self._entry(seq), _npz_bytes(images=np.asarray(images, np.float32),
                                                   probs=np.asarray(probs, np.float32)))
        verdicts = [r.detector.observe(s, images, probs) for r, s in zip(self.rules, self.states)]
        self.seq = seq
        return verdicts

    def status(self) -> KeyStatus:
        best, reason = "ok", ""
        for rule, state in zip(self.rules, self.states):
            if state.flagged and STATUS_ORDER.index(rule.action) > STATUS_ORDER.index(best):
                best, reason = rule.action, state.flag_reason
        return KeyStatus(best, reason)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Watch:
    """Every key's detector states for the victims that have rules; see the module docstring."""

    def __init__(self, folder: str | Path, rules: dict[str, list[Rule]], snapshot_every: int = 50,
                 max_keys_in_memory: int = 256):
        if snapshot_every < 1 or max_keys_in_memory < 1:
            raise ValueError("snapshot_every and max_keys_in_memory must be at least 1")
        self.folder = Path(folder)
        self.rules = {v: list(r) for v, r in rules.items() if r}
        self.snapshot_every = snapshot_every
        self.max_keys = max_keys_in_memory
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()

    def watches(self, victim: str) -> bool:
        return victim in self.rules

    def _slot(self, victim: str, fingerprint: str) -> _Slot:
        k = (victim, fingerprint)
        slot = self._slots.get(k)
        if slot is None:
            slot = _Slot(self.folder / _SAFE.sub("_", victim) / _SAFE.sub("_", fingerprint), self.rules[victim])
            slot.load()
            self._slots[k] = slot
            while len(self._slots) > self.max_keys:
                _, old = self._slots.popitem(last=False)
                old.snapshot()
        self._slots.move_to_end(k)
        return slot

    def status(self, victim: str, fingerprint: str) -> KeyStatus:
        if victim not in self.rules:
            return KeyStatus("ok")
        return self._slot(victim, fingerprint).status()

    def observe(self, victim: str, fingerprint: str, images: np.ndarray, probs: np.ndarray) -> KeyStatus:
        """Fold one answered request into the key's states (journal first); returns the key's status after it."""
        if victim not in self.rules:
            return KeyStatus("ok")
        slot = self._slot(victim, fingerprint)
        before = slot.status()
        slot.observe(images, probs)
        if slot.seq - slot.snapped >= self.snapshot_every:
            slot.snapshot()
        after = slot.status()
        if after != before:
            log.warning("victim %s, key %s: %s (%s)", victim, fingerprint, after.status, after.reason)
        return after

    def verdicts(self, victim: str, fingerprint: str) -> list[Verdict]:
        """Every rule's current verdict for the key (for reports and tests)."""
        if victim not in self.rules:
            return []
        slot = self._slot(victim, fingerprint)
        return [r.detector.verdict(s) for r, s in zip(slot.rules, slot.states)]

    def close(self) -> None:
        for slot in self._slots.values():
            slot.snapshot()


def parse_rules(items: list[dict]) -> list[Rule]:
    """``[{"detector": "prada:delta=0.9", "action": "block"}, …]`` (already validated by the serve spec)."""
    return [Rule(parse_detector(i["detector"]), i.get("action", "flag")) for i in items]


__all__ = ["Action", "KeyStatus", "Rule", "STATUS_ORDER", "Watch", "parse_rules"]
