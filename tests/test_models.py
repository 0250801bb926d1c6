"""The model zoo: every entry builds and runs on tiny shapes, create_model's contract, NormalizedModel, and pretrained
weights offline (fail fast, local checkpoints, a pre-populated hub cache). Never touches the network."""

from __future__ import annotations

import logging
import os
import threading

import pytest
import torch
from torch import nn

from distributed_me.data.base import Normalization
from distributed_me.errors import DmeError, UnknownNameError
from distributed_me.models import (
    CNN32,
    MODELS,
    NormalizedModel,
    TinyCNN,
    clear_offline_cache,
    create_model,
    load_checkpoint,
    model_info,
    register_model,
)
from distributed_me.models import pretrained as pretrained_mod

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXPECTED = {
    "resnet18", "resnet34", "resnet50", "wide_resnet50_2", "vgg16_bn", "densenet121", "efficientnet_b0", "googlenet",
    "alexnet", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "cnn32", "tiny_cnn",
}
# Built once with in_chans=1 only (one forward of batch 2); the others are built with 1 and 3 channels.
HEAVY = {"resnet50", "wide_resnet50_2", "densenet121", "vgg16_bn", "vit_base_patch16", "vit_large_patch16"}
SLOW = {"vgg16_bn", "vit_large_patch16"}  # > 5 s each on 2 CPU cores


def _cases() -> list:
    cases = []
    for name in sorted(EXPECTED):
        for c in (1,) if name in HEAVY else (1, 3):
            marks = [pytest.mark.slow] if name in SLOW else []
            cases.append(pytest.param(name, c, id=f"{name}-c{c}", marks=marks))
    return cases


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with empty hub caches, so a populated cache on the test machine cannot make a test pass."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "hf-cache"


@pytest.fixture
def connections(monkeypatch):
    """Every outgoing connection attempted in the test, refused. Offline "fails fast" means: none is attempted, so no
    timeout can be waited on (a stopwatch on a busy 2-core machine proves less)."""
    import socket

    attempts: list = []

    def refused(sock, address):
        attempts.append(address)
        raise OSError(f"network unreachable (test): {address}")

    def no_dns(host, *args, **kwargs):  # a lookup is the first step of every connection by name
        attempts.append(host)
        raise socket.gaierror(f"name resolution refused (test): {host}")

    monkeypatch.setattr(socket.socket, "connect", refused)
    monkeypatch.setattr(socket.socket, "connect_ex", refused)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    clear_offline_cache()  # a probe answer cached by an earlier test must not stand in for a connection attempt here
    yield attempts
    clear_offline_cache()


def test_registry_has_all_entries():
    assert EXPECTED <= set(MODELS.names())


