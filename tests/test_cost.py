"""The cost model: work as sizes, priced by throughput measured here, checked against what the work really takes.

How close a projection comes to the clock is a measurement, not an assertion: `dme bench cost` reports actual /
projected per strategy and phase (README, "Measured on this project's machine"); no test here asserts a duration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import fixed_rates
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distributed_me.attacks import ATTACKS, QueryStrategy
from distributed_me.cost import work
from distributed_me.cost.guard import CostLimitError, check_limit, limit_seconds
from distributed_me.cost.plan import cost_job, extraction_work, project
from distributed_me.cost.rates import Device, Rates, forward_flops
from distributed_me.cost.work import CostJob, Net, Projection, Work
from distributed_me.data import ArrayPool, load_pool
from distributed_me.errors import DmeError
from distributed_me.extraction import AttackSpec
from distributed_me.runner import attack_in_process
from distributed_me.victims import load_victim


@pytest.fixture(scope="module")
def victim():
    return load_victim(None)




def test_pricing_of_each_kind_by_hand():
    r = fixed_rates(request_s=0.02)
    net = Net("cnn32", 16, 1, 10)
    # 3 epochs of 100 samples in batches of 64: 6 steps x 10 ms + 300 samples x 1 ms
    assert r.seconds(work.train(net, 100, 3, 64)) == pytest.approx(0.06 + 0.3)
    # 2 forward passes of 1000 samples in batches of 512: 4 steps x 10 ms + 2000 x 0.5 ms
    assert r.seconds(work.infer(net, 1000, passes=2, batch_size=512)) == pytest.approx(0.04 + 1.0)
    # 300 queries in requests of 256: 2 requests (victim: 2 steps + 300 samples) + 2 x 20 ms API overhead
    assert r.seconds(work.query(net, 300, 256)) == pytest.approx(0.02 + 0.15 + 0.04)
    assert r.seconds(work.flops(2e9)) == pytest.approx(2.0)
    assert r.seconds(work.build(net)) == pytest.approx(0.1)
    assert r.seconds(work.seconds(7, "setup", "x")) == 7


class _DevicesSeen(TorchDispatchMode):
    """Records every aten op run while active, with the devices of the tensors it read and wrote."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.name(), [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]))
        return out


def test_flops_are_counted_not_computed():
    small, large = Net("cnn32", 16, 1, 10), Net("cnn32", 32, 1, 10)
    # convolutions scale with the pixel count: 4x the pixels, between 3x and 4.1x the FLOPs (the head is fixed)
    assert 3.0 < forward_flops(large) / forward_flops(small) < 4.1
    # ViT-L/16 at 224 (61.6 GMACs): built and run on the meta device, so no weight is initialized and no product
    # computed. Proof without a stopwatch: every op run inside goes through this mode, and none touched real memory
    # beyond timm's 24 drop-path rates (a CPU linspace of 24 read out as floats as the model is built)
    with _DevicesSeen() as seen:
        flops = forward_flops(Net("vit_large_patch16", 224, 3, 1000))
    real = [(op, t.device.type, tuple(t.shape)) for op, ts in seen.ops for t in ts if t.device.type != "meta"]
    assert max((math.prod(shape) for *_, shape in real), default=0) <= 24, real[:10]
    on_meta = {op for op, ts in seen.ops if ts and all(t.device.type == "meta" for t in ts)}
    assert {"aten::uniform_", "aten::addmm", "aten::bmm", "aten::convolution"} <= on_meta  # the mode saw the work
    assert flops == pytest.approx(1.231e11, rel=0.02)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_strategy_prices_exactly_its_budget(name):
    """Registry-wide: a strategy's ``cost`` sends exactly the budget through the API, trains its piracy model on at
    most what it queried, and every item is well formed; ``prepare_cost`` is work of the prepare phase."""
    rng = np.random.default_rng(0)
    pool = ArrayPool(rng.integers(0, 256, (300, 16, 16, 1), dtype=np.uint8), name="noise",
                     labels=rng.integers(0, 5, 300))
    strategy = QueryStrategy.create(name, ATTACKS.get(name).smoke_options)
    job = CostJob(budget=90, pool_size=len(pool), piracy=Net("tiny_cnn", 16, 1, 10), epochs=3,
                  victim=Net("tiny_cnn", 16, 1, 10), pool=pool)
    items = strategy.cost(job)
    assert sum(w.samples for w in items if w.kind == "query") == 90
    final = [w for w in items if w.kind == "train" and w.what == "piracy model"]
    if ATTACKS.get(name).learning_test_budget is not None:  # one final training on every answer
        assert len(final) == 1 and final[0].samples == 90 and final[0].passes == 3
    else:  # a student trained as the queries stream in (data-free): on the answers it trains on (DFME's and MAZE's
        # gradient-estimate probes are paid but are not student batches), never more than were paid per model
        assert final and 0 < max(w.samples for w in final) <= 90
    assert all(w.samples <= 90 for w in items if w.kind == "train" and w.phase == "train")
    assert all(w.samples >= 0 and w.passes >= 0 and w.flops >= 0 and w.seconds >= 0 for w in items)
    assert all(w.phase == "prepare" for w in strategy.prepare_cost(pool))
    assert fixed_rates().seconds(items[0]) >= 0


