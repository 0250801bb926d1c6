"""Throughput on the device at hand: a short, cached micro-benchmark per architecture × input size × device.

:class:`Rates` prices a :class:`~distributed_me.cost.work.Work` item in seconds. For a net it needs four numbers,
per training step and per sample (``T(b) = step + b · sample``), for training and for inference, and the time to build
it; they are measured by the project's own code paths (``train.fit`` with augmentation and an Adam step,
``train.predict_probs``, ``models.create_model``) on random images at two batch sizes, after a warm-up step, with the
thread count the work will run with (a sweep trial runs with ``cpus_per_trial`` threads). Each measurement is sized
from the net's FLOPs (counted by ``torch.utils.flop_counter`` on the meta device: no compute) to take a few seconds at
most, and cached in ``$DME_HOME/cost/rates.json`` under the device's key, so a machine measures each net once.

Devices the machine does not have (``--gpu a100``: the plan of a ``full`` preset for a GPU cluster, from a laptop) are
priced from FLOPs instead: a training step is 3× the forward FLOPs (forward, backward w.r.t. activations and weights)
at :data:`PROFILE_UTILIZATION` of the card's fp32 peak (:data:`GPU_PEAK_FLOPS`, the vendors' data sheets) plus
:data:`PROFILE_STEP_S` per step. That utilization is an assumption (mid-size CNNs in fp32 without AMP typically reach
25–50 % of peak), stated here and in every plan that uses it; recorded runs on the real card correct it
(:mod:`distributed_me.cost.history`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..device import get_device
from ..errors import DmeError
from .work import Net, Work

log = logging.getLogger(__name__)

#: fp32 peak FLOP/s of GPUs a plan may target without having them (vendor data sheets; dense, no sparsity, no TF32)
GPU_PEAK_FLOPS: dict[str, float] = {"t4": 8.1e12, "v100": 15.7e12, "a10g": 31.2e12, "l4": 30.3e12, "a100": 19.5e12,
                                    "h100": 67.0e12, "rtx4090": 82.6e12}
#: the fraction of a profile GPU's fp32 peak that training and inference are assumed to reach (see module docstring)
PROFILE_UTILIZATION = 0.35
#: per-step overhead on a profile GPU (kernel launches, the optimizer step, host-side augmentation of a batch)
PROFILE_STEP_S = 0.004
#: the API's overhead per request of queries, when nothing better is known: a Serve handle call (routing, batching
#: wait, accounting reserve and commit) measured at 10–30 ms on the project's 2-core machine; 0 for an in-process
#: oracle. Corrected by recorded runs like everything else.
SERVE_REQUEST_S = 0.02
#: how long one net's calibration may take, roughly (it is sized from FLOPs to stay near this)
CALIBRATION_TARGET_S = 4.0


@dataclass(frozen=True)
class Device:
    """Where work runs: a measured device (``cpu`` with N threads, or a CUDA card) or a GPU profile from FLOPs."""

    key: str
    label: str
    threads: int = 1
    profile: str | None = None  # a key of GPU_PEAK_FLOPS: priced from FLOPs, never measured

    @property
    def gpu(self) -> bool:
        return self.profile is not None or self.key.startswith("cuda")

    @classmethod
    def here(cls, threads: int | None = None) -> "Device":
        """The device this process computes on (:func:`~distributed_me.device.get_device`), with ``threads`` torch
        threads (default: torch's current setting)."""
        dev = get_device()
        threads = int(threads or torch.get_num_threads())
        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev).replace(" ", "_")
            return cls(f"cuda-{name}", f"{name} (measured)", threads)
        cpu = (platform.processor() or platform.machine()).replace(" ", "_")
        return cls(f"cpu-{cpu}-{threads}t", f"CPU, {threads} thread{'s' if threads > 1 else ''} (measured)", threads)

    @classmethod
    def gpu_profile(cls, name: str) -> "Device":
        key = name.lower()
        if key not in GPU_PEAK_FLOPS:
            raise DmeError(f"unknown GPU {name!r} for a projection; known: {', '.join(GPU_PEAK_FLOPS)}")
        return cls(f"gpu-{key}", f"{key.upper()} ({GPU_PEAK_FLOPS[key] / 1e12:.1f} TFLOP/s fp32 at "
                   f"{PROFILE_UTILIZATION:.0%} utilization, assumed)", 1, key)