@pytest.mark.parametrize("name,in_chans", _cases())
def test_every_entry_builds_and_maps_images_to_logits(name, in_chans):
    img_size = max(32, model_info(name)["min_img_size"])  # alexnet needs 63
    model = create_model(name, num_classes=7, in_chans=in_chans, img_size=img_size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_chans, img_size, img_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn32", "tiny_cnn"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_small_nets_train(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans, img_size=28)
    x, y = torch.rand(8, in_chans, 28, 28), torch.randint(0, 7, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_cnn32_is_activethief_architecture():
    model = create_model("cnn32", num_classes=10, in_chans=3, img_size=32)
    assert isinstance(model, CNN32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert model.fc.in_features == 128 * 4 * 4  # flattened 4×4 map of a 32×32 input
    assert model.forward_head(model.forward_features(torch.rand(2, 3, 32, 32)), pre_logits=True).shape == (2, 2048)
    # smallest size, grayscale, and the size-agnostic variant
    assert create_model("cnn32", 10, in_chans=1, img_size=8)(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    avg = create_model("cnn32", 10, img_size=32, pool="avg", dropout=0.5).eval()
    assert avg(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_tiny_cnn_is_tiny():
    model = create_model("tiny_cnn", num_classes=10)
    assert isinstance(model, TinyCNN)
    assert sum(p.numel() for p in model.parameters()) < 5_000


def test_create_model_drops_none_kwargs():
    model = create_model("tiny_cnn", 7, width=None, unset_flag=None)  # unset_flag would be a TypeError if passed
    assert model.features[0].out_channels == 8
    resnet = create_model("resnet18", 7, img_size=32, cifar_stem=None, drop_rate=None)
    assert resnet.conv1.kernel_size == (3, 3)


def test_unknown_option_is_a_dme_error():
    with pytest.raises(DmeError, match="tiny_cnn"):
        create_model("tiny_cnn", 7, no_such_option=3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        create_model("resnet19", 7)
    assert isinstance(e.value, DmeError)
    assert "resnet19" in str(e.value) and "resnet18" in str(e.value) and "cnn32" in str(e.value)


def test_shape_too_small_is_a_dme_error_with_the_smallest_size():
    with pytest.raises(DmeError) as e:
        create_model("alexnet", 7, in_chans=3, img_size=32)
    msg = str(e.value)
    assert "alexnet" in msg and "(N, 3, 32, 32)" in msg and "smallest img_size that works: 63" in msg
    with pytest.raises(DmeError, match=r"cnn32.*smallest img_size that works: 8"):
        create_model("cnn32", 7, img_size=4)
    with pytest.raises(DmeError, match=r"vit_tiny_patch16.*smallest img_size that works: 4"):
        create_model("vit_tiny_patch16", 7, img_size=2)
    with pytest.raises(DmeError, match="in_chans"):
        create_model("tiny_cnn", 7, in_chans=0)


def test_duplicate_registration_raises():
    before = len(MODELS)
    with pytest.raises(ValueError, match="duplicate"):
        MODELS.register("tiny_cnn")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="duplicate"):
        register_model("cnn32", family="cnn", source="dme", default_img_size=32, min_img_size=8)(lambda **kw: None)
    assert len(MODELS) == before
    assert isinstance(create_model("tiny_cnn", 3), TinyCNN)


def test_resnet_stem_follows_image_size():
    small = create_model("resnet18", 7, img_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = create_model("resnet18", 7, img_size=96, check=False)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    forced = create_model("resnet18", 7, img_size=32, cifar_stem=False)
    assert forced.conv1.kernel_size == (7, 7)


def test_vit_patch_size_follows_image_size():
    assert create_model("vit_tiny_patch16", 7, img_size=32).patch_embed.proj.kernel_size == (4, 4)
    assert create_model("vit_tiny_patch16", 7, img_size=64).patch_embed.proj.kernel_size == (16, 16)
    assert create_model("vit_tiny_patch16", 7, img_size=32, patch_size=8).patch_embed.proj.kernel_size == (8, 8)


def test_model_info():
    from timm.models import get_pretrained_cfg

    info = model_info("vit_tiny_patch16")
    assert info["family"] == "vit" and info["default_img_size"] == 224 and not info["size_agnostic"]
    assert tuple(info["pretrained_normalization"]["mean"]) == get_pretrained_cfg("vit_tiny_patch16_224").mean
    assert tuple(model_info("resnet18")["pretrained_normalization"]["std"]) == get_pretrained_cfg("resnet18").std
    assert model_info("cnn32")["pretrained_normalization"] is None
    with pytest.raises(UnknownNameError):
        model_info("nope")


# ---------------------------------------------------------------------------------------------------------------------
# NormalizedModel
# ---------------------------------------------------------------------------------------------------------------------


def test_normalized_model_normalizes_exactly():
    norm = Normalization(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    model = NormalizedModel(nn.Identity(), norm)
    x = torch.full((2, 3, 2, 2), 0.75)
    out = model(x)
    # (0.75 - 0.5) / 0.5 = 0.5 ; (0.75 - 0.25) / 0.25 = 2.0 ; (0.75 - 0) / 2 = 0.375
    assert torch.equal(out[:, 0], torch.full((2, 2, 2), 0.5))
    assert torch.equal(out[:, 1], torch.full((2, 2, 2), 2.0))
    assert torch.equal(out[:, 2], torch.full((2, 2, 2), 0.375))
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    assert {"mean", "std"} <= set(model.state_dict())
    assert isinstance(model.net, nn.Identity) and model.normalization is norm
    with pytest.raises(DmeError, match="3-channel"):
        model(torch.rand(1, 1, 2, 2))
    gray = NormalizedModel(nn.Identity(), Normalization((0.5,), (0.25,)))
    assert torch.equal(gray(torch.ones(1, 3, 1, 1)), torch.full((1, 3, 1, 1), 2.0))


def test_normalized_model_wraps_a_classifier():
    net = create_model("tiny_cnn", 5, in_chans=3)
    model = NormalizedModel(net, Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - model.mean) / model.std))


# ---------------------------------------------------------------------------------------------------------------------
# pretrained weights
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16", "alexnet"])
def test_pretrained_true_offline_fails_fast_naming_the_local_option(offline, connections, name):
    with pytest.raises(DmeError) as e:
        create_model(name, 7, img_size=64, pretrained=True)
    assert connections == []
    msg = str(e.value)
    assert "offline" in msg and "pretrained=/path/to/checkpoint.pth" in msg and name in msg


def test_pretrained_true_without_hub_weights_names_the_local_option():
    with pytest.raises(DmeError, match="pretrained=/path/to/checkpoint.pth"):
        create_model("cnn32", 7, pretrained=True)


@pytest.fixture
def hung_network(monkeypatch):
    """No offline flag, and a network whose connections never answer (what timm would wait ~46 s on)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    release = threading.Event()

    calls: list[float | None] = []

    def never_answers(address, timeout=None, *args, **kwargs):
        calls.append(timeout)
        release.wait(30)
        raise OSError("test network released")

    monkeypatch.setattr(pretrained_mod.socket, "create_connection", never_answers)
    clear_offline_cache()
    yield {"calls": calls, "release": release}
    release.set()
    clear_offline_cache()


def test_hung_network_is_detected_within_the_probe_timeout(hung_network):
    """Without a stopwatch: the error comes while the connection still hangs (so the probe's own bound, not the
    network, ended the wait), the probe's timeout is the documented one, and a second request reuses the answer."""
    with pytest.raises(DmeError, match=r"did not answer.*pretrained=/path/to/checkpoint.pth"):
        create_model("resnet18", 7, pretrained=True)
    assert not hung_network["release"].is_set()
    assert hung_network["calls"] == [pretrained_mod.OFFLINE_PROBE_TIMEOUT_S]
    assert pretrained_mod.OFFLINE_PROBE_TIMEOUT_S <= 2.0
    with pytest.raises(DmeError):
        create_model("resnet18", 7, pretrained=True)
    assert len(hung_network["calls"]) == 1  # cached: no second probe, no second wait


def _populate_hf_cache(cache: os.PathLike, repo: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The on-disk layout `hf download` leaves: refs/main → snapshot commit → file."""
    from pathlib import Path

    from safetensors.torch import save_file

    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snap / "model.safetensors"))


def test_pretrained_true_offline_uses_a_populated_hub_cache(offline, connections):
    import timm

    torch.manual_seed(1)
    imagenet = timm.create_model("resnet18", num_classes=1000).state_dict()
    _populate_hf_cache(offline, "timm/resnet18.a1_in1k", imagenet)

    model = create_model("resnet18", 7, img_size=224, pretrained=True)
    assert connections == []
    sd = model.state_dict()
    assert torch.equal(sd["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(sd["layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"])
    assert sd["fc.weight"].shape == (7, 512)

    cifar = create_model("resnet18", 7, in_chans=1, img_size=32, pretrained=True).state_dict()
    assert cifar["conv1.weight"].shape == (64, 1, 3, 3)  # fresh CIFAR stem
    assert torch.equal(cifar["layer1.0.conv1.weight"], imagenet["layer1.0.conv1.weight"])


def test_hf_hub_id_offline_without_cache_fails_fast(offline, connections):
    with pytest.raises(DmeError, match="hf download"):
        create_model("tiny_cnn", 7, pretrained="hf-hub:someone/some-model")
    assert connections == []


def test_hf_hub_id_loads_from_the_cache(offline):
    torch.manual_seed(2)
    source = create_model("tiny_cnn", 7)
    _populate_hf_cache(offline, "someone/tiny", source.state_dict())
    model = create_model("tiny_cnn", 7, pretrained="hf-hub:someone/tiny")
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "folder", "normalized", "wrapped"])
def test_local_checkpoint_loads_exactly(tmp_path, fmt):
    torch.manual_seed(3)
    source = create_model("cnn32", 7, in_chans=3, img_size=32)
    with torch.no_grad():  # make BatchNorm buffers non-default so they are checked too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_()
    sd = source.state_dict()
    if fmt == "pth":
        path = tmp_path / "victim.pth"
        torch.save(sd, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "victim.safetensors"
        save_file(sd, str(path))
    elif fmt == "folder":
        path = tmp_path / "bundle"
        path.mkdir()
        torch.save(sd, path / "weights.pt")
    elif fmt == "normalized":
        path = tmp_path / "normalized.pth"
        torch.save(NormalizedModel(source, Normalization((0.5,) * 3, (0.5,) * 3)).state_dict(), path)
    else:
        path = tmp_path / "train-state.pth"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)

    model = create_model("cnn32", 7, in_chans=3, img_size=32, pretrained=str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_local_checkpoint_with_other_num_classes_skips_the_head(tmp_path, caplog):
    torch.manual_seed(4)
    source = create_model("cnn32", 10, img_size=32)
    path = tmp_path / "ten-classes.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="distributed_me.models.pretrained"):
        model = create_model("cnn32", 4, img_size=32, pretrained=path)
    loaded, sd = model.state_dict(), source.state_dict()
    assert loaded["fc.weight"].shape == (4, 2048)
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text


def test_local_checkpoint_adapts_rgb_first_conv_to_gray(tmp_path):
    source = create_model("cnn32", 7, in_chans=3, img_size=32)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    model = create_model("cnn32", 7, in_chans=1, img_size=32)
    report = load_checkpoint(model, path)
    assert report.adapted == ["features.0.weight"]
    w_rgb, w_gray = source.state_dict()["features.0.weight"], model.state_dict()["features.0.weight"]
    assert torch.allclose(w_gray, w_rgb.sum(dim=1, keepdim=True))


def test_checkpoint_of_another_architecture_is_an_error(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(create_model("tiny_cnn", 7).state_dict(), path)
    with pytest.raises(DmeError, match="another architecture"):
        create_model("cnn32", 7, pretrained=path)


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(DmeError, match="neither an existing checkpoint"):
        create_model("cnn32", 7, pretrained=str(tmp_path / "nope.pth"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DmeError, match="no checkpoint"):
        create_model("cnn32", 7, pretrained=empty)


def test_pretrained_strings_from_a_cli():
    assert isinstance(create_model("tiny_cnn", 3, pretrained="false"), TinyCNN)
    assert isinstance(create_model("tiny_cnn", 3, pretrained=""), TinyCNN)
