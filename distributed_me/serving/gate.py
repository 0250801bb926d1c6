"""The ledger's boundary: what every answer crosses before it leaves the service, wherever it is served from.

:class:`Gate` holds the key check (cached), the input check, the detectors' say (block or degrade before the
charge, observe before the answer) and the charge ∥ forward dance that keeps the ledger's promise — an answer leaves
only once its charge stands, and a charge whose request ends without an answer (error, cancellation, a dead replica,
a dead accountant) is refunded by a task that outlives the request. Two places run it:

- the HTTP ingress (:class:`~distributed_me.serving.app.Ingress`), whose forward is a call to a victim replica;
- each victim replica itself (``VictimReplica.answer``), whose forward is local: the handle path for in-cluster
  clients (Tune trials, ``HandleOracle``) is then one Serve hop instead of two, the charge still running in parallel
  with the forward (issue 12: Serve's own ingress → replica hop cost more than the whole fixed-overhead goal).

Both run this one class, so keys, budgets, input checks, detectors and the query log are the same on either path.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from ..wire import WireError, input_hash, validate_images
from .spec import ServeSpec

log = logging.getLogger(__name__)


class Pending(Protocol):
    """A forward pass in flight: awaitable for its answer, cancellable (an asyncio task or a Serve response)."""

    def __await__(self) -> Any: ...

    def cancel(self) -> Any: ...


#: ``forward(images, stream, degraded, with_probs)`` starts the victim's defended forward pass and returns it in flight
Forward = Callable[[np.ndarray, str, bool, bool], Pending]


def remember(cache: dict, key: Any, value: Any, limit: int = 10_000) -> None:
    """A per-key cache that cannot grow without bound under a flood of distinct keys: full, it starts over."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