def test_activethief_rounds_are_priced_as_it_runs_them():
    """500 seeds + rounds of 500 to a budget of 2000: 3 interim substitutes (500, 1000, 1500 samples, each
    ``epochs_per_round``) and 3 acquisitions over the pool, then the final model on 2000 for ``epochs``."""
    s = QueryStrategy.create("activethief-kcenter", {"n_seed": 500, "per_round": 500, "epochs_per_round": 2})
    job = CostJob(budget=2000, pool_size=10_000, piracy=Net("cnn32", 32, 3, 10), epochs=7)
    items = s.cost(job)
    trains = [(w.samples, w.passes) for w in items if w.kind == "train"]
    assert trains == [(500, 2), (1000, 2), (1500, 2), (2000, 7)]
    assert [w.samples for w in items if w.kind == "infer"] == [10_000] * 3
    # k-center: distances to the queried set grow with it (500, 1000, 1500 centers) plus 500 picks each
    kc = [w.flops for w in items if w.kind == "flops"]
    assert kc == [2.0 * 10_000 * q * 10 + 4.0 * 10_000 * 500 * 10 for q in (500, 1000, 1500)]


def test_swifttheft_prices_its_reference_set_unless_prepared(tmp_path):
    rng = np.random.default_rng(0)
    pool = ArrayPool(rng.integers(0, 256, (400, 16, 16, 3), dtype=np.uint8), name="noise",
                     labels=rng.integers(0, 5, 400))
    s = QueryStrategy.create("swifttheft", {"n_reference": 4, "reference_arch": "tiny_cnn", "reference_epochs": 3})
    prep = s.prepare_cost(pool)
    assert [(w.kind, w.samples, w.passes) for w in prep] == [("train", 100, 3)] * 4 + [("infer", 400, 4)]
    job = CostJob(budget=50, pool_size=400, piracy=Net("tiny_cnn", 16, 3, 10), epochs=2, pool=pool)
    spec = AttackSpec(strategy="swifttheft", budget=50, arch="tiny_cnn", epochs=2,
                      strategy_options={"n_reference": 4, "reference_arch": "tiny_cnn", "reference_epochs": 3})
    inside = extraction_work(spec, job, test_size=100)
    assert sum(1 for w in inside if w.what.startswith("reference model")) == 4  # in the trial when not prepared
    prepared = extraction_work(spec, job, test_size=100, prepared=True)
    assert not any(w.what.startswith("reference model") or "feature pass" in w.what for w in prepared)


def test_cached_reference_set_and_features_cost_nothing(tmp_path):
    from distributed_me.attacks import PrepareContext

    rng = np.random.default_rng(1)
    pool = ArrayPool(rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8), name="noise-cached",
                     labels=rng.integers(0, 3, 120))
    s = QueryStrategy.create("swifttheft", {"n_reference": 2, "reference_arch": "tiny_cnn", "reference_epochs": 1,
                                            "reference_size": 16})
    assert len(s.prepare_cost(pool)) == 3
    s.prepare(pool, PrepareContext())
    assert s.prepare_cost(pool) == []


