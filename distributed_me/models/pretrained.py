"""Pretrained weights without surprises: hub weights when online, local checkpoints always, fast failure offline.

Why this module exists: the benchmark runs on clusters without internet. timm's ``pretrained=True`` on such a machine
spends ~46 s in DNS retries before failing with a hub error that does not say what to do (see STACK-NOTES, "Models
offline"). Here every download is preceded by :func:`offline_reason`, which answers in at most ~2 s (``HF_HUB_OFFLINE``
set, or a DNS lookup + TCP connect in a daemon thread that does not finish in time), and an offline request that the
local caches cannot satisfy raises a :class:`~distributed_me.errors.DmeError` naming the local alternatives:
``pretrained=/path/to/checkpoint.pth`` or a pre-populated Hugging Face / torch hub cache.

Local checkpoints (``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors``, or a folder holding one) are loaded by
:func:`load_checkpoint`, which keeps whatever fits and says what did not: tensors whose shape differs (typically the
classifier head when ``num_classes`` differs) are skipped and logged, a first conv trained on another channel count is
adapted (RGB→gray sums the kernels, as timm does), and ViT position embeddings are resampled to the new grid. A
checkpoint that matches less than half of the model's tensors is an error: it is almost surely another architecture.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from ..errors import DmeError

logger = logging.getLogger(__name__)

HF_HOST = "huggingface.co"
OFFLINE_PROBE_TIMEOUT_S = 2.0
_PROBE_TTL_S = 300.0  # network state is re-probed after this long; within it, create_model calls cost nothing

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Preferred names inside a checkpoint folder (Hugging Face layout first), before any other file with a known suffix.
_PREFERRED_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt", "checkpoint.pth")
# Wrapper keys under which training scripts commonly nest the state dict.
_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model", "net", "module")
# Prefixes added by DDP, torch.compile, NormalizedModel and Lightning-style wrappers.
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
# Buffers of NormalizedModel that a bare network does not have.
_WRAPPER_BUFFERS = ("mean", "std")
MIN_LOADED_FRACTION = 0.5

_probe_cache: dict[tuple[str, int], tuple[float, str | None]] = {}
_probe_lock = threading.Lock()

LOCAL_ALTERNATIVE = (
    "Pass pretrained=/path/to/checkpoint.pth (a .pt/.pth/.safetensors state dict, or a folder holding one) instead"
)


# ----------------------------------------------------------------------------------------------------------------------
# offline detection
# ----------------------------------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_offline_flag() -> str | None:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` now, or as huggingface_hub read them at its import."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name}=1"
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        pass
    return None


def _proxy_target() -> tuple[str, int] | None:
    """With an HTTPS proxy the proxy is what must answer; the target host may not even resolve locally."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        url = os.environ.get(name)
        if url:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.hostname:
                return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    return None


def _probe(host: str, port: int, timeout: float) -> str | None:
    """DNS lookup + TCP connect in a daemon thread; ``None`` when reachable, else why not.

    ``getaddrinfo`` ignores socket timeouts, so the thread is what bounds the wait; a hung lookup is left behind
    (daemon, harmless) rather than waited for.
    """
    target = _proxy_target() or (host, port)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            with socket.create_connection(target, timeout=timeout):
                result["ok"] = True
        except OSError as e:
            result["error"] = e

    thread = threading.Thread(target=run, name=f"dme-probe-{target[0]}", daemon=True)
    thread.start()
    thread.join(timeout)
    if result.get("ok"):
        return None
    via = f" (via proxy {target[0]}:{target[1]})" if target != (host, port) else ""
    if "error" in result:
        return f"{host}{via} is unreachable ({result['error']})"
    return f"{host}{via} did not answer within {timeout:g} s"


def offline_reason(host: str = HF_HOST, port: int = 443, timeout: float = OFFLINE_PROBE_TIMEOUT_S) -> str | None:
    """``None`` if ``host`` looks reachable, else a short reason. Answers within ~``timeout`` seconds, cached a while.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) counts as offline for every host: it is how users and tests say
    "never touch the network".
    """
    flag = _hf_offline_flag()
    if flag:
        return flag
    key = (host, port)
    now = time.monotonic()
    with _probe_lock:
        cached = _probe_cache.get(key)
        if cached and now - cached[0] < _PROBE_TTL_S:
            return cached[1]
    reason = _probe(host, port, timeout)
    with _probe_lock:
        _probe_cache[key] = (time.monotonic(), reason)
    if reason:
        logger.info("treating the network as offline: %s", reason)
    return reason


