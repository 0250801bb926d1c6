"""Query accounting for the victim API: API keys, per-key budgets and the query log.

One :class:`Ledger` serves a whole Serve application (it lives in a single accounting replica), so budgets hold across
every victim replica: two replicas can never both grant the last query. A request is *reserved* before the victim
runs and *committed* once it has been answered; a request that fails in between is *released* and costs nothing.
Only committed requests are counted as used and written to the log, each exactly once.

The query log is a folder of Parquet parts (``part-*.parquet``) plus a journal (``journal.jsonl``) of rows not yet
compacted into a part. Every commit is appended to the journal before the caller gets its answer, so a crash of the
accounting process loses nothing that was answered; a restarted ledger rebuilds its usage counts from the log and
never grants a budget twice. ``key`` in the log is a fingerprint of the API key, never the secret itself.

Plain Python (no Ray): the Serve deployment in :mod:`~distributed_me.serving.app` is a thin wrapper, and unit tests
drive the ledger directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .spec import Client

log = logging.getLogger(__name__)

LOG_SCHEMA = pa.schema([
    ("request_id", pa.string()),
    ("key", pa.string()),
    ("victim", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
    ("count", pa.int64()),
    ("input_hash", pa.string()),
])
JOURNAL = "journal.jsonl"


def key_fingerprint(key: str) -> str:
    """What the log stores instead of an API key: enough to tell keys apart, useless to an attacker."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    """The outcome of an accounting call: ``status`` 200 or the HTTP error to return, with a message."""

    status: int
    detail: str = ""
    reservation: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class QueryLog:
    """Append-only log of answered requests: a JSONL journal compacted into Parquet parts every ``flush_rows``."""

    def __init__(self, folder: str | Path, flush_rows: int = 2048):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self._journal_path = self.folder / JOURNAL
        self._pending = sum(1 for _ in self._journal_rows())
        self._fh = open(self._journal_path, "a", encoding="utf-8")

    def _journal_rows(self) -> list[dict]:
        if not self._journal_path.exists():
            return []
        rows = []
        with open(self._journal_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a crash mid-write: that row was never answered
                    log.warning("query log %s: skipping a torn journal line", self._journal_path)
        return rows

    def append(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        self._pending += 1
        if self._pending >= self.flush_rows:
            self.compact()

    def compact(self) -> None:
        """Move the journal's rows into a new Parquet part (written to a temp name, then renamed: atomic)."""
        rows = self._journal_rows()
        if rows:
            name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"
            tmp = self.folder / f".{name}.tmp"
            pq.write_table(_table(rows), tmp)
            os.replace(tmp, self.folder / name)
        self._fh.close()
        self._fh = open(self._journal_path, "w", encoding="utf-8")
        self._pending = 0

    def close(self) -> None:
        self.compact()
        self._fh.close()

    def read(self) -> pa.Table:
        return read_query_log(self.folder)


def _table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in LOG_SCHEMA}
    cols["time"] = [int(t) for t in cols["time"]]  # microseconds since the epoch
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in LOG_SCHEMA})


def read_query_log(folder: str | Path) -> pa.Table:
    """Every answered request in a query-log folder (Parquet parts and the journal), oldest first."""
    folder = Path(folder)
    parts = [pq.read_table(p, schema=LOG_SCHEMA) for p in sorted(folder.glob("part-*.parquet"))]
    journal = folder / JOURNAL
    if journal.exists():
        rows = []
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if rows:
            parts.append(_table(rows))
    if not parts:
        return LOG_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by("time")


CLIENTS = "clients.jsonl"


