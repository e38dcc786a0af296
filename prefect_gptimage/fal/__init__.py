"""The fal client layer: fal's queue over the unmodified ``fal_client``, and media downloads.

This package imports nothing from Prefect (a test enforces it): it can be used from any Python
program, and the Prefect tasks in :mod:`prefect_gptimage.tasks` are thin wrappers over it.
"""

from __future__ import annotations

from prefect_gptimage.fal.async_client import AsyncFalQueueClient
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.media import download_image_file
from prefect_gptimage.fal.polling import RequestStatus

__all__ = [
    "AsyncFalQueueClient",
    "FalQueueClient",
    "RequestStatus",
    "RetryPolicy",
    "download_image_file",
]
