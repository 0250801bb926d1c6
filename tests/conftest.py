"""Shared fixtures. Every test runs offline, with its own DME_HOME and MLflow store under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import free_port, wait_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep caches and MLflow stores out of the user's home; the embedded victim is shared by the whole session."""
    shared = tmp_path_factory.getbasetemp() / "dme-home"
    monkeypatch.setenv("DME_HOME", str(shared))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}")


class LinearVictim:
    """A real (tiny) classifier with the victim interface, for oracle and defense tests."""

    def __init__(self, num_classes: int = 4, shape: tuple[int, int, int] = (1, 4, 4), seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.class_names = [f"c{i}" for i in range(num_classes)]
        self.input_shape = shape
        self.w = torch.randn(int(np.prod(shape)), num_classes, generator=g) * 3
        self.calls = 0

    def predict_probs(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.softmax(x.flatten(1) @ self.w, dim=1)

    def predict_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_probs(x).argmax(1)


@pytest.fixture
def linear_victim() -> LinearVictim:
    return LinearVictim()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (one per session: tests tell their runs apart by sweep name)."""
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=open(d / "server.log", "w"))
    uri = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(f"{uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None and pytest.fail((d / "server.log").read_text()[-3000:])

    wait_for(healthy, 120, "mlflow server")
    yield uri
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def sweep_env(mlflow_server, tmp_path, monkeypatch):
    """Sweeps record to the session's mlflow server and keep their state in this test's folder."""
    home = Path(os.environ["DME_HOME"])  # the session's home: the embedded victim is trained once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DME_SWEEP_DIR", str(tmp_path / "sweeps"))
    return {"home": home, "uri": mlflow_server, "dir": tmp_path}


@pytest.fixture
def one_torch_thread():
    """Small nets on a shared 2-core machine: one intra-op thread avoids oversubscription (measured 10x slower under
    load); restored after the test. Modules use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
