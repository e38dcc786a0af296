"""What fal keeps of a request, as the submit's headers (fal-protocol §2.2, §4.6).

* ``store_io=False`` sends ``X-Fal-Store-IO: 0``: fal does not store the request's JSON input
  and output payloads (its request history; 30 days by default). The generated media on fal's
  CDN are not affected.
* ``media_expires=N`` sends ``X-Fal-Object-Lifecycle-Preference:
  {"expiration_duration_seconds": N}``: fal deletes the images it generated for this request
  from its CDN after N seconds (default: fal's, at least 7 days). Expired files are gone for
  good, so they must be downloaded and staged before then (:func:`lifetime_warning`).

Example:
    >>> headers = Retention(store_io=False, media_expires=3600).headers()
    >>> headers["X-Fal-Store-IO"], headers["X-Fal-Object-Lifecycle-Preference"]
    ('0', '{"expiration_duration_seconds": 3600}')
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["LIFECYCLE_HEADER", "STORE_IO_HEADER", "Retention", "lifetime_warning"]

STORE_IO_HEADER = "X-Fal-Store-IO"
LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"


@dataclass(frozen=True)
class Retention:
    """What fal may keep of a request (see the module docs)."""

    store_io: bool = True
    media_expires: int | None = None

    def __post_init__(self) -> None:
        if self.media_expires is not None and self.media_expires < 1:
            raise ValueError(f"media_expires must be >= 1 second, got {self.media_expires!r}")

    def headers(self) -> dict[str, str]:
        """The submit headers that ask for this retention (none for fal's defaults)."""
        out: dict[str, str] = {}
        if not self.store_io:
            out[STORE_IO_HEADER] = "0"
        if self.media_expires is not None:
            out[LIFECYCLE_HEADER] = json.dumps({"expiration_duration_seconds": self.media_expires})
        return out


def lifetime_warning(media_expires: int | None, request_timeout: float) -> str | None:
    """Why a media lifetime may expire before the images are staged, or None when it cannot.

    The images are downloaded right after fal completes the request, but a request may wait at
    fal up to ``request_timeout`` seconds, and a run killed before staging resumes later from
    the cached result, whose URLs are then gone: a lifetime shorter than the request timeout
    (plus the retry budget's margin of 10 minutes) cannot be promised.

    Example:
        >>> lifetime_warning(60, 600.0) is not None
        True
        >>> lifetime_warning(86400, 600.0) is None
        True
    """
    if media_expires is None:
        return None
    needed = request_timeout + 600
    if media_expires >= needed:
        return None
    return (
        f"fal keeps this run's images only {media_expires} s (media_expires), less than the "
        f"{needed:.0f} s a request may take to be fetched and staged (its timeout plus 10 "
        "minutes): an image not staged by then is lost, and a re-run after that pays again"
    )
