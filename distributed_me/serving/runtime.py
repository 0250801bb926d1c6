"""Starting Ray and Serve, and deploying a serve spec: the one place that knows how (``dme serve``, tests, sweeps).

Local clusters started here keep every socket on 127.0.0.1: Ray's node address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes it loopback, see STACK-NOTES), the HTTP proxy (``http_options.host``) and no dashboard unless asked for.
``address`` joins an existing cluster instead (``auto`` = the one ``ray start`` made on this machine).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ..errors import DmeError

log = logging.getLogger(__name__)

DEFAULT_APP = "dme"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

#: the level of Ray's console loggers (Ray, Serve, Tune, Data), WARNING unless ``dme -v``. An environment variable, so
#: that the workers of a private cluster, which inherit the driver's environment, use the same level as the driver
RAY_LOG_LEVEL_ENV = "DME_RAY_LOG_LEVEL"
#: Serve configures its logger itself (its own handler, no propagation, INFO) when ``ray.serve`` is imported, and Ray
#: Data too: their levels are set after that import, not inherited from ``ray``
_RAY_LOGGERS = ("ray", "ray.serve", "ray.tune", "ray.data")


def set_ray_log_level(level: int) -> None:
    """Ray's loggers at ``level`` in this process and, through the environment, in the workers it starts."""
    os.environ[RAY_LOG_LEVEL_ENV] = logging.getLevelName(level)


def ray_log_level() -> int:
    """The level asked for by :func:`set_ray_log_level` (in this process or the driver that started it)."""
    level = logging.getLevelName(os.environ.get(RAY_LOG_LEVEL_ENV, "WARNING").upper())
    return level if isinstance(level, int) else logging.WARNING


def quiet_ray_loggers() -> None:
    """Apply :func:`ray_log_level` to Ray's loggers: Serve's INFO lines ("Started Serve", "Application … is ready",
    "Deleting app", a worker's "Started <…LongPollClient>") and Ray's own stay off the console unless ``-v``. Errors
    and warnings still show; replicas keep logging to their files. Call it after ``ray.serve`` is imported (its import
    resets the Serve logger), in every process that makes Serve calls."""
    import ray.serve  # noqa: F401  (configures Serve's logger; the level set below must come after)

    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(ray_log_level())


def refresh_auth_mode() -> None:
    """Make Ray's token-auth mode in this process what the environment says now (``RAY_AUTH_MODE``).

    Ray reads the mode into a process-wide config once, and a private cluster's ``ray.init()`` turns token auth on
    (in ``os.environ`` too) when the variable is unset. A later session in the same process kept it: a driver that
    had run a private sweep and then joined a cluster started with ``RAY_AUTH_MODE=disabled`` demanded tokens the
    cluster never sends, the cluster's GCS took the driver for dead ("Missing authorization header" in the driver's
    log) and destroyed every actor it created — Tune's trials failed at once with ``SchedulingCancelled``. Called
    before each session starts; a no-op on a Ray without token auth."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")  # the config first: a still-draining gRPC thread may reload the token meanwhile
    AuthenticationTokenLoader.instance().reset_cache()


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Connect to ``address`` or start a private single-node cluster on loopback (no-op when already connected)."""
    import ray

    if ray.is_initialized():
        return
    refresh_auth_mode()
    address = address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit` for the job's driver
    if address:
        ray.init(address=address, logging_level=ray_log_level())
    else:
        # address="local": always a new private cluster, never one a `ray start` left behind on this machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=DEFAULT_HOST,
                 logging_level=ray_log_level())
    quiet_ray_loggers()
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


def _failure_key(app_name: str) -> bytes:
    return f"dme:deploy-failed:{app_name}".encode()


class BackgroundDeploy:
    """:func:`deploy` in a thread, so that the work that does not need the app (a sweep's Tune start, its trials'
    worker start and judge loading) overlaps the replicas' start. Consumers call :func:`wait_until_ready`. A failure
    is kept for :meth:`result` and also published in Ray's KV store, so waiting consumers on any node give up at once
    instead of at their timeout."""

    def __init__(self, args: dict[str, Any], **deploy_kwargs: Any):
        import ray.experimental.internal_kv as kv

        from .app import build_app

        build_app(args)  # validate now, in the caller: a bad spec fails before anything starts
        self.app_name = deploy_kwargs.get("app_name", DEFAULT_APP)
        kv._internal_kv_del(_failure_key(self.app_name))
        self.error: BaseException | None = None
        self.seconds = 0.0

        def run() -> None:
            t0 = time.perf_counter()
            try:
                deploy(args, **deploy_kwargs)
            except BaseException as e:  # noqa: BLE001 - kept and re-raised by result()
                self.error = e
                kv._internal_kv_put(_failure_key(self.app_name), f"{type(e).__name__}: {e}".encode())
            finally:
                self.seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name=f"deploy-{self.app_name}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the deployment to end, well or not; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> None:
        """Wait for the deployment; raise its error if it failed."""
        if not self.wait(timeout):
            raise DmeError(f"the Serve app {self.app_name!r} was not deployed within {timeout} s")
        if self.error is not None:
            raise self.error


def app_status(app_name: str):
    """Serve's status of the app ``app_name`` on the connected cluster, or ``None`` (not deployed, or Serve not
    running or still starting)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.status().applications.get(app_name)
    except RayServeException:
        return None


def wait_until_ready(app_name: str, timeout: float = 600.0, every: float = 0.2) -> float:
    """Block until the app is RUNNING (returns the seconds waited); raise a clear error when its deployment failed,
    or after ``timeout`` seconds."""
    import ray.experimental.internal_kv as kv

    quiet_ray_loggers()  # a trial worker calls this before its first Serve handle
    t0 = time.monotonic()
    while True:
        app = app_status(app_name)
        status = str(getattr(app, "status", "")) if app is not None else ""
        if status.endswith("RUNNING"):
            return time.monotonic() - t0
        failed = kv._internal_kv_get(_failure_key(app_name))
        if failed is not None or status.endswith("DEPLOY_FAILED"):
            why = failed.decode() if failed else getattr(app, "message", "")
            raise DmeError(f"the Serve app {app_name!r} failed to deploy: {why}")
        if time.monotonic() - t0 > timeout:
            raise DmeError(f"the Serve app {app_name!r} was not running after {timeout:.0f} s (status "
                           f"{status or 'not deployed'}); see the Serve logs of the cluster")
        time.sleep(every)


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
