"""Parquet pool shards (`dme pool build`) and the Ray Data feature pass against a plain loop."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_me.attacks.reference import (
    ReferenceSpec,
    features_loop,
    read_features,
    train_reference_set,
    write_features,
)
from distributed_me.cli import main
from distributed_me.data import ArrayPool, ParquetPool, load_pool, write_pool_shards
from distributed_me.data.npz import JpegNpzPool
from distributed_me.errors import DmeError


def _images(n: int, side: int = 12, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, c), dtype=np.uint8)


class RecordingPool(ArrayPool):
    """Records the size of every read, to check the builder streams."""

    def __init__(self, *a, fail_at: int | None = None, **k):
        super().__init__(*a, **k)
        self.reads: list[int] = []
        self.fail_at = fail_at

    def _load(self, idx):
        if self.fail_at is not None and len(idx) and idx.max() >= self.fail_at:
            raise RuntimeError("disk gone")
        self.reads.append(len(idx))
        return super()._load(idx)


def _jpeg_npz(path, n=40, side=16):
    blobs, offsets = [], [0]
    for img in _images(n, side):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
        offsets.append(offsets[-1] + len(blobs[-1]))
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=np.array(offsets, dtype=np.int64),
             labels=np.arange(n) % 4)
    return path


def test_raw_shards_roundtrip_with_stable_ids_and_labels(tmp_path):
    src = RecordingPool(_images(230), name="noise", labels=np.arange(230) % 7)
    m = write_pool_shards(src, tmp_path / "pool", rows_per_shard=100, row_group_size=32)
    assert [s["rows"] for s in m["shards"]] == [100, 100, 30] and m["encoding"] == "raw"
    assert max(src.reads) <= 32  # never more than one row group of pixels at a time
    pool = load_pool(str(tmp_path / "pool"))
    assert isinstance(pool, ParquetPool) and len(pool) == 230
    np.testing.assert_array_equal(pool.sample_ids(), np.arange(230))
    np.testing.assert_array_equal(pool.labels, np.arange(230) % 7)
    idx = np.array([229, 0, 101, 99, 100, 5, 5])
    np.testing.assert_array_equal(pool.get(idx), src.images[idx])
    assert pool.content_key() == src.content_key()
    t = pq.read_table(tmp_path / "pool" / "shard-00001.parquet")
    assert t.column("id").to_pylist() == list(range(100, 200))  # ids are the source indices, shard by shard


def test_jpeg_pool_keeps_its_bytes(tmp_path):
    src = JpegNpzPool(_jpeg_npz(tmp_path / "p.npz"))
    m = write_pool_shards(src, tmp_path / "pq", rows_per_shard=16, row_group_size=8)
    assert m["encoding"] == "jpeg" and m["has_labels"]
    pool = ParquetPool(tmp_path / "pq")
    idx = np.arange(40)[::-3]
    np.testing.assert_array_equal(pool.get(idx), src.get(idx))
    first = pq.read_table(tmp_path / "pq" / "shard-00000.parquet").column("image")[0].as_py()
    assert first == src._bytes(0)  # unchanged source bytes, not a re-encoding


def test_failed_build_leaves_nothing_and_existing_output_is_refused(tmp_path):
    src = RecordingPool(_images(100), fail_at=70)
    with pytest.raises(RuntimeError, match="disk gone"):
        write_pool_shards(src, tmp_path / "pool", rows_per_shard=50, row_group_size=10)
    assert list(tmp_path.iterdir()) == []  # no half-written pool, no temp dir
    ok = ArrayPool(_images(20))
    write_pool_shards(ok, tmp_path / "pool")
    with pytest.raises(DmeError, match="--overwrite"):
        write_pool_shards(ok, tmp_path / "pool")
    write_pool_shards(ArrayPool(_images(30)), tmp_path / "pool", overwrite=True)
    assert len(ParquetPool(tmp_path / "pool")) == 30


def test_missing_shard_and_foreign_directory_are_named(tmp_path):
    write_pool_shards(ArrayPool(_images(20)), tmp_path / "pool", rows_per_shard=10)
    (tmp_path / "pool" / "shard-00001.parquet").unlink()
    with pytest.raises(DmeError, match="shard-00001.parquet"):
        ParquetPool(tmp_path / "pool")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DmeError, match="dme pool build"):
        ParquetPool(tmp_path / "empty")


def test_cli_pool_build(tmp_path, capsys):
    src = tmp_path / "p.npz"
    _jpeg_npz(src, n=25)
    assert main(["pool", "build", str(src), str(tmp_path / "out"), "--rows-per-shard", "10", "-q"]) == 0
    out = capsys.readouterr().out
    assert "images" in out and "25" in out and "jpeg" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    assert main(["pool", "build", str(src), str(tmp_path / "out")]) == 2  # refuses to overwrite: an error line


def test_features_file_is_keyed_by_id_not_by_row_order(tmp_path):
    pool = ArrayPool(_images(6))
    feats = np.arange(12, dtype=np.float32).reshape(6, 2)
    perm = np.array([3, 1, 5, 0, 2, 4])
    write_features(tmp_path / "f.parquet", perm, feats[perm])
    np.testing.assert_array_equal(read_features(tmp_path / "f.parquet", pool), feats)
    write_features(tmp_path / "g.parquet", np.arange(5), feats[:5])
    with pytest.raises(DmeError, match="no features for 1 of the pool's 6"):
        read_features(tmp_path / "g.parquet", pool)


@pytest.fixture(scope="module")
def ray_cluster():
    from distributed_me.serving.runtime import init_ray, shutdown

    init_ray(num_cpus=2)
    yield
    shutdown()


@pytest.mark.slow
def test_ray_data_feature_pass_equals_plain_loop(tmp_path, ray_cluster):
    """Ray Data map_batches on an actor pool gives exactly the loop's features, for Parquet and in-memory pools."""
    from distributed_me.pools.features import ray_feature_pass

    src = ArrayPool(_images(700, side=20), name="noise", labels=np.arange(700) % 5)
    ref = train_reference_set(ReferenceSpec(n_models=2, arch="tiny_cnn", epochs=1, size=16, batch_size=64), src)
    assert len(ref) == 2 and ref.num_classes == 5
    expected = features_loop(ref, src, batch_size=128)
    np.testing.assert_allclose(expected.sum(axis=1), 2.0, rtol=1e-5)  # a sum of two softmax vectors per sample
    write_pool_shards(src, tmp_path / "pool", rows_per_shard=300, row_group_size=64)
    pool = ParquetPool(tmp_path / "pool")
    for p, name in ((pool, "parquet"), (src, "memory")):
        r = ray_feature_pass(ref.factory(), p, out=tmp_path / f"{name}.parquet", actors=2, batch_size=100)
        assert r["images"] == 700 and r["images_per_s"] > 0
        np.testing.assert_allclose(read_features(tmp_path / f"{name}.parquet", p), expected, atol=1e-5)
