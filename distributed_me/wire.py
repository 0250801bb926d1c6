"""The wire format of ``POST /v1/victims/{name}/predict``: request bodies in, answers out. No Ray.

Requests carry a batch of images, as

- ``application/x-npy`` (or ``application/octet-stream``): the bytes of ``numpy.save`` (no pickles), either uint8
  NHWC pixels or float32/float64 NCHW in [0, 1] — the cheap format attackers should use;
- ``application/json``: ``{"images": nested lists, "dtype": "float32" | "uint8"}`` with the same layouts.

Answers are JSON (:meth:`Answer.to_json`): float32 scores survive the round trip exactly, so an HTTP client sees the
very numbers an in-process client does. Every failure is a :class:`WireError` carrying the HTTP status to return.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch

from .errors import DmeError
from .oracle import validate_batch

NPY_TYPES = ("application/x-npy", "application/octet-stream")
#: an .npy header describes dtype, order and shape in well under a kilobyte; numpy's own cap is 10,000 bytes
MAX_NPY_HEADER = 4096
JSON_TYPE = "application/json"


class WireError(Exception):
    """A request the API refuses: ``status`` (4xx) and a message saying what was wrong."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def encode_npy(images: np.ndarray | torch.Tensor) -> bytes:
    """A batch as ``numpy.save`` bytes (float NCHW as float32, uint8 NHWC as is)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype != np.uint8:
        images = images.astype(np.float32, copy=False)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
    return buf.getvalue()


def decode_body(body: bytes, content_type: str | None) -> np.ndarray:
    """Request body → array (uint8 NHWC or float NCHW), or a 400 saying what could not be read."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not body:
        raise WireError(400, "empty request body: send a batch of images (application/x-npy or application/json)")
    if ctype in NPY_TYPES:
        stream = io.BytesIO(body)
        try:
            arr = np.load(stream, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
        except Exception as e:  # ValueError for pickles and bad headers, EOFError/OSError for truncation
            raise WireError(400, f"body is not a numpy .npy array ({type(e).__name__}: {e})") from None
        if not isinstance(arr, np.ndarray):
            raise WireError(400, "body must hold one .npy array, not an .npz archive")
        if stream.tell() != len(body):
            raise WireError(400, f"{len(body) - stream.tell()} bytes after the .npy array: send exactly one array")
    elif ctype == JSON_TYPE:
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WireError(400, f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise WireError(400, "JSON nested too deeply: images are 4-D (N, C, H, W or N, H, W, C)") from None
        except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
            raise WireError(400, f"body holds a number out of range ({e})") from None
        if not isinstance(doc, dict) or "images" not in doc:
            raise WireError(422, 'JSON body must be an object {"images": [...], "dtype": "float32" | "uint8"}')
        dtype = doc.get("dtype", "float32")
        if dtype not in ("float32", "uint8"):
            raise WireError(422, f"dtype {dtype!r} is not supported; use 'float32' (NCHW in [0, 1]) or 'uint8' (NHWC)")
        try:
            arr = np.asarray(doc["images"], dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise WireError(422, f"'images' must be a rectangular nested list of numbers ({e})") from None
        except (OverflowError, RecursionError):
            raise WireError(422, "'images' holds a number too large for a float, or nests too deeply") from None
        if dtype == "uint8":
            if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(arr == np.round(arr))):
                raise WireError(422, "uint8 images must hold whole numbers in [0, 255]")
            arr = arr.astype(np.uint8)
        else:
            arr = arr.astype(np.float32)
    else:
        raise WireError(415, f"unsupported content type {content_type!r}; use application/x-npy or application/json")
    if arr.dtype not in (np.uint8, np.float32, np.float64, np.float16):
        raise WireError(422, f"image dtype {arr.dtype} is not supported; send uint8 (NHWC) or float32 (NCHW in [0, 1])")
    return arr


def validate_images(arr: np.ndarray, input_shape: tuple[int, int, int], max_images: int) -> torch.Tensor:
    """Shape/range/finiteness checks shared with the in-process Oracle, plus the per-request size cap (413)."""
    if arr.ndim >= 1 and arr.shape[0] > max_images:
        raise WireError(413, f"{arr.shape[0]} images in one request; the limit is {max_images}: split the batch")
    try:
        return validate_batch(arr, input_shape)
    except DmeError as e:
        raise WireError(422, str(e)) from None


def input_hash(x: torch.Tensor) -> str:
    """A fingerprint of the canonical float32 batch: equal for the same images whatever encoding carried them."""
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
