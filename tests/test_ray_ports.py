"""Ray's fixed default ports cannot break a private cluster.

``ray.init`` picks free ports for everything but the dashboard agent's HTTP port (52365, not settable through
``ray.init``), and an agent from a cluster that just stopped keeps that port for 1–2 minutes (STACK-NOTES). So the
proof that back-to-back clusters (tests, sweeps, ``dme serve``) never depend on it being free is to take the port
first, then start a cluster the way every dme command does and serve a request through it.
"""

import errno
import socket
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.ray]

AGENT_PORT = 52365

SCRIPT = textwrap.dedent("""
    import time
    from pathlib import Path

    import ray
    from ray import serve

    from distributed_me.serving.runtime import init_ray, shutdown

    init_ray(num_cpus=1)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, x):
            return x + 1

    serve.start(proxy_location="Disabled")
    handle = serve.run(Echo.bind(), name="ports", route_prefix=None)
    print("answer", handle.remote(41).result(timeout_s=60), ray.get(ray.remote(lambda: "task ok").remote()))
    # what the cluster's agent got: it writes the port it serves on, -1 when it could not bind (after its retries)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    deadline = time.monotonic() + 120
    while not (found := list(session.glob("dashboard_agent_listen_port_*"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    print("agent port", found[0].read_text().strip() if found else "never written")
    shutdown()
""")


def test_a_private_cluster_serves_while_rays_default_agent_port_is_taken():
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", AGENT_PORT))
        holder.listen()
        held = "by this test"
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        held = "already (an earlier cluster's agent)"  # the same situation, made by someone else
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    finally:
        holder.close()
    assert proc.returncode == 0, f"port {AGENT_PORT} held {held}:\n{proc.stderr[-3000:]}"
    assert "answer 42 task ok" in proc.stdout
    # not vacuous: the cluster's agent did try the taken port and ran without it. (A port held by another process can
    # be let go while the agent retries, and then taken by it: only a port this test holds must stay refused.)
    (agent,) = [ln.split()[-1] for ln in proc.stdout.splitlines() if ln.startswith("agent port ")]
    assert (agent == "-1") if held == "by this test" else (agent in ("-1", str(AGENT_PORT))), (held, agent)