def test_a_projection_over_the_limit_is_refused_before_any_work(victim, monkeypatch):
    """SwiftTheft with the paper's reference set (8 ResNet-34, 100 epochs) on a CPU: refused with the projection,
    the cpu-small options and the flag, before a reference model trains or the API sees a query."""
    import distributed_me.attacks.reference as reference
    from distributed_me.oracle import LocalOracle

    def no_training(*a, **k):
        raise AssertionError("a reference model trained before the refusal")

    monkeypatch.setattr(reference, "train_reference_set", no_training)
    queried = []
    monkeypatch.setattr(LocalOracle, "query", lambda self, x: queried.append(len(x)))
    rng = np.random.default_rng(0)
    pool = ArrayPool(rng.integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8), name="labeled",
                     labels=rng.integers(0, 10, 4000))
    with pytest.raises(CostLimitError) as e:
        attack_in_process(AttackSpec(strategy="swifttheft", budget=1000), victim=victim, pool=pool, log_mlflow=False,
                          max_hours=1.0)
    msg = str(e.value)
    assert "projected to take" in msg and "over the limit of 60 min" in msg and "nothing was started" in msg
    assert "--strategy-option reference_arch=cnn32" in msg and "--no-cost-limit" in msg
    assert "\n" not in msg  # one `error:` line on the command line
    assert queried == []  # and no reference model trained (no_training above): refused before any work


def test_limit_from_flag_environment_and_default(monkeypatch):
    monkeypatch.delenv("DME_COST_LIMIT_HOURS", raising=False)
    assert limit_seconds() == 12 * 3600
    monkeypatch.setenv("DME_COST_LIMIT_HOURS", "2")
    assert limit_seconds() == 7200 and limit_seconds(0.5) == 1800
    monkeypatch.setenv("DME_COST_LIMIT_HOURS", "soon")
    with pytest.raises(DmeError, match="not a number"):
        limit_seconds()
    check_limit("x", 10, "here", 10, lambda: pytest.fail("the alternative was priced for work within the limit"))
    check_limit("x", 10, "here", 10, None)  # at the limit: allowed
    with pytest.raises(CostLimitError, match="11 s on here, over the limit of 10 s"):
        check_limit("x", 11, "here", 10, None)
    with pytest.raises(CostLimitError, match="Smaller: --epochs 1 .projected 1 s."):
        check_limit("x", 11, "here", 10, lambda: "--epochs 1 (projected 1 s)")


def test_measured_rates_are_cached_per_device(tmp_path):
    path = tmp_path / "rates.json"
    net = Net("tiny_cnn", 16, 1, 10)
    first = Rates(Device.here(1), path=path)
    rate = first.net(net)
    assert first.measured == ["tiny_cnn@16px"] and rate.measured and rate.train_sample_s > 0
    doc = json.loads(path.read_text())
    assert list(doc) == [Device.here(1).key] and "tiny_cnn|16|1|10" in doc[Device.here(1).key]["nets"]
    again = Rates(Device.here(1), path=path)
    assert again.net(net) == rate and again.measured == []  # read, not measured again
    assert Device.here(2).key != Device.here(1).key  # threads are part of the device
    # runs are tagged with the calibration: the same while the figures are, new when the device is measured again
    assert again.key == first.key and again.key.startswith(Device.here(1).key + "@")
    path.unlink()
    assert Rates(Device.here(1), path=path).key != first.key


def test_gpu_profile_prices_from_flops():
    net = Net("resnet18", 32, 3, 10)
    r = Rates(Device.gpu_profile("a100"))
    from distributed_me.cost.rates import GPU_PEAK_FLOPS, PROFILE_STEP_S, PROFILE_UTILIZATION

    expected = 3 * forward_flops(net) * 1000 / (GPU_PEAK_FLOPS["a100"] * PROFILE_UTILIZATION) + 16 * PROFILE_STEP_S
    assert r.seconds(work.train(net, 1000, 1, 64)) == pytest.approx(expected)
    with pytest.raises(DmeError, match="unknown GPU 'b200'.*a100"):
        Device.gpu_profile("b200")


def test_corrections_scale_phases():
    p = Projection([(Work("train", "seconds", "a", seconds=10), 10.0), (Work("eval", "seconds", "b", seconds=2), 2.0)])
    q = p.scaled({"train": 1.5})
    assert q.phases == {"train": 15.0, "eval": 2.0} and q.total == 17.0


def test_cost_job_from_spec(victim):
    spec = AttackSpec(budget=100, arch="cnn32", epochs=3)
    job = cost_job(spec, victim.input_shape, 10, load_pool("photos"), None)
    assert job.piracy == Net("cnn32", 16, 1, 10) and job.budget == 100 and job.pool_size == len(load_pool("photos"))
    assert project(extraction_work(spec, job, 100), fixed_rates()).total > 0
