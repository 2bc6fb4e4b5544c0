"""``image_url`` parts -> encoded image bytes, with the server's limits.

- ``data:image/...;base64,...``: always accepted (the size is checked before decoding).
- a local path or ``file://`` URL: only when the server has an allowed image directory,
  and only for files whose real path (symlinks resolved) lies inside it.
- ``http(s)://``: off unless the server was started with ``--allow-remote-images``; then
  fetched with a time limit and the same size limit.

Decoding is left to the shared preprocessing (``vlmexport.core.preprocess.open_image``);
here the header is read once to refuse decompression bombs with 413 before any pixel
is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from PIL import Image

from ..core.preprocess import MAX_IMAGE_PIXELS
from .config import ServeConfig
from .errors import BadRequest, PayloadTooLarge


def load_image_url(url: str, cfg: ServeConfig, label: str) -> bytes:
    """The encoded bytes behind one ``image_url`` (``label`` names it in errors, e.g. 'messages[0] image 1')."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, cfg, label)
    elif scheme in ("http", "https"):
        data = _remote(url, cfg, label)
    elif scheme == "file" or url.startswith("/") or not scheme or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        data = _local(url, cfg, label)
    else:
        raise BadRequest(f"{label}: unsupported image URL scheme {scheme!r}; send a data: URL "
                         "(data:image/png;base64,...)", param="messages")
    check_header(data, label)
    return data


def _data_url(url: str, cfg: ServeConfig, label: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise BadRequest(f"{label}: a data: URL must be base64 (data:image/png;base64,...)", param="messages")
    if len(payload) * 3 // 4 > cfg.max_image_bytes:
        raise PayloadTooLarge(f"{label}: the image is larger than {cfg.max_image_bytes:,} bytes; downscale or "
                              "recompress it", param="messages", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{label}: the data: URL is not valid base64", param="messages") from None


def _local(url: str, cfg: ServeConfig, label: str) -> bytes:
    if cfg.allowed_image_dir is None:
        raise BadRequest(f"{label}: local image paths are off on this server; send a data: URL, or start the "
                         "server with --allowed-image-dir", param="messages")
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.lower().startswith("file:") else url
    root = Path(cfg.allowed_image_dir).resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequest(f"{label}: no such image file under the allowed directory", param="messages") from None
    if real != root and root not in real.parents:
        raise BadRequest(f"{label}: the image path is outside the server's allowed image directory; put the "
                         "file there or send a data: URL", param="messages")
    if not real.is_file():
        raise BadRequest(f"{label}: not a file", param="messages")
    if real.stat().st_size > cfg.max_image_bytes:
        raise PayloadTooLarge(f"{label}: the image is larger than {cfg.max_image_bytes:,} bytes; downscale or "
                              "recompress it", param="messages", code="image_too_large")
    return real.read_bytes()


def _remote(url: str, cfg: ServeConfig, label: str) -> bytes:
    if not cfg.allow_remote_images:
        raise BadRequest(f"{label}: remote image URLs are off on this server; send the image as a data: URL "
                         "(data:image/png;base64,...)", param="messages")
    req = urllib.request.Request(url, headers={"User-Agent": "vlmexport-serve"})
    try:
        with urllib.request.urlopen(req, timeout=cfg.remote_timeout_s) as resp:  # noqa: S310 (scheme checked)
            data = resp.read(cfg.max_image_bytes + 1)
    except (OSError, ValueError) as exc:
        raise BadRequest(f"{label}: the image URL could not be fetched ({exc.__class__.__name__})",
                         param="messages") from None
    if len(data) > cfg.max_image_bytes:
        raise PayloadTooLarge(f"{label}: the image is larger than {cfg.max_image_bytes:,} bytes; downscale or "
                              "recompress it", param="messages", code="image_too_large")
    return data


def check_header(data: bytes, label: str) -> None:
    """Refuse a decompression bomb (413) from the header alone; a broken file is left to the decoder (400)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        w = h = MAX_IMAGE_PIXELS  # Pillow refused it on its own (over twice its limit)
    except Exception:  # noqa: BLE001 - not an image at all: the decoder says so with a 400
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise PayloadTooLarge(f"{label}: the image is {w}x{h} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                              "decompression-bomb limit; downscale it first", param="messages",
                              code="image_too_large")