class Ledger:
    """API keys, budgets and in-flight reservations for every (key, victim) pair; thread-safe.

    Keys are held by fingerprint only (:func:`key_fingerprint`): a request's key is fingerprinted on arrival. Keys
    added at run time (one per sweep trial) are appended to ``clients.jsonl`` in the log folder — fingerprint, budget,
    victims, never the secret — so that a restarted accounting replica still knows them, and their usage, rebuilt
    from the log like every key's, still counts against their budgets.
    """

    def __init__(self, clients: list[Client], victims: list[str], log_folder: str | Path, flush_rows: int = 2048):
        self._lock = threading.Lock()
        self._victims = set(victims)
        self._log = QueryLog(log_folder, flush_rows)
        self._clients_path = Path(log_folder) / CLIENTS
        self._clients = {key_fingerprint(c.key): c for c in clients}
        self._clients.update(self._runtime_clients())
        self._used: dict[tuple[str, str], int] = {}
        self._inflight: dict[str, tuple[str, str, int]] = {}
        table = self._log.read()
        for fp, victim, count in zip(table["key"].to_pylist(), table["victim"].to_pylist(),
                                     table["count"].to_pylist()):
            self._used[(fp, victim)] = self._used.get((fp, victim), 0) + count
        if len(table):
            log.info("ledger: rebuilt usage of %d keys from %d logged requests", len(self._used), len(table))

    def _runtime_clients(self) -> dict[str, Client]:
        """The keys added at run time before a restart (later lines replace earlier ones; a torn last line is
        skipped, as in the journal)."""
        out: dict[str, Client] = {}
        if not self._clients_path.exists():
            return out
        for line in self._clients_path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out[d["fingerprint"]] = Client(key=d["fingerprint"], budget=d["budget"], victims=d["victims"])
            except (json.JSONDecodeError, KeyError, ValueError):
                log.warning("ledger %s: skipping an unreadable line", self._clients_path)
        return out

    # ------------------------------------------------------------------ keys
    def add_client(self, client: Client) -> None:
        """Add or replace an API key at run time (e.g. one per sweep trial); persisted before it takes effect."""
        fp = key_fingerprint(client.key)
        record = {"fingerprint": fp, "budget": client.budget, "victims": list(client.victims)}
        with self._lock:
            self._clients_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._clients_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._clients[fp] = client

    def _authorize(self, fp: str | None, victim: str) -> Decision:
        if fp is None:
            return Decision(401, "missing API key: send it in the X-API-Key header")
        client = self._clients.get(fp)
        if client is None:
            return Decision(401, "unknown API key")
        if victim not in self._victims:
            return Decision(404, f"no victim named {victim!r}; hosted: {', '.join(sorted(self._victims))}")
        if not client.allows(victim):
            return Decision(403, f"this API key may not query victim {victim!r} (allowed: {', '.join(client.victims)})")
        return Decision(200)

    def authorize(self, key: str | None, victim: str) -> Decision:
        """401 / 404 / 403, or 200: may this key query this victim at all (budget aside)?"""
        return self._authorize(key_fingerprint(key) if key else None, victim)

    # ------------------------------------------------------------------ budget
    def _remaining(self, fp: str, victim: str) -> int | None:
        budget = self._clients[fp].budget
        if budget is None:
            return None
        held = sum(n for k, v, n in self._inflight.values() if k == fp and v == victim)
        return budget - self._used.get((fp, victim), 0) - held

    def reserve(self, key: str | None, victim: str, count: int) -> Decision:
        """Grant ``count`` images or refuse them all (429): nothing is partially answered."""
        fp = key_fingerprint(key) if key else None
        with self._lock:
            d = self._authorize(fp, victim)
            if not d.ok:
                return d
            assert fp is not None
            remaining = self._remaining(fp, victim)
            if remaining is not None and count > remaining:
                budget = self._clients[fp].budget
                return Decision(429, f"query budget exhausted: {count} images requested but only {max(remaining, 0)}"
                                     f" of {budget} remain for this key on victim {victim!r}")
            rid = uuid.uuid4().hex
            self._inflight[rid] = (fp, victim, count)
            return Decision(200, reservation=rid)

    def commit(self, reservation: str, input_hash: str) -> None:
        """Count an answered request and log it (once: a second commit of the same reservation is ignored)."""
        with self._lock:
            entry = self._inflight.pop(reservation, None)
            if entry is None:
                log.warning("ledger: commit of unknown or already settled reservation %s", reservation)
                return
            fp, victim, count = entry
            self._used[(fp, victim)] = self._used.get((fp, victim), 0) + count
            self._log.append({"request_id": reservation, "key": fp, "victim": victim,
                              "time": time.time_ns() // 1000, "count": count, "input_hash": input_hash})

    def release(self, reservation: str) -> None:
        """Give back a reservation whose request was not answered."""
        with self._lock:
            self._inflight.pop(reservation, None)

    def usage(self, key: str | None, victim: str) -> dict:
        fp = key_fingerprint(key) if key else None
        with self._lock:
            d = self._authorize(fp, victim)
            if not d.ok:
                return {"status": d.status, "detail": d.detail}
            assert fp is not None
            remaining = self._remaining(fp, victim)
            return {"status": 200, "victim": victim, "used": self._used.get((fp, victim), 0),
                    "budget": self._clients[fp].budget, "remaining": remaining}

    def flush(self) -> None:
        with self._lock:
            self._log.compact()

    def close(self) -> None:
        with self._lock:
            self._log.close()
