"""The victim API's HTTP client: an :class:`~distributed_me.oracle.Oracle` over ``/v1/victims/{name}``, Ray-free.

:class:`HttpOracle` talks to ``/v1/victims/{name}`` over HTTP (npy request bodies, JSON answers; see
:mod:`distributed_me.wire`), as any outside client would, with plain ``httpx``. It sits beside the Oracle protocol
because it is what an attacker outside the cluster uses (``dme attack --victim-url``); the in-cluster
``HandleOracle`` in :mod:`distributed_me.serving.clients` shares its bookkeeping.

Both map the API's refusals to the library's errors: 429 → :class:`~distributed_me.errors.BudgetExhausted`, other
4xx → :class:`~distributed_me.errors.DmeError` with the server's message. Usage is read from the server at
construction (``/usage``) and then tracked from the answers, so ``queries_used`` costs no request.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import numpy as np
import torch

from .answer import Answer
from .errors import BudgetExhausted, DmeError
from .oracle import OracleInfo
from .wire import encode_npy

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
_URL_RE = re.compile(r"^(?P<base>https?://[^/]+)(?P<prefix>/.*)?/v1/victims/(?P<name>[^/]+)/?$")


def oracle_info(d: dict) -> OracleInfo:
    return OracleInfo(name=d["name"], class_names=list(d["class_names"]), input_shape=tuple(d["input_shape"]),
                      returns=d["returns"], policy=list(d.get("policy", [])))


#: how a 429 for too many requests in flight begins (a 429 without it means the budget is spent)
CONCURRENCY_DETAIL = "too many concurrent requests"


def retryable(status: int, body: dict) -> bool:
    """503 (victim or accounting lost; nothing charged) and 429 for concurrency: the same request may be sent again."""
    detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
    return status == 503 or (status == 429 and detail.startswith(CONCURRENCY_DETAIL))


def send_with_retries(send: Callable[[], tuple[int, dict]], victim: str, attempts: int = 4,
                      first_delay_s: float = 0.5) -> dict:
    """``send()`` until it is answered or refused for good; a retryable refusal is tried again with backoff (safe:
    the API charges nothing it did not answer)."""
    delay = first_delay_s
    for attempt in range(attempts):
        status, body = send()
        if not retryable(status, body) or attempt == attempts - 1:
            break
        log.info("victim %s: HTTP %d, retrying in %.1f s (%s)", victim, status, delay, body.get("detail", ""))
        time.sleep(delay)
        delay *= 2
    raise_for(status, body, victim)
    return body


def raise_for(status: int, body: dict, victim: str) -> None:
    """Turn an API refusal into the library's exception (the same ones LocalOracle raises)."""
    if status == 200:
        return
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if status == 429 and not retryable(status, body):
        err = BudgetExhausted(0, 0, 0)
        err.args = (f"victim {victim!r}: {detail}",)
        raise err
    raise DmeError(f"victim API refused the request for {victim!r} (HTTP {status}): {detail}")


class MeteredClient:
    """Shared bookkeeping: budget and usage from the server, then counted locally from answered batches."""

    info: OracleInfo

    def _init_usage(self, usage: dict) -> None:
        self._budget: int | None = usage.get("budget")
        self._used: int = int(usage.get("used", 0))

    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def budget(self) -> int | None:
        return self._budget

    @property
    def remaining(self) -> int | None:
        return None if self._budget is None else self._budget - self._used

    def _answer(self, body: dict, n: int) -> Answer:
        self._used += n
        return Answer.from_json(body, self.info.num_classes)


class HttpOracle(MeteredClient):
    """An Oracle over ``http(s)://HOST[:PORT]/v1/victims/NAME`` with an API key."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0):
        import httpx

        m = _URL_RE.match(url.rstrip("/"))
        if not m:
            raise DmeError(f"victim URL {url!r} must look like http://HOST:PORT/v1/victims/NAME")
        self.url = url.rstrip("/")
        self.name = m.group("name")
        self._http = httpx.Client(headers={API_KEY_HEADER: api_key}, timeout=timeout)
        try:
            meta = self._get(self.url)
            usage = self._get(self.url + "/usage")
        except httpx.HTTPError as e:
            raise DmeError(f"cannot reach the victim API at {self.url} ({type(e).__name__}: {e}); is `dme serve` "
                           "running there?") from None
        self.info = oracle_info(meta)
        self._init_usage(usage)

    def _get(self, url: str) -> dict:
        r = self._http.get(url)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text}
        raise_for(r.status_code, body, self.name)
        return body

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        import httpx

        payload = encode_npy(images)

        def send() -> tuple[int, dict]:
            try:
                r = self._http.post(self.url + "/predict", content=payload,
                                    headers={"Content-Type": "application/x-npy"})
            except httpx.HTTPError as e:
                raise DmeError(f"victim API at {self.url} did not answer ({type(e).__name__}: {e})") from None
            ctype = r.headers.get("content-type", "")
            return r.status_code, r.json() if ctype.startswith("application/json") else {"detail": r.text}

        return self._answer(send_with_retries(send, self.name), len(images))

    def close(self) -> None:
        self._http.close()
