"""The frameworks' floor under ``dme bench sweep``'s (c): what Ray Tune and Ray Serve cost on this machine with none of
distributed_me's code in them, so the harness overhead can be read against what is physically left to remove.

The floor does only what any torch sweep on Tune + Serve must do: a Serve application of as many replicas as the
sweep's (each replica imports torch, as a model-serving replica must), deployed in the background while Tune runs the
same number of trials, one at a time on a reused worker, each importing torch and returning at once. Its wall time
is the frameworks' start-up with nothing to hide it behind. It is not a strict bound on (c) - (a): in a real sweep
part of the deployment overlaps trial work on a free core. Tune alone, though, and the wait for the first victim
replica (a trial cannot query before it), are paid by any sweep that starts its own Serve app.

:func:`serving_floor` does the same for ``dme bench serve``: Serve's two hops (client → ingress → replica) with no
work at either end, by handle and over HTTP, against which the victim API's fixed per-request overhead is read.

This module imports torch only inside the replicas and the trainable (their processes pay for it, as ours do), and
nothing else of the package, so the workers it starts pay no more than the frameworks' share.
"""

from __future__ import annotations

import tempfile
import threading
import time

from ray import serve, tune


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _Idle:
    """A replica that loads torch and answers nothing: the start-up every victim, ledger and ingress replica pays."""

    def __init__(self) -> None:
        import torch  # noqa: F401  - the point: a model-serving replica's process imports it

    def __call__(self) -> int:
        return 0


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _Front:
    """The ingress's place in the floor's application: it holds handles to the others, as ours does."""

    def __init__(self, *handles) -> None:
        import torch  # noqa: F401

        self.handles = handles

    def __call__(self) -> int:
        return len(self.handles)


def _noop_trial(config: dict) -> None:
    import torch  # noqa: F401  - a trial that trains a model imports it in its worker

    tune.report({"done": 1})


def framework_floor(trials: int, replicas: int, name: str = "dme-floor") -> dict[str, float]:
    """Seconds for: the Serve application alone (``serve_seconds``), Tune's ``trials`` no-op trials alone
    (``tune_seconds``), and both at once as the sweep runs them (``floor_seconds``: the deployment in a background
    thread, the Tune run in the foreground). Needs a running Ray; leaves no application behind."""
    app = _Front.options(name=f"{name}-front").bind(
        *[_Idle.options(name=f"{name}-idle{i}").bind() for i in range(max(0, replicas - 1))])

    def deploy() -> float:
        t0 = time.perf_counter()
        serve.run(app, name=name, route_prefix=None)
        return time.perf_counter() - t0

    def run_tune(storage: str) -> float:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(_noop_trial, {"cpu": 1}),
            param_space={"i": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
        grid = tuner.fit()
        if grid.num_errors:
            raise RuntimeError(f"the floor's no-op trials failed: {grid.errors}")
        return time.perf_counter() - t0

    serve.start(proxy_location="Disabled")  # as a sweep's Serve: trials reach victims by handle, no HTTP proxy
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["serve_seconds"] = deploy()
        serve.delete(name)
        out["tune_seconds"] = run_tune(f"{tmp}/alone")
        failed: list[BaseException] = []

        def deploy_in_background() -> None:
            try:
                deploy()
            except BaseException as e:  # noqa: BLE001 - re-raised below: a failed deployment is no floor
                failed.append(e)

        t0 = time.perf_counter()
        thread = threading.Thread(target=deploy_in_background, daemon=True)
        thread.start()
        run_tune(f"{tmp}/both")
        thread.join()
        out["floor_seconds"] = time.perf_counter() - t0
        if failed:
            raise failed[0]
        serve.delete(name)
    return out


# ---------------------------------------------------------------------------------------------------- serving floor
@serve.deployment(ray_actor_options={"num_cpus": 0})
class _Echo:
    """A victim replica that does no work: an answer of the right size (zeros), no forward, no accounting."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, x):
        import numpy as np

        return np.zeros((len(x), self.num_classes), dtype=np.float32)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class _Hop:
    """An ingress that forwards to :class:`_Echo`: Serve's two hops (client → ingress → replica) and nothing of ours.
    By handle: ``answer(x)``; over HTTP: a POST of an ``.npy`` body, answered with the probabilities as JSON."""

    def __init__(self, echo) -> None:
        self.echo = echo

    async def answer(self, x):
        return await self.echo.remote(x)

    async def __call__(self, request):
        import io

        import numpy as np

        x = np.load(io.BytesIO(await request.body()), allow_pickle=False)
        return {"probs": (await self.echo.remote(x)).tolist()}


def serving_floor(x, num_classes: int, url: str | None, n: int, name: str = "dme-serve-floor") -> dict[str, float]:
    """Milliseconds per sequential request of ``x`` through Serve's two hops with no work at either (handle, and HTTP
    at ``url`` + ``/NAME`` when the app's proxy runs): the least per-request overhead of an ingress + replica design
    on this machine; and by handle straight to the no-op replica (``handle_one_hop``), the least of any Serve handle
    call carrying ``x``. Deploys on the running Serve instance and deletes the app after."""
    import io

    import numpy as np

    handle = serve.run(_Hop.options(name=f"{name}-hop").bind(_Echo.options(name=f"{name}-echo").bind(num_classes)),
                       name=name, route_prefix=f"/{name}")
    echo = serve.get_deployment_handle(f"{name}-echo", name)
    steps = {"handle": lambda: handle.answer.remote(x).result(), "handle_one_hop": lambda: echo.remote(x).result()}
    client = None
    if url is not None:
        import httpx

        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        body, client = buf.getvalue(), httpx.Client(timeout=60)
        steps["http"] = lambda: client.post(f"{url}/{name}", content=body).raise_for_status()
    try:
        total = dict.fromkeys(steps, 0.0)
        for i in range(n + 1):  # round 0 warms up; round-robin so drift hits both alike
            for k, fn in steps.items():
                t = time.perf_counter()
                fn()
                total[k] += (time.perf_counter() - t) * (i > 0)
        return {k: 1000 * v / n for k, v in total.items()}
    finally:
        if client is not None:
            client.close()
        serve.delete(name)
