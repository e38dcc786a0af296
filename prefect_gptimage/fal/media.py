"""Download a generated image to disk and prove it is what fal promised.

* Streams to a temporary file beside the destination (never the whole body in memory), counting
  bytes against ``max_download_bytes`` and hashing (sha256) as it goes, then renames atomically.
* Each body must arrive within ``body_timeout`` seconds in all (httpx's timeout is per read, so a
  body trickled a few bytes at a time would otherwise never end): "body too slow" is transient.
* Accepts ``https://`` URLs on the allowed hosts only (:class:`MediaPolicy`; the tasks take it
  from ``PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS``, default fal's CDN ``*.fal.media``), every
  redirect hop included, and the ``data:`` URIs that ``sync_mode`` returns.
* Retries transient failures (statuses and transport errors, as :mod:`prefect_gptimage.retry`
  decides) under a :class:`~prefect_gptimage.retry.RetryPolicy`: the one layer that retries it.
* Decodes the file with Pillow: the format must be the requested ``output_format`` and the size
  the requested ``image_size`` (and the width/height fal reported).
* Idempotent: a file already at the destination is verified locally and reused, with no network.

Example (it talks to fal, so it is not run as a doctest)::

    img = download_image_file(
        ImageFile(url="https://v3.fal.media/files/x.png"), dest_dir="out", request_id="r1",
        endpoint="fal-ai/gpt-image-1.5", index=0, expected_format="png",
        expected_size=(1024, 1024))
    img.sha256
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import functools
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage._files import create_temp, sweep_stale
from prefect_gptimage.errors import PermanentDownloadError, TransientDownloadError
from prefect_gptimage.retry import GONE_STATUS_CODES, RetryPolicy, is_transient_status
from prefect_gptimage.schemas import CONTENT_TYPES, DownloadedImage, ImageFile, OutputFormat

PIL_FORMATS: dict[str, OutputFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_DATA_URI = re.compile(r"^data:(?P<ctype>[\w/+.-]+)?(?P<params>(;[\w=.-]+)*?);base64,", re.I)


class MediaPolicy(BaseModel):
    """Where images may come from, and how big they may be."""

    model_config = ConfigDict(frozen=True)

    allowed_hosts: tuple[str, ...] = Field(
        default=("fal.media", "*.fal.media"),
        description="Hosts images may be downloaded from ('*.x' matches subdomains of x).",
    )
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Largest image accepted.")
    body_timeout: float = Field(
        default=120.0, gt=0, description="Seconds one image body may take to arrive, in all."
    )


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` matches one of the allowed patterns (``*.fal.media`` style)."""
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in allowed)


def check_url(url: str, allowed: tuple[str, ...]) -> None:
    """Refuse anything but https on an allowed host (data: URIs are handled separately)."""
    parsed = httpx.URL(url)
    if parsed.scheme != "https":
        raise PermanentDownloadError(
            f"refusing to download {parsed.scheme or 'a relative'} URL: only https is allowed"
        )
    if parsed.userinfo:
        raise PermanentDownloadError(
            "refusing to download a URL with credentials in it (user@host)"
        )
    if not host_allowed(parsed.host, allowed):
        raise PermanentDownloadError(
            f"refusing to download from host {parsed.host!r}: not in "
            f"PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS ({', '.join(allowed)}): add it to that "
            "variable to allow it (the host named by fal_client's FAL_QUEUE_RUN_HOST or "
            "FAL_RUN_HOST is trusted without it)"
        )


#: What httpx reads from the environment when a client is built (TLS trust, proxies).
_CLIENT_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)


def _client_env() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in _CLIENT_ENV)


@functools.lru_cache(maxsize=8)
def _media_client(allowed: tuple[str, ...], env: tuple[str | None, ...]) -> httpx.Client:
    """One pooled client per allowlist (and CA bundle), shared by every download thread.

    Building an ``httpx.Client`` loads the CA bundle into a fresh TLS context: ~35 ms of CPU,
    more than the download itself on a fast network. A shared client also keeps connections to
    fal's CDN alive across images. ``httpx.Client`` is thread-safe. Every hop of a redirect is
    checked against the allowlist by the request hook. ``env`` (CA bundle, proxies) is part of
    the key because httpx reads it when the client is built. Connections are not capped here:
    the callers' threads already bound them.
    """

    def check_hop(request: httpx.Request) -> None:
        check_url(str(request.url), allowed)

    return httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(60.0, connect=15.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        event_hooks={"request": [check_hop]},
    )


if hasattr(os, "register_at_fork"):  # a forked child must not share the parent's connections
    os.register_at_fork(after_in_child=_media_client.cache_clear)


