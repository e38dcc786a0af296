"""The policies the tasks hand to the layers below, read from the package settings.

The decisions themselves live below (:mod:`prefect_gptimage.retry`,
:class:`~prefect_gptimage.fal.media.MediaPolicy`); this module only fills them from
:class:`~prefect_gptimage.settings.GptImageSettings`, so the client layer never reads settings.
"""

from __future__ import annotations

from prefect_gptimage.fal._transport import BodyLimits
from prefect_gptimage.fal.hosts import FAL_HOST_VARIABLES, configured_hosts
from prefect_gptimage.fal.media import MediaPolicy
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.settings import get_settings

__all__ = [
    "FAL_HOST_VARIABLES",
    "body_limits",
    "configured_fal_hosts",
    "media_policy",
    "retry_policy",
]


def retry_policy() -> RetryPolicy:
    """The retry policy of every call: ``PREFECT_GPTIMAGE_RETRY_BUDGET`` seconds of retrying."""
    settings = get_settings()
    return RetryPolicy(budget=settings.retry_budget, max_delay=settings.retry_max_delay)


def body_limits() -> BodyLimits:
    """The bounds of every fal answer: ``PREFECT_GPTIMAGE_MAX_RESULT_BYTES`` and
    ``PREFECT_GPTIMAGE_BODY_TIMEOUT``."""
    settings = get_settings()
    return BodyLimits(max_bytes=settings.max_result_bytes, timeout=settings.body_timeout)


def configured_fal_hosts() -> tuple[str, ...]:
    """The bare host names (no port) that ``FAL_QUEUE_RUN_HOST`` / ``FAL_RUN_HOST`` name
    (parsed in :mod:`prefect_gptimage.fal.hosts`).

    Only variables that are set count: fal's defaults (``queue.fal.run``, ``fal.run``) serve no
    media, which comes from ``*.fal.media``.
    """
    return configured_hosts()


def media_policy() -> MediaPolicy:
    """Allowed media hosts and the size limit, from ``PREFECT_GPTIMAGE_*``, plus the host(s)
    fal_client is configured to talk to (``FAL_QUEUE_RUN_HOST``, ``FAL_RUN_HOST``): a
    fal-compatible gateway, proxy or emulator serves its own images. Still https only, and
    every redirect hop is checked against the same list.
    """
    settings = get_settings()
    allowed = list(settings.allowed_media_hosts)
    allowed += [host for host in configured_fal_hosts() if host not in allowed]
    return MediaPolicy(
        allowed_hosts=tuple(allowed),
        max_bytes=settings.max_download_bytes,
        body_timeout=settings.body_timeout,
    )
