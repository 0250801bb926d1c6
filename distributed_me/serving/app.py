"""The Ray Serve application: victims as an MLaaS-style API (``/v1/...``).

Three deployments:

- ``VictimReplica`` (one deployment per victim): loads the bundle, runs batched forward passes (``@serve.batch``,
  counting images, not requests) and applies the victim's output policy — the defense — before anything leaves it;
  autoscaled, on a GPU fraction when the cluster has GPUs, on CPUs otherwise;
- ``Accountant`` (one replica): the :class:`~distributed_me.serving.ledger.Ledger` of keys, budgets and the query log,
  so a budget holds across all victim replicas;
- ``Ingress``: FastAPI routes (OpenAPI at ``/docs``), input checks that answer JSON 4xx instead of a 500, and the
  reserve → predict → commit sequence. Its :meth:`Ingress.answer` is also what the handle Oracle calls, so handle and
  HTTP clients meet exactly the same boundary.

``build_app(args)`` is the application builder named by ``import_path`` in ``deployments/*.yaml``.
"""

# no `from __future__ import annotations` here: FastAPI must see the real `Request` type of the route methods
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..defenses import parse_policy
from ..http_oracle import API_KEY_HEADER
from ..oracle import OracleInfo
from ..victims import load_victim, victim_bundle_path
from ..wire import WireError, decode_body, input_hash, validate_images
from .ledger import Ledger, key_fingerprint
from .spec import Client, ServeSpec, VictimService, parse_serve_spec

log = logging.getLogger(__name__)

INGRESS_NAME = "Ingress"


def cluster_has_gpus() -> bool:
    """Whether replicas should ask for GPUs: decided once, from the cluster this application is built on."""
    try:
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # not connected: build for CPUs
        return False


def replica_options(svc: VictimService, gpus: bool, resources: dict[str, float] | None = None) -> dict[str, Any]:
    """``.options()`` of a victim deployment: resources (``resources``: the app's custom node resources), scaling,
    request limits."""
    actor: dict[str, Any] = ({"num_gpus": svc.gpu_fraction, "num_cpus": min(svc.num_cpus, 1.0)} if gpus
                             else {"num_cpus": svc.num_cpus})
    if resources:
        actor["resources"] = dict(resources)
    # torch in a replica uses as many threads as it was given CPUs (Ray sets OMP_NUM_THREADS only for num_cpus >= 1)
    actor["runtime_env"] = {"env_vars": {"DME_TORCH_THREADS": str(max(1, int(svc.num_cpus)))}}
    opts: dict[str, Any] = {"name": f"victim-{svc.name}", "ray_actor_options": actor,
                            "max_ongoing_requests": svc.max_ongoing_requests}
    if svc.autoscaling is not None:
        opts["autoscaling_config"] = svc.autoscaling.model_dump()
    else:
        opts["num_replicas"] = svc.num_replicas or 1
    return opts


def _images_in(items: list[np.ndarray]) -> int:
    return sum(len(x) for x in items)