def safe_name(text: str) -> str:
    """A file-name-safe version of a request id."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:120] or "request"


@contextlib.contextmanager
def _temp_beside(final: Path) -> Iterator[tuple[Path, object]]:
    final.parent.mkdir(parents=True, exist_ok=True)
    # a killed run's parts: the body timeout bounds a live download far below ten minutes
    sweep_stale(final.parent, ".part-*", older_than=600)
    fd, tmp = create_temp(final.parent, ".part-")  # the umask's mode, as index.html beside it
    try:
        with os.fdopen(fd, "wb") as fh:
            yield tmp, fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream_https(url: str, fh: object, policy: MediaPolicy) -> None:
    limit = policy.max_bytes
    write = fh.write  # type: ignore[attr-defined]
    http = _media_client(policy.allowed_hosts, _client_env())
    try:
        with http.stream("GET", url) as response:
            status = response.status_code
            if status in GONE_STATUS_CODES:
                raise PermanentDownloadError(
                    f"image {url} is gone (HTTP {status}); fal keeps media at least 7 days"
                )
            if status >= 400 and is_transient_status(status, response.headers, media=True):
                raise TransientDownloadError(f"image download failed with HTTP {status}")
            if status >= 400:
                raise PermanentDownloadError(f"image download refused with HTTP {status}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > limit:
                raise PermanentDownloadError(
                    f"image is {declared} bytes, over the {limit}-byte limit"
                )
            received = 0
            started = time.monotonic()
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > limit:
                    raise PermanentDownloadError(f"image body exceeds the {limit}-byte limit")
                write(chunk)
                elapsed = time.monotonic() - started
                if elapsed > policy.body_timeout:
                    raise TransientDownloadError(
                        f"image body too slow: {received} bytes in {elapsed:.0f}s, over the "
                        f"{policy.body_timeout:.0f}s limit (PREFECT_GPTIMAGE_BODY_TIMEOUT)"
                    )
            if declared and received != declared:
                raise TransientDownloadError(
                    f"image body truncated: {received} of {declared} bytes"
                )
    except (PermanentDownloadError, TransientDownloadError):
        raise
    except httpx.TransportError as exc:
        raise TransientDownloadError(f"image download interrupted ({type(exc).__name__})") from None


def _write_data_uri(url: str, fh: object, policy: MediaPolicy) -> None:
    match = _DATA_URI.match(url)
    if not match:
        raise PermanentDownloadError("unsupported data: URI (expected data:<type>;base64,...)")
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise PermanentDownloadError(f"data: URI image exceeds the {policy.max_bytes}-byte limit")
    try:
        fh.write(base64.b64decode(payload, validate=True))  # type: ignore[attr-defined]
    except (binascii.Error, ValueError):
        raise PermanentDownloadError("data: URI is not valid base64") from None


def verify_image(
    path: Path, expected_format: OutputFormat, expected_size: tuple[int, int] | None
) -> tuple[int, int]:
    """Check ``path`` is an intact image of the expected format and size. Returns (width, height).

    ``Image.verify()`` walks the file's structure (for PNG every chunk's CRC, through IEND)
    without decoding pixels: it catches truncation and corruption at a fraction of the memory
    and CPU of a full decode, which matters when thousands of images pass through a batch.
    """
    try:
        with Image.open(path) as img:
            fmt = PIL_FORMATS.get(img.format or "")
            size = img.size
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PermanentDownloadError(f"downloaded bytes are not a readable image: {exc}") from None
    if fmt != expected_format:
        raise PermanentDownloadError(
            f"expected a {expected_format} image, got {fmt or 'an unknown format'}"
        )
    if expected_size is not None and size != expected_size:
        raise PermanentDownloadError(
            f"expected {expected_size[0]}x{expected_size[1]}, got {size[0]}x{size[1]}"
        )
    return size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_image_file(
    image: ImageFile,
    *,
    dest_dir: str | Path,
    request_id: str,
    endpoint: str,
    index: int,
    expected_format: OutputFormat,
    expected_size: tuple[int, int] | None = None,
    policy: MediaPolicy | None = None,
    retry: RetryPolicy | None = None,
) -> DownloadedImage:
    """Download (or reuse) one image and verify it. See the module docstring."""
    policy = policy or MediaPolicy()
    if image.width and image.height:
        reported = (image.width, image.height)
        if expected_size is not None and reported != expected_size:
            raise PermanentDownloadError(
                f"fal reported {reported}, but {expected_size} was requested"
            )
        expected_size = expected_size or reported
    final = Path(dest_dir) / f"{safe_name(request_id)}-{index}.{EXTENSIONS[expected_format]}"
    is_data = image.url.startswith("data:")
    if not is_data:
        check_url(image.url, policy.allowed_hosts)
    if final.exists():
        width, height = verify_image(final, expected_format, expected_size)
    else:
        for attempt in (retry or RetryPolicy()).retrying():
            with attempt, _temp_beside(final) as (tmp, fh):
                if is_data:
                    _write_data_uri(image.url, fh, policy)
                else:
                    _stream_https(image.url, fh, policy)
                fh.close()  # type: ignore[attr-defined]
                width, height = verify_image(tmp, expected_format, expected_size)
                os.replace(tmp, final)
    return DownloadedImage(
        path=str(final),
        source_url="data:" if is_data else image.url,
        request_id=request_id,
        endpoint=endpoint,
        index=index,
        content_type=CONTENT_TYPES[expected_format],
        format=expected_format,
        width=width,
        height=height,
        bytes=final.stat().st_size,
        sha256=sha256_file(final),
    )
