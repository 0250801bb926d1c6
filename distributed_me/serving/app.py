"""The Ray Serve application: victims as an MLaaS-style API (``/v1/...``).

Four deployments:

- ``VictimReplica`` (one deployment per victim): loads the bundle, runs batched forward passes (``@serve.batch``,
  counting images, not requests) and applies the victim's output policy — the defense — before anything leaves it;
  autoscaled, on a GPU fraction when the cluster has GPUs, on CPUs otherwise. Its ``answer`` is the in-cluster
  clients' path (``HandleOracle``, Tune trials): the same :class:`~.gate.Gate` as the ingress runs, around a local
  forward, so a handle request is one Serve hop;
- ``Accountant`` (one replica): the :class:`~distributed_me.serving.ledger.Ledger` of keys, budgets and the query log,
  so a budget holds across all victim replicas;
- ``Watchman`` (one replica, only when a victim has detectors): the per-key detector states
  (:class:`~distributed_me.serving.watch.Watch`), journaled so they survive a restart; a key's status (ok, flag,
  degrade, block) is read before its request is charged and every answered request is observed before its answer
  leaves;
- ``Ingress``: FastAPI routes (OpenAPI at ``/docs``, rendered without any CDN), and the order a hostile Internet
  needs: the key is checked before a byte of the body is read (unknown keys cost one cached lookup, never a read or a
  decode); the body is read in chunks against the size limit and a deadline, within a per-key concurrency limit;
  every malformed body is a JSON 4xx; then the gate: charge ∥ predict on a victim replica (→ refund when no answer
  comes out). HTTP and handle clients meet the same boundary, :class:`~.gate.Gate`.

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
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..defenses import bind_kits, find_kit, parse_policy
from ..defenses.dawn import WATERMARK_DIR, FolderSink
from ..defenses.kits import missing_kit_error
from ..errors import DmeError
from ..http_oracle import API_KEY_HEADER, CONCURRENCY_DETAIL
from ..oracle import OracleInfo
from ..train import probs_from_logits
from ..victims import load_victim, victim_bundle_path
from ..wire import WireError, decode_body
from .docs_page import DOCS_PAGE
from .gate import Gate
from .ledger import Ledger
from .spec import Client, ServeSpec, VictimService, parse_serve_spec
from .watch import Watch, parse_rules

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

    #: how long a replica must have been idle for a lone request to skip the batcher (a queued request follows the
    #: previous one within microseconds; a client's next request comes at least a network round trip later)
    IDLE_S = 0.001

    def __init__(self, service: dict, bundle_path: str | None = None, query_log: str | None = None,
                 spec: dict | None = None, accountant: DeploymentHandle | None = None,
                 watchman: DeploymentHandle | None = None):
        threads = int(os.environ.get("DME_TORCH_THREADS", "1"))
        torch.set_num_threads(threads)
        self.svc = VictimService.model_validate(service)
        source = bundle_path if bundle_path and Path(bundle_path).exists() else self.svc.source
        self.victim = load_victim(source)
        # defense kits (MAD's surrogate, AM's model, CIP's energies) load here: a missing one fails the deployment
        self.policy = bind_kits(parse_policy(self.svc.output_policy, seed=self.svc.policy_seed), self.victim)
        self.degraded = bind_kits(parse_policy(self.svc.degrade_policy, seed=self.svc.policy_seed), self.victim)
        for chain in (self.policy, self.degraded):  # watermarking policies (DAWN) keep their evidence by the log
            if chain.needs_sink:
                chain.bind_sink(FolderSink(Path(query_log or ".") / WATERMARK_DIR / self.svc.name))
        self.meta = OracleInfo(name=self.svc.name, class_names=list(self.victim.class_names),
                               input_shape=tuple(self.victim.input_shape), returns=self.policy.returns,
                               policy=self.policy.describe())
        self._active = 0  # predict calls in flight on this replica
        self._idle_since = 0.0  # when the last of them ended
        # the one-hop handle path (``answer``): the same gate as the HTTP ingress, against the same accounting replica
        self.gate = (Gate(ServeSpec.model_validate(spec), accountant, watchman)
                     if spec is not None and accountant is not None else None)
        self._forward.set_max_batch_size(self.svc.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.svc.batch_wait_timeout_s)
        log.info("victim %s ready (%s, %d torch threads)", self.svc.name, source, threads)

    async def info(self) -> dict:
        return self.meta.to_dict()

    async def answer(self, key: str | None, images: np.ndarray, request_id: str | None = None) -> tuple[int, dict]:
        """The predict path for in-cluster clients (``HandleOracle``): key, budget, input checks, detectors and the
        query log exactly as through the ingress (:class:`~.gate.Gate`), but the forward is local, so a request is
        one Serve hop, not two. ``request_id`` (the client's) lets the client refund a request whose answer it never
        got because this replica died after the charge."""
        if self.gate is None:
            return 503, {"detail": f"victim {self.svc.name!r} is not deployed with its gate: query it through the "
                                   "ingress"}

        def forward(x: np.ndarray, stream: str, degraded: bool, with_probs: bool) -> asyncio.Task:
            return asyncio.ensure_future(self.predict(x, stream, degraded, with_probs))

        return await self.gate.answer(key, self.svc.name, images, self.info, forward, request_id)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _forward(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        logits = await asyncio.to_thread(self._logits, np.concatenate(batches))
        return np.split(logits, np.cumsum([len(b) for b in batches])[:-1])

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """The forward, run in a worker thread (torch releases the GIL): the replica's event loop stays free
        meanwhile. On the loop, the forward would also hold back the charge that :meth:`answer` sent just before it:
        a handle call from inside a replica is dispatched by the loop, so the accounting round trip ran after the
        forward instead of beside it (measured: 6-8 ms of a 64-image request's fixed overhead)."""
        return self.victim.predict_logits(torch.from_numpy(x)).numpy()

    async def predict(self, images: np.ndarray, stream: str = "", degraded: bool = False,
                      with_probs: bool = False) -> Any:
        """Float32 NCHW in [0, 1] (already validated by the ingress) → the defended answer as JSON. ``stream`` is the
        client's key fingerprint: randomized policies key their draws on it and on each image (``RowStreams``).
        ``degraded``: answer with the ``degrade_policy`` (a key a detector flagged). ``with_probs``: also return the
        undefended probabilities, ``(answer, probs)``, for the detectors (they stay inside the service).

        A request that finds the replica idle (nothing in flight, and nothing for at least ``IDLE_S``, so it is not
        the next of a queue) with one forward's worth of images runs at once: with no one to share a batch with,
        waiting ``batch_wait_timeout_s`` for company only adds latency. Under load requests follow each other without
        a gap and go through the batcher as usual."""
        step = self.svc.max_batch_size
        now = time.monotonic()
        self._active += 1
        try:
            if self._active == 1 and now - self._idle_since >= self.IDLE_S and len(images) <= step:
                x = images if images.flags.writeable else images.copy()
                logits = await asyncio.to_thread(self._logits, x)
            else:
                chunks = [images[i : i + step] for i in range(0, len(images), step)]
                logits = np.concatenate(await asyncio.gather(*(self._forward(c) for c in chunks)))
        finally:
            self._active -= 1
            if not self._active:
                self._idle_since = time.monotonic()
        probs = probs_from_logits(torch.from_numpy(logits)).numpy()
        chain = self.degraded if degraded else self.policy
        body = chain(probs, queries=images, stream=stream, logits=logits).to_json()
        return (body, probs) if with_probs else body


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Accountant:
    """The single accounting replica: every authorize/charge/refund goes through its ledger."""

    def __init__(self, spec: dict):
        s = ServeSpec.model_validate(spec)
        self.ledger = Ledger(s.clients, [v.name for v in s.victims], s.query_log, s.log_flush_rows,
                             refund_window_s=s.refund_window_s)

    def charge(self, key: str | None, victim: str, count: int, digest: str, request_id: str) -> tuple[int, str, str]:
        d = self.ledger.charge(key, victim, count, digest, request_id)
        return d.status, d.detail, d.fingerprint

    def authorize(self, key: str | None, victim: str) -> tuple[int, str, str]:
        d = self.ledger.authorize(key, victim)
        return d.status, d.detail, d.fingerprint

    def refund(self, request_id: str) -> bool:
        return self.ledger.refund(request_id)

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


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Watchman:
    """The single detector replica: every key's detector states (``<query_log>/detectors``), see :mod:`.watch`."""

    def __init__(self, spec: dict):
        s = ServeSpec.model_validate(spec)
        rules = {v.name: parse_rules([r.model_dump() for r in v.detectors]) for v in s.victims if v.detectors}
        self.watch = Watch(Path(s.query_log) / "detectors", rules, snapshot_every=s.detector_snapshot_every,
                           max_keys_in_memory=s.detector_keys_in_memory)

    def status(self, victim: str, fingerprint: str) -> dict:
        return self.watch.status(victim, fingerprint).to_dict()

    def observe(self, victim: str, fingerprint: str, images: np.ndarray, probs: np.ndarray) -> dict:
        return self.watch.observe(victim, fingerprint, images, probs).to_dict()

    def verdicts(self, victim: str, fingerprint: str) -> list[dict]:
        return [v.__dict__ for v in self.watch.verdicts(victim, fingerprint)]

    def __del__(self) -> None:
        try:
            self.watch.close()
        except Exception:
            pass


api = FastAPI(
    title="distributed_me victim API",
    version="1",
    description="Victim classifiers as an MLaaS API. Send a batch of images, get back what the victim's output "
                "policy allows. Authenticate with the X-API-Key header; each key has a per-victim query budget.",
    docs_url=None,  # Swagger UI loads its scripts from a CDN: blank offline. /docs below renders the spec itself
    redoc_url=None,
)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody, "description": STATUS_MEANING[c]} for c in codes}