@dataclass
class NetRate:
    """Seconds per step and per sample for training and inference, build seconds, forward FLOPs per sample."""

    flops: float
    train_step_s: float
    train_sample_s: float
    infer_step_s: float
    infer_sample_s: float
    build_s: float
    measured: bool = True


def forward_flops(net: Net) -> float:
    """FLOPs of one forward pass of one image (``torch.utils.flop_counter`` on the meta device: nothing computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import create_model

    with torch.device("meta"):  # the shape check too: a net that cannot take the input is the user's error, named
        model = create_model(net.arch, net.num_classes, in_chans=net.in_chans, img_size=net.img_size)
        x = torch.zeros(1, net.in_chans, net.img_size, net.img_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return float(max(counter.get_total_flops(), 1))


def _matmul_flops_per_s() -> float:
    """float64 matrix products (what k-center and the Gaussian scores run on) per second, best of 3."""
    a, b = np.random.default_rng(0).standard_normal((2, 512, 512))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 512**3 / max(best, 1e-9)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _line(t1: float, b1: int, t2: float, b2: int) -> tuple[float, float]:
    """(per step, per sample) through two timings of one step at batch sizes b1 < b2; never negative."""
    per_sample = max((t2 - t1) / (b2 - b1), t2 / b2 * 0.05)
    return max(t1 - b1 * per_sample, 0.0), per_sample


def measure_net(net: Net, flops_per_s_guess: float) -> NetRate:
    """Calibrate one net on this process's device (see the module docstring): a few seconds at most."""
    from ..models import create_model
    from ..train import TrainConfig, fit, predict_probs

    flops = forward_flops(net)
    t0 = time.perf_counter()
    model = create_model(net.arch, net.num_classes, in_chans=net.in_chans, img_size=net.img_size)
    build_s = time.perf_counter() - t0
    # images the calibration can afford: forward+backward ≈ 3× forward FLOPs, the whole run near the target
    affordable = int(CALIBRATION_TARGET_S * flops_per_s_guess / (3 * flops))
    b2 = int(min(64, max(4, affordable // 4)))
    b1 = max(2, b2 // 4)
    gen = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, net.in_chans, net.img_size, net.img_size, generator=gen)
        return x, torch.softmax(torch.randn(n, net.num_classes, generator=gen), 1)

    def train_step(b: int) -> float:
        x, y = data(b)
        cfg = TrainConfig(epochs=1, batch_size=b, optimizer="adam", augment=True, cosine=True)
        return _timed(lambda: fit(model, x, y, cfg))

    reps = 2 if affordable >= 40 else 1
    train_step(b1)  # warm-up: allocator, kernels, lazy init
    t1 = min(train_step(b1) for _ in range(reps))
    t2 = min(train_step(b2) for _ in range(reps))
    train = _line(t1, b1, t2, b2)
    i1, i2 = 2 * b1, 4 * b2

    def infer_step(b: int) -> float:
        x, _ = data(b)
        return _timed(lambda: predict_probs(model, x, batch_size=b))

    infer_step(i1)
    u1 = min(infer_step(i1) for _ in range(reps))
    u2 = min(infer_step(i2) for _ in range(reps))
    infer = _line(u1, i1, u2, i2)
    return NetRate(flops, train[0], train[1], infer[0], infer[1], build_s)


def profile_net(net: Net, peak: float) -> NetRate:
    """A net on a GPU the machine does not have: FLOPs at the assumed utilization of the card's peak."""
    flops = forward_flops(net)
    rate = peak * PROFILE_UTILIZATION
    return NetRate(flops, PROFILE_STEP_S, 3 * flops / rate, PROFILE_STEP_S, flops / rate, 0.5, measured=False)


def rates_file() -> Path:
    from ..tracking import dme_home

    return dme_home() / "cost" / "rates.json"


class Rates:
    """Prices work on one :class:`Device`. Measured figures are cached per device key in :func:`rates_file`
    (``calibrate=False`` never measures: an uncached net is then priced from FLOPs at the cached matmul rate, e.g.
    inside a trial that must not spend its time on a benchmark)."""

    def __init__(self, device: Device | None = None, *, path: Path | None = None, calibrate: bool = True,
                 request_s: float = 0.0, share: float = 1.0) -> None:
        self.device = device or Device.here()
        self.share = share  # the fraction of the device one unit of work gets (a trial on half a GPU: 0.5)
        self.path = path or rates_file()
        self.calibrate = calibrate and self.device.profile is None
        self.request_s = request_s
        self._cache = self._read()
        self._derived: dict[str, NetRate] = {}  # figures from FLOPs (never measured): kept for this object only
        self.measured: list[str] = []  # nets measured by this object (a plan says so)

    def shared(self, share: float, request_s: float | None = None) -> "Rates":
        """The same figures (one cache, one list of measured nets) for work that gets ``share`` of the device, e.g.
        a trial on half a GPU; ``request_s`` its API overhead if it differs."""
        other = copy.copy(self)
        other.share = share
        other.request_s = self.request_s if request_s is None else request_s
        return other

    @property
    def key(self) -> str:
        """The device key and the calibration's id (``cpu-x86_64-2t@3f2a…``): what recorded runs are tagged with, so
        that corrections are learned only against the figures they corrected (a re-measured device starts afresh)."""
        if self.device.profile is not None:
            return self.device.key
        if "id" not in self._cache:
            stored = self._read().get("id")  # another process (or object) may have given the figures an id
            if stored is None:
                import uuid

                stored = uuid.uuid4().hex[:8]
            self._cache["id"] = stored
            self._write()
        return f"{self.device.key}@{self._cache['id']}"

    # ------------------------------------------------------------------ cache
    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()).get(self.device.key, {})
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                doc = json.loads(self.path.read_text())
            except (OSError, ValueError):
                doc = {}
            doc[self.device.key] = {**doc.get(self.device.key, {}), **self._cache}
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home: calibrate again next time, never fail the work for it
            log.warning("could not cache throughput figures in %s: %s", self.path, e)

    @property
    def matmul_flops_per_s(self) -> float:
        if self.device.profile is not None:
            return GPU_PEAK_FLOPS[self.device.profile] * PROFILE_UTILIZATION
        if "matmul" not in self._cache:
            with _threads(self.device.threads):
                self._cache["matmul"] = _matmul_flops_per_s()
            self._write()
        return float(self._cache["matmul"])

    def net(self, net: Net) -> NetRate:
        key = f"{net.arch}|{net.img_size}|{net.in_chans}|{net.num_classes}"
        nets = self._cache.setdefault("nets", {})
        if key in self._derived:
            return self._derived[key]
        if key not in nets:
            if self.device.profile is not None:
                self._derived[key] = profile_net(net, GPU_PEAK_FLOPS[self.device.profile])
                return self._derived[key]
            guess = self.matmul_flops_per_s * 0.5
            if not self.calibrate:
                flops = forward_flops(net)
                self._derived[key] = NetRate(flops, 0.0, 3 * flops / guess, 0.0, flops / guess, 0.2, measured=False)
                return self._derived[key]
            log.info("measuring %s on %s (once; cached in %s)", net, self.device.label, self.path)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
            if load > 0.5 * (os.cpu_count() or 1):  # other work shares the cores: the figures come out too slow
                log.warning("measuring %s while the machine is busy (load %.1f on %d CPUs): projections on %s may be "
                            "pessimistic; delete %s to measure again on a quiet machine", net, load,
                            os.cpu_count() or 1, self.device.label, self.path)
            with _threads(self.device.threads), torch.random.fork_rng():
                nets[key] = {**asdict(measure_net(net, guess)), "load": load}
            self.measured.append(str(net))
            self._write()
        return NetRate(**{k: v for k, v in nets[key].items() if k != "load"})

    # ------------------------------------------------------------------ pricing
    def seconds(self, w: Work) -> float:
        if w.kind == "seconds":
            return w.seconds
        if w.kind == "flops":
            return w.flops / self.matmul_flops_per_s
        if w.kind == "query":
            requests = -(-w.samples // max(1, w.batch_size))
            victim = 0.0
            if w.net is not None and w.samples:
                r = self.net(w.net)
                victim = requests * r.infer_step_s + w.samples * r.infer_sample_s
            return victim + requests * self.request_s
        assert w.net is not None, f"{w.kind} work needs a net"
        r = self.net(w.net)
        if w.kind == "build":
            return r.build_s
        if w.kind == "infer":
            return (w.steps * r.infer_step_s + w.passes * w.samples * r.infer_sample_s) / self.share
        # train, grad: a forward and a backward per sample (grad has no optimizer step, priced the same: it is small)
        return (w.steps * r.train_step_s + w.passes * w.samples * r.train_sample_s) / self.share
