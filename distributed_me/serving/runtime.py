"""Starting Ray and Serve, and deploying a serve spec: the one place that knows how (``dme serve``, tests, sweeps).

Local clusters started here keep every socket on 127.0.0.1: Ray's node address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes it loopback, see STACK-NOTES), the HTTP proxy (``http_options.host``) and no dashboard unless asked for.
``address`` joins an existing cluster instead (``auto`` = the one ``ray start`` made on this machine).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_APP = "dme"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connect to ``address`` or start a private single-node cluster on loopback (no-op when already connected)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit` for the job's driver
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # address="local": always a new private cluster, never one a `ray start` left behind on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=DEFAULT_HOST,
                 logging_level=logging.WARNING)
    log.info("ray cluster resources: %s", ray.cluster_resources())


def deploy(args: dict[str, Any], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, app_name: str = DEFAULT_APP,
           route_prefix: str = "/", http: bool = True):
    """Start Serve (if it is not running yet) and deploy the app; return its ingress handle.

    ``http=False`` starts Serve without its HTTP proxy (a sweep's private cluster reaches victims by handles only,
    and must not fight another service for the port). Returns once every deployment is healthy; raises
    :class:`~distributed_me.errors.DmeError` for a bad spec before anything is deployed.
    """
    from ray import serve

    from .app import build_app

    app = build_app(args)  # validates the spec first
    if http:
        serve.start(http_options={"host": host, "port": port})
    else:
        serve.start(proxy_location="Disabled")
    return serve.run(app, name=app_name, route_prefix=route_prefix)


def flush_query_log(app_name: str = DEFAULT_APP) -> None:
    """Compact the application's query-log journal into Parquet (nothing is lost without it; this tidies up)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.get_deployment_handle("Accountant", app_name).flush.remote().result(timeout_s=30)
    except Exception as e:  # the app may be gone already
        log.warning("could not flush the query log of %s: %s", app_name, e)


def shutdown() -> None:
    """Stop Serve and disconnect from Ray (the private cluster stops with it)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