@serve.deployment
class VictimReplica:
    """One victim behind its output policy. Never returns weights, paths or raw logits."""

    def __init__(self, service: dict, bundle_path: str | None = None):
        threads = int(os.environ.get("DME_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        self.svc = VictimService.model_validate(service)
        source = bundle_path if bundle_path and Path(bundle_path).exists() else self.svc.source
        self.victim = load_victim(source)
        self.policy = parse_policy(self.svc.output_policy, seed=self.svc.policy_seed)
        self.meta = OracleInfo(name=self.svc.name, class_names=list(self.victim.class_names),
                               input_shape=tuple(self.victim.input_shape), returns=self.policy.returns,
                               policy=self.policy.describe())
        self._forward.set_max_batch_size(self.svc.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.svc.batch_wait_timeout_s)
        log.info("victim %s ready (%s, %d torch threads)", self.svc.name, source, threads)

    def info(self) -> dict:
        return self.meta.to_dict()

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _forward(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        x = torch.from_numpy(np.concatenate(batches))
        probs = self.victim.predict_probs(x).numpy()
        return np.split(probs, np.cumsum([len(b) for b in batches])[:-1])

    async def predict(self, images: np.ndarray, stream: str = "") -> dict:
        """Float32 NCHW in [0, 1] (already validated by the ingress) → the defended answer as JSON. ``stream`` is the
        client's key fingerprint: randomized policies key their draws on it and on each image (``RowStreams``)."""
        step = self.svc.max_batch_size
        chunks = [images[i : i + step] for i in range(0, len(images), step)]
        probs = np.concatenate(await asyncio.gather(*(self._forward(c) for c in chunks)))
        return self.policy(probs, queries=images, stream=stream).to_json()


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Accountant:
    """The single accounting replica: every reserve/commit/release goes through its ledger."""

    def __init__(self, spec: dict):
        s = ServeSpec.model_validate(spec)
        self.ledger = Ledger(s.clients, [v.name for v in s.victims], s.query_log, s.log_flush_rows)

    def reserve(self, key: str | None, victim: str, count: int) -> tuple[int, str, str]:
        d = self.ledger.reserve(key, victim, count)
        return d.status, d.detail, d.reservation

    def authorize(self, key: str | None, victim: str) -> tuple[int, str]:
        d = self.ledger.authorize(key, victim)
        return d.status, d.detail

    def commit(self, reservation: str, digest: str) -> None:
        self.ledger.commit(reservation, digest)

    def release(self, reservation: str) -> None:
        self.ledger.release(reservation)

    def usage(self, key: str | None, victim: str) -> dict:
        return self.ledger.usage(key, victim)

    def add_client(self, client: dict) -> None:
        self.ledger.add_client(Client.model_validate(client))

    def flush(self) -> None:
        self.ledger.flush()

    def __del__(self) -> None:
        try:
            self.ledger.close()
        except Exception:
            pass


api = FastAPI(
    title="distributed_me victim API",
    version="1",
    description="Victim classifiers as an MLaaS API. Send a batch of images, get back what the victim's output "
                "policy allows. Authenticate with the X-API-Key header; each key has a per-victim query budget.",
)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, victims: dict[str, DeploymentHandle], accountant: DeploymentHandle, spec: dict):
        self.spec = ServeSpec.model_validate(spec)
        self.victims = victims
        self.accountant = accountant
        self._info: dict[str, dict] = {}

    async def _meta(self, victim: str) -> dict:
        if victim not in self._info:
            self._info[victim] = await self.victims[victim].info.remote()
        return self._info[victim]

    async def answer(self, key: str | None, victim: str, images: np.ndarray) -> tuple[int, dict]:
        """The whole predict path for an already-decoded batch: (HTTP status, JSON body)."""
        try:
            if victim not in self.victims:
                raise WireError(404, f"no victim named {victim!r}; hosted: {', '.join(sorted(self.victims))}")
            meta = await self._meta(victim)
            if not images.flags.writeable:  # arrays from Ray's object store are read-only; torch wants its own
                images = images.copy()
            x = validate_images(images, tuple(meta["input_shape"]), self.spec.max_request_images)
        except WireError as e:
            # 401/403 take precedence over input errors: a stranger learns nothing about the victim's input format
            status, detail = await self.accountant.authorize.remote(key, victim)
            if status != 200:
                return status, {"detail": detail}
            return e.status, {"detail": e.detail}
        status, detail, reservation = await self.accountant.reserve.remote(key, victim, len(x))
        if status != 200:
            return status, {"detail": detail}
        try:
            body = await self.victims[victim].predict.remote(x.numpy(), key_fingerprint(key) if key else "")
        except Exception as e:  # a replica died or failed: nothing was answered, so nothing is charged
            await self.accountant.release.remote(reservation)
            log.warning("victim %s failed a request: %s", victim, e)
            return 503, {"detail": f"victim {victim!r} could not answer ({type(e).__name__}); retry the request"}
        await self.accountant.commit.remote(reservation, input_hash(x))
        return 200, body

    async def victim_meta(self, victim: str) -> tuple[int, dict]:
        """Public metadata for handle clients: (status, body) as the HTTP route would answer."""
        if victim not in self.victims:
            return 404, {"detail": f"no victim named {victim!r}; hosted: {', '.join(sorted(self.victims))}"}
        return 200, await self._meta(victim)

    @api.get("/v1/victims", summary="Public metadata of every hosted victim")
    async def list_victims(self) -> list[dict]:
        return [await self._meta(name) for name in sorted(self.victims)]

    @api.get("/v1/victims/{name}", summary="Public metadata of one victim")
    async def victim_info(self, name: str):
        if name not in self.victims:
            return _error(404, f"no victim named {name!r}; hosted: {', '.join(sorted(self.victims))}")
        return await self._meta(name)

    @api.post("/v1/victims/{name}/predict", summary="Query a victim with a batch of images")
    async def predict(self, name: str, request: Request):
        key = request.headers.get(API_KEY_HEADER)
        limit = int(self.spec.max_request_mb * 2**20)
        declared = request.headers.get("content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise WireError(413, f"request body of {int(declared)} bytes exceeds {limit}: split the batch")
            body = await request.body()
            if len(body) > limit:
                raise WireError(413, f"request body of {len(body)} bytes exceeds {limit}: split the batch")
            images = decode_body(body, request.headers.get("content-type"))
        except WireError as e:
            status, detail = await self.accountant.authorize.remote(key, name)
            return _error(status, detail) if status != 200 else _error(e.status, e.detail)
        status, content = await self.answer(key, name, images)
        return JSONResponse(status_code=status, content=content)

    @api.get("/v1/victims/{name}/usage", summary="Queries used and remaining for the calling key")
    async def usage(self, name: str, request: Request):
        out = await self.accountant.usage.remote(request.headers.get(API_KEY_HEADER), name)
        status = out.pop("status")
        return JSONResponse(status_code=status, content=out)

    @api.get("/v1/health", summary="Liveness")
    async def health(self) -> dict:
        return {"status": "ok", "victims": sorted(self.victims), "time": time.time()}


def build_app(args: dict[str, Any]) -> Application:
    """Application builder (``import_path: distributed_me.serving.app:build_app``): validate, then bind."""
    spec = parse_serve_spec(args)
    spec = spec.model_copy(update={"query_log": str(Path(spec.query_log).expanduser().resolve())})
    gpus = cluster_has_gpus()
    victims = {}
    for svc in spec.victims:
        # resolved where the app is built (trains the embedded victim if needed); a replica on a node where that
        # folder does not exist resolves the source itself
        victims[svc.name] = VictimReplica.options(**replica_options(svc, gpus, spec.resources)).bind(
            svc.model_dump(), str(victim_bundle_path(svc.source)))
    placed = {"ray_actor_options": {"num_cpus": 0, "resources": dict(spec.resources)}} if spec.resources else {}
    accountant = Accountant.options(**placed).bind(spec.model_dump())
    return Ingress.options(**placed).bind(victims, accountant, spec.model_dump())
