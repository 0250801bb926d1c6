"""Query accounting for the victim API: API keys, per-key budgets and the query log.

One :class:`Ledger` serves a whole Serve application (it lives in a single accounting replica), so budgets hold across
every victim replica: two replicas can never both grant the last query.

**Debit first, refund on failure.** A request is *charged* (its images counted as used and its row journaled) before
the victim runs, in one accounting round trip, and *refunded* if no answer comes out of it (the victim replica died,
the client went away before the answer was computed, the accounting replica died mid-call). So:

- an answer is never handed out uncharged: the charge is durable before the victim is even asked, and survives the
  accounting replica's death (a restarted ledger rebuilds usage from the journal);
- nothing is ever *held*: there are no reservations to leak, so a dropped client cannot lock a budget;
- both calls are idempotent by the request id the gate (or a handle client) chooses: a charge retried after a lost
  reply is not counted twice, and a refund of a charge that never landed (the accounting replica died before writing
  it) is a no-op. A refund is accepted within ``refund_window_s`` of its charge (rebuilt after a restart from the
  log's times).

The one case the design leaves charged without an answer is the process running the gate dying between the charge
and the answer (the refund dies with it) with no one left to refund: the HTTP ingress (a victim replica dying under
it is refunded by the ingress), never a victim replica on the handle path, whose client chose the request id and
refunds it. The provider's side of the trade, never the attacker's.

The query log is a folder of Parquet parts (``part-*.parquet``) plus a journal (``journal.jsonl``) of rows not yet
compacted into a part, plus ``refunds.jsonl`` (the ids of refunded charges). :func:`read_query_log` returns the
answered requests: charges minus refunds. ``key`` in the log is a keyed hash (HMAC-SHA256 under a secret created in
the log folder, ``ledger.secret``, mode 0600) of the API key: the log alone cannot confirm a guessed key offline.

Plain Python (no Ray): the Serve deployment in :mod:`~distributed_me.serving.app` is a thin wrapper, and unit tests
drive the ledger directly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
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
REFUNDS = "refunds.jsonl"
SECRET = "ledger.secret"


def ledger_secret(folder: str | Path) -> bytes:
    """The log folder's fingerprint key, created on first use (32 random bytes, readable by the owner only)."""
    path = Path(folder) / SECRET
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def key_fingerprint(key: str, secret: bytes) -> str:
    """What the log stores instead of an API key: a keyed hash, enough to tell keys apart, and without the folder's
    secret no way to test a guessed key against it."""
    return "hmac:" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def _legacy_fingerprint(key: str) -> str:
    """Fingerprints logs written before keyed hashes (unsalted, truncated SHA-256): read, never written."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    """The outcome of an accounting call: ``status`` 200 or the HTTP error to return, with a message."""

    status: int
    detail: str = ""
    fingerprint: str = ""  # the key's, on a 200: what randomized policies key their draws on

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
    """Every answered request in a query-log folder (Parquet parts and the journal, minus refunded charges),
    oldest first."""
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
    table = pa.concat_tables(parts).sort_by("time")
    refunded = read_refunds(folder)
    if refunded:
        table = table.filter(pc.invert(pc.is_in(table["request_id"], pa.array(sorted(refunded), pa.string()))))
    return table


def read_refunds(folder: str | Path) -> set[str]:
    """Request ids whose charge was refunded (a torn last line is skipped)."""
    path = Path(folder) / REFUNDS
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.add(json.loads(line)["request_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


CLIENTS = "clients.jsonl"


class Ledger:
    """API keys, budgets and charges for every (key, victim) pair; thread-safe.

    Keys are held by fingerprint only (:func:`key_fingerprint`): a request's key is fingerprinted on arrival. Keys
    added at run time (one per sweep trial) are appended to ``clients.jsonl`` in the log folder — fingerprint, budget,
    victims, never the secret — so that a restarted accounting replica still knows them, and their usage, rebuilt
    from the log like every key's, still counts against their budgets.
    """

    def __init__(self, clients: list[Client], victims: list[str], log_folder: str | Path, flush_rows: int = 2048,
                 refund_window_s: float = 120.0):
        self._lock = threading.Lock()
        self._victims = set(victims)
        self._folder = Path(log_folder)
        self._log = QueryLog(log_folder, flush_rows)
        self._secret = ledger_secret(log_folder)
        self._clients_path = self._folder / CLIENTS
        self._refunds_path = self._folder / REFUNDS
        self._clients = {self.fingerprint(c.key): c for c in clients}
        self._clients.update(self._runtime_clients())
        legacy = {_legacy_fingerprint(c.key): self.fingerprint(c.key) for c in clients}
        self.refund_window_s = refund_window_s
        self._used: dict[tuple[str, str], int] = {}
        #: charges that may still be refunded: request id → (fingerprint, victim, count, charged at [monotonic s])
        self._charges: OrderedDict[str, tuple[str, str, int, float]] = OrderedDict()
        self._refunded = read_refunds(self._folder)
        table = self._log.read()  # charges minus refunds
        now_us, now_mono = time.time_ns() // 1000, time.monotonic()
        for rid, fp, victim, count, t in zip(table["request_id"].to_pylist(), table["key"].to_pylist(),
                                             table["victim"].to_pylist(), table["count"].to_pylist(),
                                             table["time"].cast(pa.int64()).to_pylist()):
            fp = legacy.get(fp, fp)
            self._used[(fp, victim)] = self._used.get((fp, victim), 0) + count
            age_s = (now_us - t) / 1e6
            if age_s < refund_window_s:  # a restart must still honour the refund of a charge made just before it
                self._charges[rid] = (fp, victim, count, now_mono - age_s)
        if len(table):
            log.info("ledger: rebuilt usage of %d keys from %d logged requests", len(self._used), len(table))

    def fingerprint(self, key: str) -> str:
        return key_fingerprint(key, self._secret)

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
        fp = self.fingerprint(client.key)
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
        """401 / 404 / 403, or 200: may this key query this victim at all (budget aside)? A 200 carries the key's
        fingerprint."""
        fp = self.fingerprint(key) if key else None
        d = self._authorize(fp, victim)
        return Decision(200, fingerprint=fp or "") if d.ok else d

    # ------------------------------------------------------------------ budget
    def _remaining(self, fp: str, victim: str) -> int | None:
        budget = self._clients[fp].budget
        if budget is None:
            return None
        return budget - self._used.get((fp, victim), 0)

    def charge(self, key: str | None, victim: str, count: int, input_hash: str, request_id: str) -> Decision:
        """Count ``count`` images and journal the request before it is answered, or refuse them all (429): nothing is
        partially answered. Idempotent by ``request_id``. A 200 carries the key's fingerprint."""
        fp = self.fingerprint(key) if key else None
        with self._lock:
            d = self._authorize(fp, victim)
            if not d.ok:
                return d
            assert fp is not None
            if request_id in self._charges:  # a retried charge whose first reply was lost
                return Decision(200, fingerprint=fp)
            if request_id in self._refunded:
                return Decision(409, f"request {request_id} was already refunded; send it again with a new id")
            remaining = self._remaining(fp, victim)
            if remaining is not None and count > remaining:
                budget = self._clients[fp].budget
                return Decision(429, f"query budget exhausted: {count} images requested but only {max(remaining, 0)}"
                                     f" of {budget} remain for this key on victim {victim!r}")
            self._log.append({"request_id": request_id, "key": fp, "victim": victim,
                              "time": time.time_ns() // 1000, "count": count, "input_hash": input_hash})
            self._used[(fp, victim)] = self._used.get((fp, victim), 0) + count
            self._charges[request_id] = (fp, victim, count, time.monotonic())
            self._expire()
            return Decision(200, fingerprint=fp)

    def refund(self, request_id: str) -> bool:
        """Give back a charge whose request was not answered; ``False`` if there was none to give back (never
        charged, already refunded, or older than the refund window). The id is remembered either way, so a charge
        that arrives after its refund (a slow call overtaken by the refund) is refused instead of counted."""
        with self._lock:
            if request_id in self._refunded:
                return False
            entry = self._charges.pop(request_id, None)
            with open(self._refunds_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"request_id": request_id, "time": time.time_ns() // 1000}) + "\n")
                f.flush()
            self._refunded.add(request_id)
            if entry is None:
                return False
            fp, victim, count, _ = entry
            self._used[(fp, victim)] -= count
            return True

    def _expire(self) -> None:
        horizon = time.monotonic() - self.refund_window_s
        while self._charges:
            rid, entry = next(iter(self._charges.items()))
            if entry[3] >= horizon:
                break
            self._charges.popitem(last=False)

    def usage(self, key: str | None, victim: str) -> dict:
        fp = self.fingerprint(key) if key else None
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