class Gate:
    """Keys, budgets and detectors around a victim's forward pass, against one accounting (and detector) replica."""

    def __init__(self, spec: ServeSpec, accountant: Any, watchman: Any | None = None):
        self.spec = spec
        self.accountant = accountant
        self.watchman = watchman
        self.watched = {v.name for v in spec.victims if v.detectors} if watchman is not None else set()
        self._authorized: dict[tuple[str, str], tuple[float, str]] = {}  # (key, victim) → (trusted until, fingerprint)
        self._refused: dict[tuple[str, str], float] = {}  # (key, victim) → until when charges go first (after a 429)
        self.refunds: set[asyncio.Task] = set()
        self.answering = 0  # batches between their charge and their answer (or refund)
        self.checking = 0  # key checks waiting for the accounting replica (uncached keys, e.g. wrong ones)

    async def authorize(self, key: str | None, victim: str) -> tuple[int, str, str]:
        """(status, detail, the key's fingerprint): the key check that runs before any body is read. No key is
        refused here; a key seen authorized within ``auth_cache_s`` costs nothing; others one accounting call.

        Only keys this replica never saw authorized count against ``max_pending_key_checks``: a flood of wrong keys
        fills that limit, and a good client whose trust ran out during the flood must not be refused with it (its
        re-check is bounded by the keys the accounting replica accepted, not by what strangers send). A re-check
        that fails forgets the key, so a revoked key goes back under the limit."""
        if not key:
            return 401, "missing API key: send it in the X-API-Key header", ""
        now = time.monotonic()
        known = self._authorized.get((key, victim))
        if known is not None and known[0] > now:
            return 200, "", known[1]
        if known is None and self.checking >= self.spec.max_pending_key_checks:  # strangers must not queue forever
            return 503, "too many key checks in flight: retry", ""
        if known is None:
            self.checking += 1
        try:
            status, detail, fingerprint = await self.accountant.authorize.remote(key, victim)
        except Exception as e:  # the accounting replica is restarting: nothing was read or charged yet
            log.warning("accounting failed a key check: %s", e)
            return 503, f"accounting unavailable ({type(e).__name__}); nothing was charged: retry", ""
        finally:
            if known is None:
                self.checking -= 1
        if status == 200:
            remember(self._authorized, (key, victim), (now + self.spec.auth_cache_s, fingerprint))
        else:
            self._authorized.pop((key, victim), None)
        return status, detail, fingerprint

    def refund_later(self, request_id: str) -> None:
        """Refund in a task of its own, retried until the accounting replica takes it (it may be restarting), so a
        cancelled request or a dead accountant never leaves a charge without an answer."""
        task = asyncio.get_running_loop().create_task(self._refund(request_id))
        self.refunds.add(task)
        task.add_done_callback(self.refunds.discard)

    async def _refund(self, request_id: str) -> None:
        deadline, delay = time.monotonic() + self.spec.refund_window_s / 2, 0.2
        while True:
            try:
                await self.accountant.refund.remote(request_id)
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    log.error("refund of request %s gave up (%s): it stays charged", request_id, e)
                    return
                await asyncio.sleep(delay)
                delay = min(2 * delay, 5.0)

    async def answer(self, key: str | None, victim: str, images: np.ndarray, meta: Callable[[], Awaitable[dict]],
                     forward: Forward, request_id: str | None = None) -> tuple[int, dict]:
        """The whole predict path for an already-decoded batch: (HTTP status, JSON body). ``meta()`` gives the
        victim's public metadata (its input shape); ``request_id`` lets a handle client refund a request whose
        answer it never received (a replica that died after the charge)."""
        self.answering += 1
        try:
            return await self._answer(key, victim, images, meta, forward, request_id or uuid.uuid4().hex)
        finally:
            self.answering -= 1

    async def _answer(self, key: str | None, victim: str, images: np.ndarray, meta: Callable[[], Awaitable[dict]],
                      forward: Forward, request_id: str) -> tuple[int, dict]:
        # 401/403 come before input errors: a stranger learns nothing about the victim's input format
        status, detail, stream = await self.authorize(key, victim)
        if status != 200:
            return status, {"detail": detail}
        try:
            info = await meta()
            if not images.flags.writeable:  # arrays from Ray's object store are read-only; torch wants its own
                images = images.copy()
            x = validate_images(images, tuple(info["input_shape"]), self.spec.max_request_images)
        except WireError as e:
            return e.status, {"detail": e.detail}
        watched = victim in self.watched
        degraded = False
        if watched:  # a blocked key is refused before it is charged; a degraded one gets the degrade policy
            assert self.watchman is not None
            try:
                key_status = await self.watchman.status.remote(victim, stream)
            except Exception as e:
                log.warning("detectors of %s failed a status check: %s", victim, e)
                return 503, {"detail": f"detectors unavailable ({type(e).__name__}); nothing was charged: retry"}
            if key_status["status"] == "block":
                return 403, {"detail": f"this key is blocked from victim {victim!r} by a detector: "
                                       f"{key_status['reason']}"}
            degraded = key_status["status"] == "degrade"
        # the charge goes out first and the forward runs while it is decided (one accounting round trip off the
        # critical path); the answer is returned only once the charge stands. A key refused recently is charged
        # first, so a spent budget cannot buy free forward passes
        array = x.numpy()
        charge = self.accountant.charge.remote(key, victim, len(x), input_hash(x), request_id)
        refused_until = self._refused.get((key, victim), 0.0)
        predict = forward(array, stream, degraded, watched) if refused_until < time.monotonic() else None
        try:
            status, detail, _ = await charge
        except asyncio.CancelledError:
            self.refund_later(request_id)
            if predict is not None:
                predict.cancel()
            raise
        except Exception as e:  # the accounting replica died mid-call: the charge may have landed; take it back
            self.refund_later(request_id)
            if predict is not None:
                predict.cancel()
            log.warning("accounting failed a charge: %s", e)
            return 503, {"detail": f"accounting unavailable ({type(e).__name__}); nothing was charged: retry"}
        if status != 200:
            if predict is not None:
                predict.cancel()
            if status == 429:
                remember(self._refused, (key, victim), time.monotonic() + self.spec.auth_cache_s)
            return status, {"detail": detail}
        self._refused.pop((key, victim), None)
        try:
            if predict is None:
                predict = forward(array, stream, degraded, watched)
            body = await predict
        except asyncio.CancelledError:  # the client went away before its answer existed
            self.refund_later(request_id)
            raise
        except Exception as e:  # a replica died or failed: nothing was answered, so nothing stays charged
            self.refund_later(request_id)
            log.warning("victim %s failed a request: %s", victim, e)
            return 503, {"detail": f"victim {victim!r} could not answer ({type(e).__name__}); nothing was charged: "
                                   "retry"}
        if watched:  # observed (journaled) before the answer leaves; a detector that fails takes the answer back
            assert self.watchman is not None
            body, probs = body
            try:
                await self.watchman.observe.remote(victim, stream, array, probs)
            except asyncio.CancelledError:
                self.refund_later(request_id)
                raise
            except Exception as e:
                self.refund_later(request_id)
                log.warning("detectors of %s failed to observe a request: %s", victim, e)
                return 503, {"detail": f"detectors unavailable ({type(e).__name__}); nothing was charged: retry"}
        return 200, body
