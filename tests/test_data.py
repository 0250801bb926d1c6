"""Tests of distributed_me.data: every loader against tiny files written here, never the network.

torchvision checks the official md5 of CIFAR/SVHN files; fabricated files cannot match it, so those tests replace
``check_integrity`` with an existence check. Everything else runs the real code path.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distributed_me.data as data
from distributed_me.data import (
    DATASETS,
    EMBEDDED_DATASET,
    EMBEDDED_POOL,
    POOLS,
    ArrayPool,
    LabeledDataset,
    default_root,
    embedded,
    imagenet64,
    load_dataset,
    load_image_folder,
    load_pool,
    npz,
)
from distributed_me.errors import DataNotFound, DmeError, UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any attempt to open a connection fails at once, and the default data root is a temporary directory."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("DME_DATA", str(tmp_path / "default_root"))


def _rng_images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _check_dataset(ds: LabeledDataset, shape: tuple[int, int, int], n_classes: int) -> None:
    assert ds.image_shape == shape
    assert ds.num_classes == n_classes
    assert ds.train.images.dtype == np.uint8 and ds.test.images.dtype == np.uint8
    assert len(ds.normalization.mean) == shape[2] == len(ds.normalization.std)


# ---------------------------------------------------------------- registry / API


def test_registries_and_api() -> None:
    assert {"cifar10", "cifar100", "svhn", "gtsrb", "digits", "caltech256", "indoor67"} <= set(DATASETS.names())
    assert {"photos", "imagenet64"} <= set(POOLS.names())
    assert EMBEDDED_DATASET in DATASETS and EMBEDDED_POOL in POOLS
    for name in ("ArraySplit", "LabeledDataset", "Pool", "ArrayPool", "Normalization", "adapt_images", "to_tensor",
                 "split_indices", "IMAGENET_MEAN", "IMAGENET_STD"):
        assert hasattr(data, name), name


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DME_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("DME_DATA")
    assert default_root() == Path.home() / ".cache" / "distributed_me" / "data"


# ---------------------------------------------------------------- torchvision sets on fabricated files


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_svhn, "check_integrity", exists)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _chw_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_cifar10_from_python_batches(tmp_path: Path, no_md5: None) -> None:
    base = tmp_path / "cifar-10-batches-py"
    imgs = _rng_images(12, 32, 32)
    for i in range(5):
        _pickle(base / f"data_batch_{i + 1}", {"data": _chw_rows(imgs[2 * i : 2 * i + 2]), "labels": [i, i + 1]})
    _pickle(base / "test_batch", {"data": _chw_rows(imgs[10:]), "labels": [3, 4]})
    _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    ds = load_dataset("cifar10", root=str(tmp_path))
    _check_dataset(ds, (32, 32, 3), 10)
    np.testing.assert_array_equal(ds.train.images, imgs[:10])
    np.testing.assert_array_equal(ds.test.images, imgs[10:])
    assert ds.train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert ds.class_names[0] == "c0"
    np.testing.assert_allclose(ds.normalization.mean, (imgs[:10] / 255.0).reshape(-1, 3).mean(0))


def test_cifar100_from_python_batches(tmp_path: Path, no_md5: None) -> None:
    base = tmp_path / "cifar-100-python"
    imgs = _rng_images(4, 32, 32)
    _pickle(base / "train", {"data": _chw_rows(imgs[:3]), "fine_labels": [0, 99, 5]})
    _pickle(base / "test", {"data": _chw_rows(imgs[3:]), "fine_labels": [7]})
    _pickle(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    ds = load_dataset("cifar100", root=str(tmp_path))
    _check_dataset(ds, (32, 32, 3), 100)
    np.testing.assert_array_equal(ds.train.images, imgs[:3])
    assert ds.train.labels.tolist() == [0, 99, 5]


def test_svhn_from_mat(tmp_path: Path, no_md5: None) -> None:
    from scipy.io import savemat

    imgs = _rng_images(5, 32, 32)
    (tmp_path / "svhn").mkdir()
    for split, sl, y in (("train", slice(0, 3), [10, 1, 9]), ("test", slice(3, 5), [2, 10])):
        mat = {"X": imgs[sl].transpose(1, 2, 3, 0), "y": np.array(y)[:, None]}  # official layout: H, W, C, N
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat", mat)
    ds = load_dataset("svhn", root=str(tmp_path))
    _check_dataset(ds, (32, 32, 3), 10)
    np.testing.assert_array_equal(ds.train.images, imgs[:3])
    assert ds.train.labels.tolist() == [0, 1, 9] and ds.test.labels.tolist() == [2, 0]


def test_gtsrb_from_ppm_folders(tmp_path: Path) -> None:
    g = tmp_path / "gtsrb"
    for cls, sizes in (("00000", [(40, 40), (50, 45)]), ("00001", [(33, 36)])):
        d = g / "GTSRB" / "Training" / cls
        d.mkdir(parents=True)
        (d / f"GT-{cls}.csv").write_text("ignored")
        for k, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (10 * k, 100, 200)).save(d / f"{k:05d}_00000.ppm")
    test_dir = g / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    Image.new("RGB", (64, 60), (1, 2, 3)).save(test_dir / "00000.ppm")
    (g / "GT-final_test.csv").write_text("Filename;Width;Height;ClassId\n00000.ppm;64;60;42\n")
    ds = load_dataset("gtsrb", root=str(tmp_path))
    _check_dataset(ds, (32, 32, 3), 43)
    assert ds.train.labels.tolist() == [0, 0, 1] and ds.test.labels.tolist() == [42]
    assert tuple(ds.train.images[2, 5, 5]) == (0, 100, 200)  # constant image stays constant through the resize
    assert tuple(ds.test.images[0, 0, 0]) == (1, 2, 3)


def test_caltech256_folder_layout(tmp_path: Path) -> None:
    base = tmp_path / "caltech256" / "256_ObjectCategories"
    _write_class_tree(base, {"001.ak47": 5, "257.clutter": 5}, size=(40, 30))
    ds = load_dataset("caltech256", root=str(tmp_path), size=16)
    _check_dataset(ds, (16, 16, 3), 2)
    assert ds.class_names == ["001.ak47", "257.clutter"] and len(ds.train) + len(ds.test) == 10


def test_indoor67_folder_layout(tmp_path: Path) -> None:
    _write_class_tree(tmp_path / "indoor67" / "Images", {"airport_inside": 5, "bakery": 5})
    ds = load_dataset("indoor67", root=str(tmp_path), size=8)
    assert ds.class_names == ["airport_inside", "bakery"] and ds.image_shape == (8, 8, 3)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "gtsrb", "caltech256", "indoor67"])
def test_missing_registered_dataset_names_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataNotFound) as err:
        load_dataset(name, root=str(tmp_path / "empty"))
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg
    if name != "indoor67":
        assert "--download" in msg


def test_default_root_used_when_no_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match=str(tmp_path / "default_root")):
        load_dataset("cifar10")


@pytest.mark.parametrize("name", ["cifar10", "svhn", "gtsrb"])
def test_offline_download_fails_fast_with_alternative(tmp_path: Path, name: str, monkeypatch) -> None:
    """"Fast" without a stopwatch: every connection the download opens is bounded by DOWNLOAD_TIMEOUT_S (torchvision's
    urllib calls pass no timeout of their own), and the refused connection becomes the error naming the local files."""
    from distributed_me.data.torchvision_sets import DOWNLOAD_TIMEOUT_S

    attempts: list[float | None] = []

    def refused(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *args, **kwargs):  # what an offline machine does
        attempts.append(socket.getdefaulttimeout() if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout)
        raise OSError(f"network unreachable (test): {address}")

    monkeypatch.setattr(socket, "create_connection", refused)
    with pytest.raises(DataNotFound) as err:
        load_dataset(name, root=str(tmp_path), download=True)
    assert attempts and all(t is not None and t <= DOWNLOAD_TIMEOUT_S for t in attempts), attempts
    assert socket.getdefaulttimeout() is None  # the bound is lifted again afterwards
    msg = str(err.value)
    assert "could not download" in msg and str(tmp_path) in msg and ".npz" in msg


def test_offline_download_message_for_cifar10_names_shared_npz(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="cifar10_train_10k.npz"):
        load_dataset("cifar10", root=str(tmp_path), download=True)


# ---------------------------------------------------------------- imagenet64


def _write_imagenet64_batch(path: Path, images: np.ndarray, labels1: list[int], compressed: bool) -> None:
    save = np.savez_compressed if compressed else np.savez
    save(path, data=_chw_rows(images), labels=np.array(labels1, dtype=np.int64), mean=np.zeros(3))


@pytest.fixture
def imagenet64_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    d = tmp_path / "imagenet64"
    d.mkdir()
    imgs = _rng_images(5, 64, 64, seed=3)
    _write_imagenet64_batch(d / "train_data_batch_1.npz", imgs[:3], [1, 2, 1000], compressed=False)
    _write_imagenet64_batch(d / "train_data_batch_2.npz", imgs[3:], [5, 6], compressed=True)
    _write_imagenet64_batch(d / "val_data.npz", imgs[:1], [7], compressed=False)
    return d, imgs


def test_imagenet64_pool_layout_labels_and_lazy_batches(
    imagenet64_dir: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, imgs = imagenet64_dir
    opened: list[str] = []
    real_open = imagenet64._open_data
    monkeypatch.setattr(imagenet64, "_open_data", lambda p: opened.append(p.name) or real_open(p))

    pool = load_pool("imagenet64", root=str(d.parent))
    assert len(pool) == 5 and pool.labels.tolist() == [0, 1, 999, 4, 5]
    assert opened == []  # construction reads labels only

    got = pool.get([4, 3])
    assert opened == ["train_data_batch_2.npz"]  # batch 1 untouched
    np.testing.assert_array_equal(got, imgs[[4, 3]])
    # exact CHW-planar → HWC on a known pixel: row layout is [R plane | G plane | B plane], each 64×64
    row = _chw_rows(imgs[3:4])[0]
    y, x = 7, 11
    assert tuple(got[1, y, x]) == (row[y * 64 + x], row[4096 + y * 64 + x], row[8192 + y * 64 + x])

    mixed = pool.get([0, 4, 2], size=32, channels=1)
    assert mixed.shape == (3, 32, 32, 1)
    assert opened == ["train_data_batch_2.npz", "train_data_batch_1.npz", "train_data_batch_2.npz"]
    assert isinstance(real_open(d / "train_data_batch_1.npz"), np.memmap)  # stored member → memory-mapped
    clone = pickle.loads(pickle.dumps(pool))  # shipped to a worker without its cached batch
    assert clone._cache == {} and np.array_equal(clone.get([1]), imgs[[1]])


def test_imagenet64_val_split_and_dir_spec(imagenet64_dir: tuple[Path, np.ndarray]) -> None:
    d, imgs = imagenet64_dir
    val = load_pool("imagenet64", root=str(d.parent), split="val")
    assert len(val) == 1 and val.labels.tolist() == [6]
    by_path = load_pool(str(d))
    assert len(by_path) == 5
    np.testing.assert_array_equal(by_path.get([2]), imgs[[2]])
    single = load_pool(str(d / "train_data_batch_2.npz"))
    np.testing.assert_array_equal(single.get([0, 1]), imgs[3:])


def test_imagenet64_missing(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match=str(tmp_path / "imagenet64")):
        load_pool("imagenet64", root=str(tmp_path))


# ---------------------------------------------------------------- npz datasets and JPEG pools


def _write_labeled(path: Path, images: np.ndarray, labels: np.ndarray, names: list[str] | None = None) -> None:
    arrays = {"images": images, "labels": labels}
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez_compressed(path, **arrays)


def test_npz_dataset_finds_test_file(tmp_path: Path) -> None:
    tr, te = _rng_images(20, 8, 8), _rng_images(6, 8, 8, seed=1)
    _write_labeled(tmp_path / "toy_train_20.npz", tr, np.arange(20) % 3, ["a", "b", "c"])
    _write_labeled(tmp_path / "toy_test_6.npz", te, np.arange(6) % 3, ["a", "b", "c"])
    ds = load_dataset(str(tmp_path / "toy_train_20.npz"))
    _check_dataset(ds, (8, 8, 3), 3)
    assert ds.name == "toy" and ds.meta["test_file"].endswith("toy_test_6.npz")
    np.testing.assert_array_equal(ds.test.images, te)
    # train-split statistics, not test
    np.testing.assert_allclose(ds.normalization.std, (tr / 255.0).reshape(-1, 3).std(0), rtol=1e-6)
    explicit = load_dataset(f"{tmp_path / 'toy_train_20.npz'},{tmp_path / 'toy_test_6.npz'}")
    np.testing.assert_array_equal(explicit.train.images, tr)


def test_npz_dataset_errors(tmp_path: Path) -> None:
    _write_labeled(tmp_path / "lonely_train.npz", _rng_images(4, 8, 8), np.zeros(4, dtype=np.int64))
    with pytest.raises(DataNotFound, match="TRAIN.npz,TEST.npz"):
        load_dataset(str(tmp_path / "lonely_train.npz"))
    for name in ("x_train.npz", "x_test_a.npz", "x_test_b.npz"):
        _write_labeled(tmp_path / name, _rng_images(4, 8, 8), np.zeros(4, dtype=np.int64))
    with pytest.raises(DmeError, match="several test files"):
        load_dataset(str(tmp_path / "x_train.npz"))
    # no "train" in the name: deterministic seeded split
    _write_labeled(tmp_path / "all.npz", _rng_images(10, 8, 8), np.arange(10) % 2)
    a, b = load_dataset(str(tmp_path / "all.npz"), seed=1), load_dataset(str(tmp_path / "all.npz"), seed=1)
    assert len(a.train) == 8 and len(a.test) == 2
    np.testing.assert_array_equal(a.test.images, b.test.images)


def test_corrupt_npz_is_a_dme_error(tmp_path: Path) -> None:
    garbage = tmp_path / "bad_train.npz"
    garbage.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(DmeError, match="cannot read"):
        load_dataset(str(garbage))
    good = io.BytesIO()
    np.savez_compressed(good, images=_rng_images(50, 8, 8), labels=np.zeros(50, dtype=np.int64))
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(DmeError):
        load_pool(str(truncated))
    wrong_keys = tmp_path / "wrong.npz"
    np.savez(wrong_keys, foo=np.zeros(3))
    with pytest.raises(DmeError, match="foo"):
        load_pool(str(wrong_keys))


def _write_jpeg_pool(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> list[bytes]:
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=95)
        blobs.append(buf.getvalue())
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    arrays = {"jpeg": np.frombuffer(b"".join(blobs), dtype=np.uint8), "offsets": offsets,
              "image_shape": np.array(images.shape[1:3] + (3,))}
    if labels is not None:
        arrays["labels"] = labels
    np.savez_compressed(path, **arrays)
    return blobs


def test_jpeg_pool_decodes_lazily_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None, None], (7, 16, 16, 3)).copy()
    smooth[:, :, :, 1] = np.arange(7)[:, None, None] * 30
    blobs = _write_jpeg_pool(tmp_path / "pool.npz", smooth, labels=np.arange(7) + 10)
    decoded: list[int] = []
    real = npz.decode_image
    monkeypatch.setattr(npz, "decode_image", lambda b: decoded.append(len(b)) or real(b))

    pool = load_pool(str(tmp_path / "pool.npz"))
    assert isinstance(pool, npz.JpegNpzPool) and len(pool) == 7
    assert pool.labels.tolist() == list(range(10, 17))
    assert decoded == []  # image_shape is stored: nothing decoded at construction
    got = pool.get([6, 0])
    assert len(decoded) == 2 and got.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got[0], np.asarray(Image.open(io.BytesIO(blobs[6])).convert("RGB")))
    assert np.abs(got.astype(int) - smooth[[6, 0]].astype(int)).mean() < 3
    batches = list(pool.iter_batches(batch_size=3))
    assert [len(i) for i, _ in batches] == [3, 3, 1] and len(decoded) == 9
    assert pool.get([1], size=8, channels=1).shape == (1, 8, 8, 1)


def test_gray_jpeg_becomes_rgb(tmp_path: Path) -> None:
    _write_jpeg_pool(tmp_path / "gray.npz", _rng_images(2, 8, 8, c=1))
    img = load_pool(str(tmp_path / "gray.npz")).get([1])
    assert img.shape == (1, 8, 8, 3) and np.array_equal(img[..., 0], img[..., 2])


def test_labeled_npz_as_pool_and_dataset_name_as_pool(tmp_path: Path) -> None:
    imgs = _rng_images(5, 8, 8)
    _write_labeled(tmp_path / "some.npz", imgs, np.arange(5))
    pool = load_pool(str(tmp_path / "some.npz"))
    assert isinstance(pool, ArrayPool) and pool.labels.tolist() == list(range(5))
    np.testing.assert_array_equal(pool.get([4]), imgs[[4]])
    digits_pool = load_pool("digits")
    assert len(digits_pool) == len(load_dataset("digits").train) and digits_pool.labels is not None
    assert digits_pool.get([0], size=32, channels=3).shape == (1, 32, 32, 3)


@pytest.mark.skipif(not (SHARED / "cifar10_train_10k.npz").exists(),
                    reason=f"needs the shared data files in {SHARED}, absent here")
def test_real_shared_files() -> None:
    ds = load_dataset(str(SHARED / "cifar10_train_10k.npz"))
    assert ds.image_shape == (32, 32, 3) and len(ds.train) == 10_000 and len(ds.test) == 2_000 and ds.num_classes == 10
    g = load_dataset(str(SHARED / "gtsrb_train_1290.npz"))
    assert (len(g.train), len(g.test), g.num_classes) == (1290, 430, 43)
    pool = load_pool(str(SHARED / "pool_imagenet64_20k.npz"))
    assert len(pool) == 20_000 and pool.labels.shape == (20_000,)
    assert pool.get([0, 19_999, 123]).shape == (3, 64, 64, 3)


# ---------------------------------------------------------------- embedded


def test_digits() -> None:
    ds = load_dataset(EMBEDDED_DATASET, seed=0)
    _check_dataset(ds, (8, 8, 1), 10)
    assert abs(len(ds.train) - 0.5 * 1797) < 10 and abs(len(ds.test) - 0.25 * 1797) < 10
    both = np.concatenate([ds.train.images, ds.test.images])
    assert both.min() == 0 and both.max() == 255
    assert set(ds.test.labels.tolist()) == set(range(10))  # stratified
    assert ds.class_names == [str(i) for i in range(10)]
    again, other = load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    np.testing.assert_array_equal(ds.test.images, again.test.images)
    assert not np.array_equal(ds.test.images, other.test.images)


def test_photos_pool_deterministic_and_adaptable() -> None:
    a = embedded.make_photo_crops(300, 24, seed=5)
    b = embedded.make_photo_crops(300, 24, seed=5)
    c = embedded.make_photo_crops(300, 24, seed=6)
    assert a.shape == (300, 24, 24, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert a.std() > 20  # real photo content, not a constant
    pool = load_pool(EMBEDDED_POOL, seed=5, n=300, size=24)
    np.testing.assert_array_equal(pool.get(np.arange(300)), a)
    assert pool.get([0, 1, 2], size=16, channels=1).shape == (3, 16, 16, 1)


def test_digits_are_sklearns_digits_read_without_importing_sklearn() -> None:
    from sklearn.datasets import load_digits

    images, labels = embedded._digits_raw()
    bunch = load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
    # a fresh process scoring against the embedded victim must not pay sklearn's import (1 s on 2 cores)
    code = ("import sys; from distributed_me.data import load_dataset; load_dataset('digits'); "
            "assert 'sklearn' not in sys.modules, sorted(m for m in sys.modules if m.startswith('sklearn'))[:5]")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_photo_crops_are_cached_on_disk_by_what_makes_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DME_HOME", str(tmp_path))
    embedded._cached_crops.cache_clear()
    path = embedded.crops_cache_path(200, 16, 3)
    assert path is not None and not path.exists()
    built = embedded._cached_crops(200, 16, 3)
    assert path.is_file()
    np.testing.assert_array_equal(np.load(path), embedded.make_photo_crops(200, 16, 3))
    # a second process reads it: nothing is built again
    embedded._cached_crops.cache_clear()
    monkeypatch.setattr(embedded, "make_photo_crops", lambda *a, **k: pytest.fail("built again despite the cache"))
    np.testing.assert_array_equal(embedded._cached_crops(200, 16, 3), built)
    assert not embedded._cached_crops(200, 16, 3).flags.writeable
    # another argument, crop version or source photo is another file
    assert embedded.crops_cache_path(200, 16, 4) != path
    monkeypatch.setattr(embedded, "PHOTO_CROPS_VERSION", embedded.PHOTO_CROPS_VERSION + 1)
    assert embedded.crops_cache_path(200, 16, 3) != path
    monkeypatch.undo()
    monkeypatch.setenv("DME_HOME", str(tmp_path))
    # a changed source photo (here a copy of the first one, touched) is another file too
    original = embedded._source_path
    first = embedded.PHOTO_SOURCES[0]
    copy = tmp_path / "photo-copy" / first[1]
    copy.parent.mkdir()
    copy.write_bytes(original(*first).read_bytes())
    monkeypatch.setattr(embedded, "_source_path", lambda package, name: copy if (package, name) == first
                        else original(package, name))
    with_copy = embedded.crops_cache_path(200, 16, 3)
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert embedded.crops_cache_path(200, 16, 3) not in (with_copy, path)
    monkeypatch.undo()
    monkeypatch.setenv("DME_HOME", str(tmp_path))
    assert embedded.crops_cache_path(200, 16, 3) == path
    # a damaged file (not an array, empty, another shape) is built again, with a warning, and replaced
    for damage in (b"not an array", b""):
        path.write_bytes(damage)
        embedded._cached_crops.cache_clear()
        np.testing.assert_array_equal(embedded._cached_crops(200, 16, 3), built)
        assert "unreadable" in caplog.text
        caplog.clear()
        np.testing.assert_array_equal(np.load(path), built)
    np.save(path, built[:10])
    embedded._cached_crops.cache_clear()
    np.testing.assert_array_equal(embedded._cached_crops(200, 16, 3), built)
    assert "building the crops again" in caplog.text
    np.testing.assert_array_equal(np.load(path), built)
    assert not list(path.parent.glob("*.tmp")) and path.stat().st_mode & 0o777 == 0o644
    embedded._cached_crops.cache_clear()


def test_photos_default_pool_size_and_shape() -> None:
    embedded._cached_crops.cache_clear()
    pool = load_pool("photos")  # its speed is measured by `dme bench`, not asserted here
    assert len(pool) == 20_000 and pool.get([0]).shape == (1, 32, 32, 3) and pool.labels is None


# ---------------------------------------------------------------- image folders


def _write_class_tree(base: Path, counts: dict[str, int], size: tuple[int, int] = (20, 12)) -> None:
    for k, (cls, n) in enumerate(counts.items()):
        d = base / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            Image.new("RGB", size, (20 * k, 7 * i, 100)).save(d / f"img{i}.{ext}")


def test_image_folder_split_and_classes(tmp_path: Path) -> None:
    _write_class_tree(tmp_path / "flowers", {"rose": 10, "tulip": 5, "daisy": 5})
    (tmp_path / "flowers" / "rose" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path / "flowers"), seed=3)
    _check_dataset(ds, (64, 64, 3), 3)
    assert ds.class_names == ["daisy", "rose", "tulip"] and ds.name == "flowers"
    assert len(ds.train) == 16 and len(ds.test) == 4
    assert sorted(ds.test.labels.tolist()) == [0, 1, 1, 2]  # per class 20 %
    same = load_image_folder(tmp_path / "flowers", size=64, seed=3)
    np.testing.assert_array_equal(ds.test.images, same.test.images)
    small = load_image_folder(tmp_path / "flowers", size=10, seed=3)
    assert small.image_shape == (10, 10, 3)


def test_image_folder_train_test_layout(tmp_path: Path) -> None:
    _write_class_tree(tmp_path / "set" / "train", {"a": 3, "b": 2})
    _write_class_tree(tmp_path / "set" / "test", {"b": 1})
    ds = load_dataset(str(tmp_path / "set"), size=12)
    assert ds.class_names == ["a", "b"] and len(ds.train) == 5
    assert ds.test.labels.tolist() == [1]  # "b" keeps the train split's id
    _write_class_tree(tmp_path / "set" / "test", {"zebra": 1})
    with pytest.raises(DmeError, match="zebra"):
        load_dataset(str(tmp_path / "set"))


def test_image_folder_pool(tmp_path: Path) -> None:
    _write_class_tree(tmp_path / "imgs", {"x": 3, "y": 2})
    pool = load_pool(str(tmp_path / "imgs"), size=16)
    assert len(pool) == 5 and pool.labels.tolist() == [0, 0, 0, 1, 1]
    assert pool.get([4, 0]).shape == (2, 16, 16, 3)


# ---------------------------------------------------------------- errors


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        load_dataset("cifar11")
    assert "cifar10" in str(err.value) and "digits" in str(err.value) and "path" in str(err.value)
    with pytest.raises(UnknownNameError) as err:
        load_pool("imagenet65")
    assert "photos" in str(err.value) and "imagenet64" in str(err.value) and "path" in str(err.value)


def test_missing_paths_are_data_not_found(tmp_path: Path) -> None:
    pair = f"{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}"
    for spec in (str(tmp_path / "nope_train.npz"), str(tmp_path / "dir") + "/", pair):
        with pytest.raises(DataNotFound, match=str(tmp_path)):
            load_dataset(spec)
    with pytest.raises(DataNotFound, match="nope.npz"):
        load_pool(str(tmp_path / "nope.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFound, match="empty"):
        load_dataset(str(tmp_path / "empty"))


def test_digits_unseen_is_the_held_out_quarter_jittered_and_disjoint_from_victim_and_test() -> None:
    """The in-distribution pool is made of the digits neither the victim trains on nor the judge tests on: each of
    its blocks starts with one held-out digit (upscaled), and no block's original is a train or test image."""
    from distributed_me.data.embedded import DIGITS_UNSEEN_VARIANTS, _digit_splits, jitter_digits

    images, _, tr, held, te = _digit_splits(0)
    assert len(set(tr) | set(held) | set(te)) == 1797 and not (set(tr) & set(held) or set(te) & set(held))
    pool = load_pool("digits-unseen")
    assert len(pool) == len(held) * DIGITS_UNSEEN_VARIANTS and pool.labels is None
    originals = pool.images[::DIGITS_UNSEEN_VARIANTS]
    np.testing.assert_array_equal(originals, jitter_digits(images[held], 1, 16, 0))
    ds = load_dataset("digits")
    seen = {x.tobytes() for x in jitter_digits(np.concatenate([ds.train.images, ds.test.images]), 1, 16, 0)}
    assert not any(o.tobytes() in seen for o in originals)  # sklearn's digits hold a few exact duplicates: none here
    variants = pool.images[1:DIGITS_UNSEEN_VARIANTS].astype(int)
    assert all(np.abs(v - originals[0].astype(int)).sum() > 0 for v in variants)  # jittered, not copies
    np.testing.assert_array_equal(pool.images, load_pool("digits-unseen").images)  # a pure function of the seed
