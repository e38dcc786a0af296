"""Checking the input images of an edit request, the way fal's runner would fetch them.

fal downloads every ``image_urls`` entry (and ``mask_image_url``) without auth headers, so they
must be public or presigned (fal-protocol §4.2). The emulator does the same: http(s) URLs are
fetched with httpx (TLS verified against the emulator's CA bundle, so the emulator's own URLs
and public CAs both verify), ``data:`` URIs are decoded, and the bytes must be an image.
The emulator's own ``/files/...`` URLs are resolved in-process (no network, no counters, no
faults). A failure ends the request with fal's 422 shape, ``loc: ["body", "image_urls"]``.
Each input read is recorded as ``(field, sha256 of its bytes)`` in the list passed to
:meth:`InputFetcher.check` (``RequestInfo.input_sha256``), so a test can show that the bytes
which reached "fal" are the user's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlsplit

from prefect_gptimage.testing.images import is_image
from prefect_gptimage.testing.records import Failure

if TYPE_CHECKING:
    import httpx

MAX_INPUT_BYTES = 50 * 1024 * 1024
FETCH_TIMEOUT = 10.0


class InputFetcher:
    """Fetches input images (one shared httpx client, created on first use).

    ``resolve_own(url)`` returns the bytes of one of the emulator's own URLs (None when it does
    not exist), or ``...`` when ``url`` is not the emulator's.
    """

    def __init__(self, ca_bundle: str, resolve_own: Callable[[str], Any]) -> None:
        self._ca_bundle = ca_bundle
        self._resolve_own = resolve_own
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    def _http(self) -> httpx.Client:
        import httpx

        with self._lock:
            if self._client is None:
                context = ssl.create_default_context(cafile=self._ca_bundle)
                self._client = httpx.Client(
                    verify=context, timeout=FETCH_TIMEOUT, follow_redirects=True
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def fetch(self, url: str) -> bytes:
        """The bytes behind ``url``; raises ``ValueError`` with a human reason on failure."""
        if url.startswith("data:"):
            header, sep, payload = url[5:].partition(",")
            if not sep:
                raise ValueError("malformed data URI")
            try:
                if header.endswith(";base64"):
                    return base64.b64decode(payload, validate=True)
                return unquote_to_bytes(payload)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"malformed data URI ({exc})") from None
        own = self._resolve_own(url)
        if own is not ...:
            if own is None:
                raise ValueError("HTTP 404")
            return bytes(own)
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {scheme!r}")
        import httpx

        try:
            with self._http().stream("GET", url) as response:
                if response.status_code != 200:
                    raise ValueError(f"HTTP {response.status_code}")
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_INPUT_BYTES:
                        raise ValueError("file too large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from None

    def check(
        self, arguments: dict[str, Any], read: list[tuple[str, str]] | None = None
    ) -> Failure | None:
        """None when every input image is fetchable and an image, else the request's failure.

        ``read`` receives ``(field, sha256)`` of each input fetched, in order.
        """
        targets = [("image_urls", str(u)) for u in arguments.get("image_urls") or []]
        if arguments.get("mask_image_url"):
            targets.append(("mask_image_url", str(arguments["mask_image_url"])))
        for field, url in targets:
            shown = url if len(url) < 120 else url[:117] + "..."
            try:
                data = self.fetch(url)
            except Exception as exc:
                return Failure.validation(
                    field, f"Could not download the file at {shown}: {exc}", "file_download_error"
                )
            if read is not None:
                read.append((field, hashlib.sha256(data).hexdigest()))
            if not is_image(data):
                return Failure.validation(
                    field, f"The file at {shown} is not a valid image", "image_load_error"
                )
        return None
