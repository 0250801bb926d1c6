"""The in-cluster Oracle client of the victim API: :class:`HandleOracle`, through a Serve ``DeploymentHandle``.

It calls the application's ingress (e.g. from a Tune trial), passing arrays without HTTP but through the *same*
``Ingress.answer`` path as HTTP clients: same keys, budgets, input checks, policy and query log. The HTTP client,
which needs no Ray, is :class:`distributed_me.http_oracle.HttpOracle`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..answer import Answer
from ..http_oracle import MeteredClient, oracle_info, raise_for, send_with_retries


class HandleOracle(MeteredClient):
    """An Oracle through the Serve application's ingress handle (``app_name`` as deployed by ``dme serve``)."""

    def __init__(self, victim: str, api_key: str, app_name: str = "dme"):
        from ray import serve

        self.name, self._key = victim, api_key
        self._ingress = serve.get_app_handle(app_name)
        self._accountant = serve.get_deployment_handle("Accountant", app_name)
        status, meta = self._ingress.victim_meta.remote(victim).result()
        raise_for(status, meta, victim)
        self.info = oracle_info(meta)
        usage = self._accountant.usage.remote(api_key, victim).result()
        raise_for(usage.pop("status"), usage, victim)
        self._init_usage(usage)

    def query(self, images: np.ndarray | torch.Tensor) -> Answer:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        body = send_with_retries(lambda: self._ingress.answer.remote(self._key, self.name, images).result(),
                                 self.name)
        return self._answer(body, len(images))
