"""Small helpers shared by the integration tests (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds saying what."""
    t0 = time.monotonic()
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port``, from the kernel's tables (Linux ``/proc/net``):
    ``{"127.0.0.1"}`` for a loopback-only server, ``{"0.0.0.0"}`` for one on every interface."""
    import ipaddress
    from pathlib import Path

    found: set[str] = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words) if width == 8 else ipaddress.IPv6Address(words)
            found.add(str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip))
    return found


@contextmanager
def serve_env(base: Path) -> Iterator[None]:
    """``DME_HOME`` and ``MLFLOW_TRACKING_URI`` under ``base`` while a module's own Ray cluster and Serve app run (its
    workers inherit them: the session's embedded victim is trained once), then the environment as it was."""
    saved = {k: os.environ.get(k) for k in ("DME_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["DME_HOME"] = str(base / "dme-home")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



def fixed_rates(request_s: float = 0.0):
    """Cost-model rates with hand-set figures and no measurement: 10 ms per step, 1 ms per trained and 0.5 ms per
    inferred sample, 0.1 s to build, for every net; 1 GFLOP/s of array arithmetic."""
    from distributed_me.cost.rates import Device, NetRate, Rates

    class FixedRates(Rates):
        def __init__(self) -> None:
            super().__init__(Device("test", "test device"), calibrate=False, request_s=request_s)
            self._cache = {"matmul": 1e9, "nets": {}}

        def net(self, net) -> NetRate:
            return NetRate(1e6, 0.010, 0.001, 0.010, 0.0005, 0.1)

    return FixedRates()


def jba_like(seeds, rounds: int, seed: int = 0, step: float = 0.1) -> list:
    """Papernot's Jacobian augmentation as the API sees it: every round steps all previous queries by ``step``
    (JBA's λ = 0.1) along a sign vector, doubling the set; one request per round."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, current = [seeds], seeds
    for _ in range(rounds):
        stepped = np.clip(current + step * np.sign(rng.normal(size=current.shape)), 0, 1).astype(np.float32)
        out.append(stepped)
        current = np.concatenate([current, stepped])
    return out
