"""Shared fixtures. Every test runs offline, with its own DME_HOME and MLflow store under tmp_path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

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
