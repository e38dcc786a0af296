"""The fal client layer: fal's queue over the unmodified ``fal_client``, and media downloads.

This package imports nothing from Prefect (a test enforces it): it can be used from any Python
program, and the Prefect tasks in :mod:`prefect_gptimage.tasks` are thin wrappers over it. Names
load on first use: ``fal_client`` reads its hosts from the environment when first imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._lazy import lazy_exports

_EXPORTS = {
    "AsyncFalQueueClient": "async_client",
    "FalQueueClient": "client",
    "MediaPolicy": "media",
    "RequestStatus": "polling",
    "download_image_file": "media",
}

__all__ = [
    "AsyncFalQueueClient",
    "FalQueueClient",
    "MediaPolicy",
    "RequestStatus",
    "download_image_file",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from prefect_gptimage.fal.async_client import AsyncFalQueueClient
    from prefect_gptimage.fal.client import FalQueueClient
    from prefect_gptimage.fal.media import MediaPolicy, download_image_file
    from prefect_gptimage.fal.polling import RequestStatus
