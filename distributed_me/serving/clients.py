"""Oracle clients of the victim API: drop-in replacements for the in-process :class:`~distributed_me.oracle.LocalOracle`.

- :class:`HttpOracle` talks to ``/v1/victims/{name}`` over HTTP (npy request bodies, JSON answers), as any outside
  client would. Plain ``httpx``: no Ray needed on the attacker's side.
- :class:`HandleOracle` calls the application's ingress through a Serve ``DeploymentHandle`` (inside the cluster,
  e.g. from a Tune trial), passing arrays without HTTP but through the *same* ``Ingress.answer`` path: same keys,
  budgets, input checks, policy and query log.

Both map the API's refusals to the library's errors: 429 → :class:`~distributed_me.errors.BudgetExhausted`, other
4xx → :class:`~distributed_me.errors.DmeError` with the server's message. Usage is read from the server at
construction (``/usage``) and then tracked from the answers, so ``queries_used`` costs no request.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from ..answer import Answer
from ..errors import BudgetExhausted, DmeError
from ..oracle import OracleInfo
from .codec import encode_npy

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
_URL_RE = re.compile(r"^(?P<base>https?://[^/]+)(?P<prefix>/.*)?/v1/victims/(?P<name>[^/]+)/?$")


def _info(d: dict) -> OracleInfo:
    return OracleInfo(name=d["name"], class_names=list(d["class_names"]), input_shape=tuple(d["input_shape"]),
                      returns=d["returns"], policy=list(d.get("policy", [])))


def raise_for(status: int, body: dict, victim: str) -> None:
    """Turn an API refusal into the library's exception (the same ones LocalOracle raises)."""
    if status == 200:
        return
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if status == 429:
        err = BudgetExhausted(0, 0, 0)
        err.args = (f"victim {victim!r}: {detail}",)
        raise err
    raise DmeError(f"victim API refused the request for {victim!r} (HTTP {status}): {detail}")


class _MeteredClient:
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


class HttpOracle(_MeteredClient):
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
        self.info = _info(meta)
        self._init_usage(usage)

    def _get(self, url: str) -> dict:
        r = self._http.get(url)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text}
        raise_for(r.status_code, body, self.name)
        return body

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        import httpx

        try:
            r = self._http.post(self.url + "/predict", content=encode_npy(images),
                                headers={"Content-Type": "application/x-npy"})
        except httpx.HTTPError as e:
            raise DmeError(f"victim API at {self.url} did not answer ({type(e).__name__}: {e})") from None
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text}
        raise_for(r.status_code, body, self.name)
        return self._answer(body, len(images))

    def close(self) -> None:
        self._http.close()


class HandleOracle(_MeteredClient):
    """An Oracle through the Serve application's ingress handle (``app_name`` as deployed by ``dme serve``)."""

    def __init__(self, victim: str, api_key: str, app_name: str = "dme"):
        from ray import serve

        self.name, self._key = victim, api_key
        self._ingress = serve.get_app_handle(app_name)
        self._accountant = serve.get_deployment_handle("Accountant", app_name)
        status, meta = self._ingress.victim_meta.remote(victim).result()
        raise_for(status, meta, victim)
        self.info = _info(meta)
        usage = self._accountant.usage.remote(api_key, victim).result()
        raise_for(usage.pop("status"), usage, victim)
        self._init_usage(usage)

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        status, body = self._ingress.answer.remote(self._key, self.name, images).result()
        raise_for(status, body, self.name)
        return self._answer(body, len(images))
