"""SwiftTheft as a query strategy: reference models (disjoint subsets, distinct inits, stored in MLflow and reused),
features, Algorithm 1's picks, and what reaches the victim."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from distributed_me.attacks import QueryStrategy, Timer, Workbench
from distributed_me.attacks import reference as reference_mod
from distributed_me.attacks.reference import (
    ReferenceSpec,
    feature_cache_path,
    features_loop,
    get_reference_set,
    train_reference_set,
    write_features,
)
from distributed_me.attacks.selection import swifttheft_select
from distributed_me.data import ArrayPool
from distributed_me.errors import DmeError
from distributed_me.models import create_model
from distributed_me.oracle import LocalOracle, RecordingOracle
from distributed_me.train import TrainConfig
from distributed_me.victims import load_victim

SMALL = {"n_seed": 12, "k_per_iter": 9, "n_reference": 2, "reference_arch": "tiny_cnn", "reference_epochs": 1,
         "reference_size": 16}


@pytest.fixture(scope="module")
def victim():
    return load_victim(None)


class RecordingPool(ArrayPool):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.requests: list[np.ndarray] = []

    def get(self, idx, size=None, channels=None):
        self.requests.append(np.asarray(idx).copy())
        return super().get(idx, size, channels)


def _pool(n=240, labels=True, seed=0) -> ArrayPool:
    rng = np.random.default_rng(seed)
    return ArrayPool(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), name=f"noise{seed}",
                     labels=rng.integers(0, 6, n) if labels else None)


def _bench(victim) -> Workbench:
    return Workbench(lambda: create_model("tiny_cnn", 10, in_chans=1, img_size=16), TrainConfig(epochs=1),
                     victim.input_shape, Timer(), seed=5)


def test_reference_models_use_disjoint_subsets_and_distinct_inits():
    rng = np.random.default_rng(1)
    data = RecordingPool(rng.integers(0, 256, (90, 16, 16, 3), dtype=np.uint8), labels=rng.integers(0, 4, 90))
    ref = train_reference_set(ReferenceSpec(n_models=3, arch="tiny_cnn", epochs=1, batch_size=16), data)
    parts = [set(r.tolist()) for r in data.requests if len(r) > 1]
    assert len(parts) == 3 and all(len(p) == 30 for p in parts)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(90))
    key = next(k for k in ref.payload["states"][0] if k.endswith("weight"))  # a learned weight, not the norm buffer
    w = [s[key] for s in ref.payload["states"]]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert ref.num_classes == 4


def test_strategy_sends_exactly_algorithm_1s_picks(victim):
    pool = _pool()
    oracle = RecordingOracle(LocalOracle(victim, "probabilities", budget=50))
    bench = _bench(victim)
    out = QueryStrategy.create("swifttheft", SMALL).extract(oracle, pool, 50, bench)

    ref = get_reference_set(ReferenceSpec(n_models=2, arch="tiny_cnn", epochs=1, size=16), pool)
    expected = swifttheft_select(features_loop(ref, pool), 50, k_per_iter=9, n_seed=12, rng=5)
    np.testing.assert_array_equal(out.queried, expected)
    assert oracle.queries_used == 50
    torch.testing.assert_close(oracle.images(), bench.load(pool, expected))
    assert bench.timer.seconds["setup"] > 0 and bench.timer.seconds["selection"] > 0
    assert feature_cache_path(ref, pool).is_file()  # the next attack on this pool skips the feature pass


def test_reference_set_is_stored_in_mlflow_and_reused_without_training(monkeypatch):
    pool = _pool(seed=7)
    spec = ReferenceSpec(n_models=2, arch="tiny_cnn", epochs=1, size=16, seed=3)
    first = get_reference_set(spec, pool)
    shutil.rmtree(reference_mod._cache_dir() / first.key)  # a new machine: only MLflow has it

    def no_training(*a, **k):
        raise AssertionError("the reference set was trained again")

    monkeypatch.setattr(reference_mod, "train_reference_set", no_training)
    again = get_reference_set(spec, pool)
    assert again.key == first.key
    for a, b in zip(first.payload["states"], again.payload["states"]):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    x = pool.get(np.arange(20))
    np.testing.assert_allclose(first.features(x), again.features(x), atol=1e-6)


def test_precomputed_features_file_is_used(victim, tmp_path, monkeypatch):
    pool = _pool(seed=2)
    feats = np.random.default_rng(0).normal(size=(len(pool), 4)).astype(np.float32)
    write_features(tmp_path / "f.parquet", pool.sample_ids(), feats)
    monkeypatch.setattr(reference_mod, "get_reference_set", lambda *a, **k: pytest.fail("no reference needed"))
    oracle = LocalOracle(victim, "label", budget=30)
    s = QueryStrategy.create("swifttheft", {"n_seed": 10, "k_per_iter": 10, "features": str(tmp_path / "f.parquet")})
    out = s.extract(oracle, pool, 30, _bench(victim))
    np.testing.assert_array_equal(out.queried, swifttheft_select(feats, 30, k_per_iter=10, n_seed=10, rng=5))


def test_unlabeled_pool_without_reference_data_fails_before_any_query(victim):
    oracle = LocalOracle(victim, "probabilities", budget=30)
    with pytest.raises(DmeError, match="reference_data"):
        QueryStrategy.create("swifttheft", SMALL).extract(oracle, _pool(labels=False), 30, _bench(victim))
    assert oracle.queries_used == 0


def test_options_are_validated_by_name():
    with pytest.raises(DmeError, match="k_per_iter"):
        QueryStrategy.create("swifttheft", {"k_per_iter": 0})
    with pytest.raises(DmeError, match="criterion"):
        QueryStrategy.create("swifttheft", {"criterion": "l2"})
