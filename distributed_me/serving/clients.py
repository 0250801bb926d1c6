"""The in-cluster Oracle client of the victim API: :class:`HandleOracle`, through Serve ``DeploymentHandle``\\ s.

It calls the victim's own deployment (``VictimReplica.answer``): one Serve hop, the charge in parallel with the
forward, through the *same* gate (:class:`~distributed_me.serving.gate.Gate`) as HTTP clients meet at the ingress:
same keys, budgets, input checks, detectors, policy and query log. The HTTP client, which needs no Ray, is
:class:`distributed_me.http_oracle.HttpOracle`.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import torch

from ..answer import Answer
from ..http_oracle import MeteredClient, oracle_info, raise_for, send_with_retries

log = logging.getLogger(__name__)


class HandleOracle(MeteredClient):
    """An Oracle through the Serve application ``app_name`` (as deployed by ``dme serve`` or a sweep)."""

    def __init__(self, victim: str, api_key: str, app_name: str = "dme"):
        from ray import serve

        self.name, self._key = victim, api_key
        ingress = serve.get_app_handle(app_name)
        self._accountant = serve.get_deployment_handle("Accountant", app_name)
        status, meta = ingress.victim_meta.remote(victim).result()
        raise_for(status, meta, victim)
        self.info = oracle_info(meta)
        self._victim = serve.get_deployment_handle(f"victim-{victim}", app_name)
        usage = self._accountant.usage.remote(api_key, victim).result()
        raise_for(usage.pop("status"), usage, victim)
        self._init_usage(usage)

    def _send(self, images: np.ndarray) -> tuple[int, dict]:
        """One attempt. A replica that dies after the charge leaves the gate no one to refund it: this client,
        which chose the request's id, refunds it (the ledger refuses the charge if it comes later) and reports the
        attempt as a 503, which is retried with a new id."""
        request_id = uuid.uuid4().hex
        try:
            return self._victim.answer.remote(self._key, images, request_id).result()
        except Exception as e:  # ActorDiedError, a replica unavailable: Serve's, not the API's, failure
            log.warning("victim %s: the replica failed the request (%s); refunding it", self.name, e)
            charged = "nothing was charged"
            try:
                self._accountant.refund.remote(request_id).result(timeout_s=60)
            except Exception as refund_error:  # the accounting replica is down too: its charge, if any, stays
                log.error("victim %s: refund of request %s failed (%s)", self.name, request_id, refund_error)
                charged = f"its charge, if it landed, could not be refunded ({type(refund_error).__name__})"
            return 503, {"detail": f"victim {self.name!r} could not answer ({type(e).__name__}); {charged}: retry"}

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        body = send_with_retries(lambda: self._send(images), self.name)
        return self._answer(body, len(images))