def is_offline(host: str = HF_HOST, timeout: float = OFFLINE_PROBE_TIMEOUT_S) -> bool:
    return offline_reason(host, timeout=timeout) is not None


def clear_offline_cache() -> None:
    """Forget probe results (tests; a machine whose network just came up)."""
    with _probe_lock:
        _probe_cache.clear()


# ----------------------------------------------------------------------------------------------------------------------
# hub files
# ----------------------------------------------------------------------------------------------------------------------


def split_hf_id(hub_id: str) -> tuple[str, str | None]:
    """``"hf-hub:org/name@rev"`` or ``"org/name@rev"`` → ``("org/name", "rev")``."""
    repo = hub_id.removeprefix("hf-hub:").removeprefix("hf_hub:")
    repo, _, revision = repo.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise DmeError(f"bad Hugging Face hub id {hub_id!r}: expected 'hf-hub:org/name' (optionally '@revision')")
    return repo, revision or None


def resolve_hf_file(hub_id: str, filenames: tuple[str, ...], what: str) -> Path:
    """Path of the first of ``filenames`` in hub repo ``hub_id``: from the local cache when offline, else downloaded.

    ``what`` names the request in error messages (e.g. ``"pretrained=True for 'resnet18'"``).
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, revision = split_hf_id(hub_id)
    reason = offline_reason(HF_HOST)
    if reason:
        for filename in filenames:
            hit = try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(hit, str):
                logger.info("offline: using cached %s/%s", repo, filename)
                return Path(hit)
        raise DmeError(
            f"{what} needs the weights of hub repo {repo!r}, but the machine is offline ({reason}) and they are not "
            f"in the local Hugging Face cache. {LOCAL_ALTERNATIVE}, or pre-populate the Hugging Face cache on a "
            f"connected machine (`hf download {repo}`, then copy ~/.cache/huggingface/hub or point HF_HUB_CACHE at it)."
        )
    last: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except LocalEntryNotFoundError as e:  # the download itself failed: network went away mid-way
            raise DmeError(f"{what}: could not download {repo}/{filename} ({e}). {LOCAL_ALTERNATIVE}.") from e
        except EntryNotFoundError as e:  # the repo exists but has no such file: try the next name
            last = e
        except Exception as e:  # repository not found, gated, HTTP errors: all user-fixable
            raise DmeError(f"{what}: could not fetch {repo}/{filename} from the hub ({e}). {LOCAL_ALTERNATIVE}.") from e
    raise DmeError(f"{what}: hub repo {repo!r} has none of {', '.join(filenames)} ({last})")


def resolve_url_file(url: str, what: str) -> Path:
    """A weights URL (torchvision) → local file in the torch hub cache, downloading only when online."""
    from torch.hub import download_url_to_file, get_dir

    cached = Path(get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    if cached.is_file():
        return cached
    host = urlsplit(url).hostname or HF_HOST
    reason = offline_reason(host)
    if reason:
        raise DmeError(
            f"{what} needs {url}, but the machine is offline ({reason}) and the file is not in the torch hub cache. "
            f"{LOCAL_ALTERNATIVE}, or download it on a connected machine and place it at {cached}."
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(cached), progress=False)
    except Exception as e:
        raise DmeError(f"{what}: could not download {url} ({e}). {LOCAL_ALTERNATIVE}.") from e
    return cached


# ----------------------------------------------------------------------------------------------------------------------
# local checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the one checkpoint inside a folder (Hugging Face names preferred)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise DmeError(f"checkpoint {str(p)!r} does not exist; pretrained= takes a checkpoint file or a folder")
    for name in _PREFERRED_NAMES:
        if (p / name).is_file():
            return p / name
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise DmeError(f"no checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)}) in folder {str(p)!r}")
    raise DmeError(
        f"folder {str(p)!r} holds several checkpoints ({', '.join(f.name for f in found)}); pass the file itself"
    )


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from the usual training-script containers. Never unpickles code."""
    p = find_checkpoint(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DmeError(f"cannot read checkpoint {str(p)!r}: {e}") from e
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if _is_tensor_dict(obj) or not isinstance(obj, dict):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, dict):
        raise DmeError(f"checkpoint {str(p)!r} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DmeError(f"checkpoint {str(p)!r} holds no tensors (keys: {', '.join(list(obj)[:8])})")
    return tensors


def _strip_wrappers(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop prefixes a wrapper added (``module.``, ``net.`` of NormalizedModel, …) when the model lacks them."""
    for _ in range(len(_STRIP_PREFIXES)):
        keys = [k for k in sd if k not in _WRAPPER_BUFFERS]
        prefix = next(
            (
                p
                for p in _STRIP_PREFIXES
                if keys and all(k.startswith(p) for k in keys) and not any(k.startswith(p) for k in model_keys)
            ),
            None,
        )
        if prefix is None:
            break
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k not in _WRAPPER_BUFFERS or k in model_keys}
    return sd


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did, for logs and tests."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first conv converted to another channel count
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _vit_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample ViT position/patch embeddings to the model's grid (timm's own filter), so img_size may differ."""
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    except ImportError:  # pragma: no cover
        return sd
    if not isinstance(model, VisionTransformer):
        return sd
    try:
        return checkpoint_filter_fn(sd, model)
    except Exception as e:  # keep the raw dict; mismatches are then skipped and logged
        logger.warning("could not resample ViT checkpoint to the model's grid (%s); mismatching tensors skipped", e)
        return sd


def load_state_dict_into(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict"
) -> LoadReport:
    """Load what fits of ``state_dict`` into ``model``; skip (and log) what does not. Raises if too little fits."""
    target = model.state_dict()
    sd = _vit_filter(_strip_wrappers(dict(state_dict), set(target)), model)
    report = LoadReport(source=source)
    to_load: dict[str, torch.Tensor] = {}
    for key, want in target.items():
        have = sd.get(key)
        if have is None:
            report.missing.append(key)
        elif have.shape == want.shape:
            to_load[key] = have
            report.loaded.append(key)
        elif have.ndim == 4 and want.ndim == 4 and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            from timm.models import adapt_input_conv

            try:
                to_load[key] = adapt_input_conv(want.shape[1], have.float()).to(want.dtype)
                report.adapted.append(key)
                report.loaded.append(key)
            except (NotImplementedError, ValueError):
                report.skipped.append((key, tuple(have.shape), tuple(want.shape)))
        else:
            report.skipped.append((key, tuple(have.shape), tuple(want.shape)))
    report.unexpected = sorted(set(sd) - set(target))

    # Buffers such as BatchNorm's num_batches_tracked carry no learned information: judge by parameters.
    param_keys = {k for k, _ in model.named_parameters()}
    n_params = len(param_keys) or len(target)
    n_loaded = len([k for k in report.loaded if k in param_keys]) if param_keys else len(report.loaded)
    if n_loaded < MIN_LOADED_FRACTION * n_params:
        shown = ", ".join(list(sd)[:6])
        raise DmeError(
            f"checkpoint {source} fits only {n_loaded} of {n_params} parameter tensors of {type(model).__name__}: "
            f"it was probably saved from another architecture (its first keys: {shown})"
        )
    model.load_state_dict(to_load, strict=False)

    if report.skipped:
        logger.warning(
            "checkpoint %s: skipped %d tensor(s) whose shape differs (expected when num_classes differs): %s",
            source,
            len(report.skipped),
            "; ".join(f"{k} {tuple(a)}→{tuple(b)}" for k, a, b in report.skipped),
        )
    if report.adapted:
        logger.info("checkpoint %s: adapted input conv to the model's channels: %s", source, ", ".join(report.adapted))
    missing = [k for k in report.missing if k in param_keys]
    if missing:
        logger.warning("checkpoint %s: %d parameter(s) left at init: %s", source, len(missing), ", ".join(missing))
    if report.unexpected:
        logger.info("checkpoint %s: ignored %d unused tensor(s): %s", source, len(report.unexpected),
                    ", ".join(report.unexpected[:10]) + (" …" if len(report.unexpected) > 10 else ""))
    logger.info("checkpoint %s: loaded %d of %d tensors", source, len(report.loaded), len(target))
    return report


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a local checkpoint file or folder into ``model`` (see :func:`load_state_dict_into` for what is kept)."""
    file = find_checkpoint(path)
    return load_state_dict_into(model, read_state_dict(file), source=str(file))


def load_pretrained_source(model: nn.Module, source: str, what: str) -> LoadReport:
    """``pretrained=<str>``: an ``hf-hub:`` id or a local path, loaded into an already built ``model``."""
    if source.startswith(("hf-hub:", "hf_hub:")):
        file = resolve_hf_file(source, ("model.safetensors", "pytorch_model.bin"), what)
        return load_state_dict_into(model, read_state_dict(file), source=f"{source} ({file})")
    if not Path(source).expanduser().exists():
        raise DmeError(
            f"{what}: {source!r} is neither an existing checkpoint file/folder nor an 'hf-hub:org/name' id"
        )
    return load_checkpoint(model, source)
