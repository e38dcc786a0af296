"""The policies the tasks hand to the layers below, read from the package settings.

The decisions themselves live below (:mod:`prefect_gptimage.retry`,
:class:`~prefect_gptimage.fal.media.MediaPolicy`); this module only fills them from
:class:`~prefect_gptimage.settings.GptImageSettings`, so the client layer never reads settings.
"""

from __future__ import annotations

from prefect_gptimage.fal.media import MediaPolicy
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.settings import get_settings

__all__ = ["media_policy", "retry_policy"]


def retry_policy() -> RetryPolicy:
    """The retry policy of every call: ``PREFECT_GPTIMAGE_RETRY_BUDGET`` seconds of retrying."""
    return RetryPolicy(budget=get_settings().retry_budget)


def media_policy() -> MediaPolicy:
    """Allowed media hosts and the size limit, from ``PREFECT_GPTIMAGE_*``."""
    settings = get_settings()
    return MediaPolicy(
        allowed_hosts=tuple(settings.allowed_media_hosts),
        max_bytes=settings.max_download_bytes,
    )