#: every status the API answers with, and what it means (the OpenAPI spec lists each per route)
STATUS_MEANING = {
    400: "malformed body (not .npy, not JSON, nested too deep, a number out of range, trailing bytes)",
    401: "missing or unknown API key",
    403: "this key may not query this victim",
    404: "no such victim",
    408: "the request body did not arrive in time",
    409: "a charge retried after its refund: send the request again",
    413: "body or batch larger than the limits",
    415: "unsupported content type",
    422: "well-formed body holding an invalid batch (shape, range, dtype, NaN)",
    429: "query budget spent, or too many concurrent requests for this key",
    503: "the victim or the accounting could not answer: nothing was charged, retry",
}


class ErrorBody(BaseModel):
    detail: str


@serve.deployment(name=INGRESS_NAME, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, victims: dict[str, DeploymentHandle], accountant: DeploymentHandle, spec: dict,
                 watchman: DeploymentHandle | None = None):
        self.spec = ServeSpec.model_validate(spec)
        self.victims = victims
        self.accountant = accountant
        self.gate = Gate(self.spec, accountant, watchman)
        self._info: dict[str, dict] = {}
        self._per_key: dict[str, int] = {}  # requests in flight per key (this ingress replica)
        self._reading = 0  # requests past the key check whose body is still arriving, on this ingress replica

    async def _meta(self, victim: str) -> dict:
        if victim not in self._info:
            info = await self.victims[victim].info.remote()
            self._info[victim] = {**info, "policy": []}  # the defense's parameters are the provider's business
        return self._info[victim]

    async def _victim_meta(self, victim: str) -> dict:
        if victim not in self.victims:
            raise WireError(404, f"no victim named {victim!r}; hosted: {', '.join(sorted(self.victims))}")
        return await self._meta(victim)

    async def answer(self, key: str | None, victim: str, images: np.ndarray) -> tuple[int, dict]:
        """The whole predict path for an already-decoded batch: (HTTP status, JSON body), the forward on a victim
        replica (two hops; in-cluster clients take the one-hop ``VictimReplica.answer``)."""
        def forward(x: np.ndarray, stream: str, degraded: bool, with_probs: bool) -> Any:
            return self.victims[victim].predict.remote(x, stream, degraded, with_probs)

        return await self.gate.answer(key, victim, images, lambda: self._victim_meta(victim), forward)

    async def victim_meta(self, victim: str) -> tuple[int, dict]:
        """Public metadata for handle clients: (status, body) as the HTTP route would answer."""
        if victim not in self.victims:
            return 404, {"detail": f"no victim named {victim!r}; hosted: {', '.join(sorted(self.victims))}"}
        return 200, await self._meta(victim)

    async def _read_body(self, request: Request, limit: int) -> bytes:
        """The body in chunks, refused (413) as soon as it outgrows ``limit``: never buffered whole first."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise WireError(413, f"request body exceeds {limit} bytes: split the batch")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/v1/victims", summary="Public metadata of every hosted victim")
    async def list_victims(self) -> list[dict]:
        return [await self._meta(name) for name in sorted(self.victims)]

    @api.get("/v1/victims/{name}", summary="Public metadata of one victim", responses=_responses(404))
    async def victim_info(self, name: str):
        if name not in self.victims:
            return _error(404, f"no victim named {name!r}; hosted: {', '.join(sorted(self.victims))}")
        return await self._meta(name)

    @api.post("/v1/victims/{name}/predict", summary="Query a victim with a batch of images",
              responses=_responses(400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 503))
    async def predict(self, name: str, request: Request):
        key = request.headers.get(API_KEY_HEADER)
        status, detail, _ = await self.gate.authorize(key, name)  # before a byte of the body is read
        if status != 200:
            return _error(status, detail)
        assert key is not None
        if self._per_key.get(key, 0) >= self.spec.max_concurrent_per_key:
            return _error(429, f"{CONCURRENCY_DETAIL} for this key (limit {self.spec.max_concurrent_per_key}): wait "
                               "for an answer before sending more")
        self._per_key[key] = self._per_key.get(key, 0) + 1
        try:
            limit = int(self.spec.max_request_mb * 2**20)
            declared = request.headers.get("content-length")
            try:
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise WireError(413, f"request body of {int(declared)} bytes exceeds {limit}: split the batch")
                self._reading += 1
                try:
                    body = await asyncio.wait_for(self._read_body(request, limit), self.spec.body_timeout_s)
                except TimeoutError:
                    late = f"the request body did not arrive within {self.spec.body_timeout_s:g} s"
                    raise WireError(408, late) from None
                finally:
                    self._reading -= 1
                images = decode_body(body, request.headers.get("content-type"))
            except WireError as e:
                return _error(e.status, e.detail)
            status, content = await self.answer(key, name, images)
            return JSONResponse(status_code=status, content=content)
        finally:
            self._per_key[key] -= 1
            if not self._per_key[key]:
                del self._per_key[key]

    @api.get("/v1/victims/{name}/usage", summary="Queries used and remaining for the calling key",
             responses=_responses(401, 403, 404))
    async def usage(self, name: str, request: Request):
        out = await self.accountant.usage.remote(request.headers.get(API_KEY_HEADER), name)
        status = out.pop("status")
        return JSONResponse(status_code=status, content=out)

    @api.get("/v1/health", summary="Liveness, and the work this ingress replica has in flight")
    async def health(self) -> dict:
        return {"status": "ok", "victims": sorted(self.victims), "time": time.time(), "answering": self.gate.answering,
                "pending_refunds": len(self.gate.refunds), "reading_bodies": self._reading,
                "checking_keys": self.gate.checking}

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)


def check_kits(svc: VictimService, bundle: str) -> None:
    """A victim whose output (or degrade) policy needs defense kits that do not exist for it is refused before
    anything deploys, with the command that builds them (a replica would otherwise fail to start, retried by Serve)."""
    needed = {**parse_policy(svc.output_policy).kits_needed(), **parse_policy(svc.degrade_policy).kits_needed()}
    if not needed:
        return
    victim = load_victim(bundle)
    for kit, policy in needed.items():
        if find_kit(victim, kit) is None:
            raise DmeError(f"victims[{svc.name!r}]: {missing_kit_error(victim, kit, policy)}")


def build_app(args: dict[str, Any]) -> Application:
    """Application builder (``import_path: distributed_me.serving.app:build_app``): validate, then bind."""
    spec = parse_serve_spec(args)
    # resolved where the app is built: every replica, on any node and after any restart, uses this one absolute path
    spec = spec.model_copy(update={"query_log": str(spec.query_log_path())})
    gpus = cluster_has_gpus()
    placed = {"ray_actor_options": {"num_cpus": 0, "resources": dict(spec.resources)}} if spec.resources else {}
    accountant = Accountant.options(**placed).bind(spec.model_dump())
    watchman = (Watchman.options(**placed).bind(spec.model_dump()) if any(v.detectors for v in spec.victims)
                else None)
    victims = {}
    for svc in spec.victims:
        # resolved where the app is built (trains the embedded victim if needed); a replica on a node where that
        # folder does not exist resolves the source itself
        bundle = str(victim_bundle_path(svc.source))
        check_kits(svc, bundle)
        victims[svc.name] = VictimReplica.options(**replica_options(svc, gpus, spec.resources)).bind(
            svc.model_dump(), bundle, spec.query_log, spec.model_dump(), accountant, watchman)
    return Ingress.options(**placed).bind(victims, accountant, spec.model_dump(), watchman)
