"""Images as a chat request carries them: data URLs with base64 bytes, decoded only after their size is known.

The MIME type of a data URL is not trusted (clients send ``image/jpeg`` for PNGs, or ``image`` with no subtype):
the bytes are sniffed. The pixel count is read from the image header and refused before the pixels are decoded.
``http(s)://`` URLs are never fetched; ``file://`` URLs are opened only inside the folder ``--media-dir`` allows.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qvlc.runtime.media import MAX_IMAGE_PIXELS, ImageError, open_image
from qvlc.serve.errors import ApiError

DEFAULT_MAX_BYTES = 32 << 20  # one image's encoded bytes


@dataclass(frozen=True)
class MediaLimits:
    max_pixels: int = MAX_IMAGE_PIXELS  # what `qvlc run` decodes at most
    max_bytes: int = DEFAULT_MAX_BYTES
    media_dir: Path | None = None  # file:// URLs are opened only inside this folder (resolved, symlinks too)


def _error(message: str, where: str, code: str = "invalid_image") -> ApiError:
    return ApiError(message, code=code, param=where)


def decode_image_url(url: str, limits: MediaLimits, where: str) -> Image.Image:
    """An ``image_url`` → an RGB image; ApiError (400) for anything that is not a bounded, decodable local image."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        return decode_image_bytes(_data_url_bytes(url, limits, where), limits, where)
    if scheme == "file":
        return decode_image_bytes(_local_file_bytes(url, limits, where), limits, where)
    if scheme in ("http", "https"):
        raise _error(f"{where}: image URLs are never fetched by qvlc serve", where, "unsupported_url")
    raise _error(f"{where}: the image must be a data URL (data:image/png;base64,...), got one starting "
                 f"{url[:24]!r}", where, "unsupported_url")


def _data_url_bytes(url: str, limits: MediaLimits, where: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        raise _error(f"{where}: a data URL needs ';base64,' before its bytes (data:image/png;base64,...)", where)
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise _error(f"{where}: the image is over {limits.max_bytes >> 20} MiB encoded", where, "image_too_large")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _error(f"{where}: the data URL's base64 cannot be decoded ({exc})", where, "invalid_base64") from None


def _local_file_bytes(url: str, limits: MediaLimits, where: str) -> bytes:
    if limits.media_dir is None:
        raise _error(f"{where}: file:// URLs are not opened unless qvlc serve is started with --media-dir FOLDER",
                     where, "unsupported_url")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise _error(f"{where}: file:// URLs name a local path (file:///folder/image.png)", where, "unsupported_url")
    root = limits.media_dir.resolve()
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if root not in path.parents or not path.is_file():
        raise _error(f"{where}: {parsed.path[:200]!r} is not a file inside the --media-dir folder", where,
                     "unsupported_url")
    if path.stat().st_size > limits.max_bytes:
        raise _error(f"{where}: the image file is over {limits.max_bytes >> 20} MiB", where, "image_too_large")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read(limits.max_bytes + 1)


def decode_image_bytes(raw: bytes, limits: MediaLimits, where: str) -> Image.Image:
    """The bounded open of ``qvlc.runtime.media.open_image``, its refusal as OpenAI's 400 error."""
    try:
        return open_image(raw, max_pixels=limits.max_pixels, what=f"{where}: the image", key=where)
    except ImageError as exc:
        limit = " (--max-image-pixels)" if exc.reason == "image_too_large" else ""
        raise _error(exc.problem + limit, where, exc.reason) from None
