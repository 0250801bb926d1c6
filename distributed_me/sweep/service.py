"""The victims a sweep queries, as a Serve application: its own, or a long-lived service that sweeps join.

By default a sweep deploys its own app (``sweep-NAME``) and deletes it at the end. With
``resources.keep_victims`` the app is a *service*: named by a hash of everything it serves (each victim's source and
bundle file, output policies, detectors, replica resources), left running when the sweep ends, and joined by the
next sweep on the same cluster that needs the very same service — that sweep skips Serve's start, which on 2 cores
is most of the harness's fixed cost (``dme bench sweep``: ~10 s of a ~60 s, 8-trial sweep). A victim retrained in
place changes its bundle's size or modification time, hence the hash: a stale service is never joined.

Trials register fresh keys with the service's accounting replica, so budgets never mix between sweeps; the query
log of a service lives under ``DME_HOME/serving/<app>``, absolute, whatever the working directory.
``dme services --address auto`` lists the services of a cluster, ``--stop NAME`` (or ``--stop-all``) deletes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DmeError
from ..tracking import dme_home
from .spec import SweepSpec

log = logging.getLogger(__name__)


def serve_args(spec: SweepSpec, query_log: Path) -> dict[str, Any]:
    """The Serve spec of a sweep's victims: one deployment per victim × output policy."""
    r = spec.resources
    detectors = [{"detector": d, "action": "flag"} for d in spec.detectors]
    sources = {v.name: v.source for v in spec.victims}
    victims = [{"name": spec.deployment_name(v, p), "source": sources[v], "output_policy": p,
                "num_replicas": r.victim_replicas, "num_cpus": r.victim_cpus, "max_batch_size": 256,
                "max_ongoing_requests": 64, "detectors": detectors} for v, p in spec.pairs()]
    return {"victims": victims, "clients": [], "query_log": str(query_log), "resources": r.serve_resources}


@dataclass(frozen=True)
class VictimApp:
    """Where a sweep's trials find their victims."""

    name: str
    args: dict[str, Any]
    route_prefix: str
    #: a long-lived service (``keep_victims``): joined if running, never deleted by the sweep
    shared: bool


def _bundle_stamp(path: str) -> list[Any]:
    p = Path(path)
    if not p.exists():
        return [path]
    st = p.stat()
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def victim_app(spec: SweepSpec, bundles: dict[str, str], folder: Path) -> VictimApp:
    """The sweep's own app (``sweep-NAME``, query log in the sweep's folder), or the service ``victims-HASH``."""
    if not spec.resources.keep_victims:
        return VictimApp(f"sweep-{spec.name}", serve_args(spec, folder / "querylog"), f"/sweeps/{spec.name}", False)
    args = serve_args(spec, Path("-"))
    served = {"victims": args["victims"], "resources": args["resources"],
              "bundles": {name: _bundle_stamp(b) for name, b in sorted(bundles.items())}}
    digest = hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:12]
    name = f"victims-{digest}"
    args["query_log"] = str(dme_home() / "serving" / name / "querylog")
    return VictimApp(name, args, f"/victims/{digest}", True)


def running(app: str) -> bool:
    """Whether the Serve app ``app`` is up and healthy on the connected cluster (Serve may not be running at all)."""
    from ..serving.runtime import app_status

    status = app_status(app)
    return status is not None and str(status.status).endswith("RUNNING")


def services() -> list[dict[str, Any]]:
    """The victim services on the connected cluster: name, status, deployments (victim × policy) and query log."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        apps = serve.status().applications
    except RayServeException:  # Serve is not running on this cluster: no service either
        return []
    return [{"name": name, "status": str(app.status).rsplit(".", 1)[-1],
             "victims": sorted(d.removeprefix("victim-") for d in app.deployments if d.startswith("victim-")),
             "query_log": str(dme_home() / "serving" / name / "querylog")}
            for name, app in sorted(apps.items()) if name.startswith("victims-")]


def stop_service(name: str) -> None:
    """Compact a service's query log and delete its app (waits until it is gone)."""
    from ray import serve

    from ..serving.runtime import flush_query_log

    known = [s["name"] for s in services()]
    if name not in known:
        raise DmeError(f"no victim service named {name!r} on this cluster; running: {', '.join(known) or 'none'}")
    flush_query_log(name)
    serve.delete(name)


def start(app: VictimApp, http: bool):
    """Deploy ``app`` in the background, or join it when it is a service that is already running (``None``)."""
    from ..serving.runtime import BackgroundDeploy

    if app.shared and running(app.name):
        log.info("joining the running victim service %s (query log %s)", app.name, app.args["query_log"])
        return None
    return BackgroundDeploy(app.args, app_name=app.name, route_prefix=app.route_prefix, http=http,
                            port=int(os.environ.get("DME_SERVE_PORT", "8000")))


def stop(app: VictimApp) -> None:
    """At the sweep's end: compact the query log; delete the app unless it is a service that outlives sweeps."""
    from ray import serve

    from ..serving.runtime import flush_query_log

    flush_query_log(app.name)
    if app.shared:
        log.info("leaving the victim service %s running for the next sweep", app.name)
        return
    try:  # not waited for: the replicas' shutdown is Serve's business, and no answer is pending
        serve.delete(app.name, _blocking=False)
    except Exception as e:  # the cluster may be gone
        log.warning("could not delete the sweep's Serve app: %s", e)
