"""What every flow checks before its first submit, so that nothing is paid for images that
cannot land (issue 12, item 3).

* the budget (``max_cost``) is a finite number >= 0: ``nan`` would switch the guard off;
* the bucket name follows S3's rules (locally) and, unless it is a dry run, the bucket exists
  and takes a write (:func:`prefect_gptimage.s3.preflight.probe_bucket`);
* the fal host is trusted for media: when ``FAL_QUEUE_RUN_HOST`` names a host other than fal's
  own queue, the images it returns are served from that host, so it must be in the allowed
  media hosts (:func:`prefect_gptimage.tasks.policies.media_policy`), or every image would be
  paid for and then refused at download. fal's own queue serves media from ``*.fal.media``,
  which the default allowlist has.

Each failure raises one error (``InvalidRequestError``, ``ConfigurationError`` or a permanent
``S3StagingError``) before anything is submitted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from prefect_gptimage.errors import ConfigurationError, InvalidRequestError
from prefect_gptimage.fal.hosts import DEFAULT_QUEUE_HOST, custom_queue_host
from prefect_gptimage.fal.media import host_allowed
from prefect_gptimage.retry import is_transient_redis_error
from prefect_gptimage.s3.clients import bucket_target
from prefect_gptimage.s3.models import S3Target
from prefect_gptimage.s3.preflight import probe_bucket, validate_bucket_name
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.locks import without_credentials
from prefect_gptimage.tasks.policies import media_policy

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "FAL_DEFAULT_QUEUE_HOST",
    "check_budget",
    "check_fal_media_host",
    "check_lock_service",
    "check_prefect_api",
    "preflight_bucket",
]

#: fal_client's default queue host (its media come from ``*.fal.media``, not from here).
FAL_DEFAULT_QUEUE_HOST = DEFAULT_QUEUE_HOST


def check_budget(max_cost: Any) -> float | None:
    """``max_cost`` as a float if it is None or a finite number >= 0, else InvalidRequestError."""
    if max_cost is None:
        return None
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)):
        raise InvalidRequestError("max_cost", f"must be a number of USD, got {max_cost!r}")
    value = float(max_cost)
    if not math.isfinite(value) or value < 0:
        raise InvalidRequestError(
            "max_cost", f"must be a finite number >= 0 (USD), got {max_cost!r}: nothing submitted"
        )
    return value


def check_fal_media_host() -> None:
    """ConfigurationError when a custom ``FAL_QUEUE_RUN_HOST`` is not an allowed media host."""
    setting = custom_queue_host()
    if setting is None:
        return
    if setting.host is None:
        raise ConfigurationError(
            f"FAL_QUEUE_RUN_HOST={setting.value!r} is not a host name (host or host:port)"
        )
    allowed = media_policy().allowed_hosts
    if not host_allowed(setting.host, allowed):
        raise ConfigurationError(
            f"FAL_QUEUE_RUN_HOST names {setting.host!r}, which is not an allowed media host "
            f"({', '.join(allowed)}): its images would be paid for and then refused at download. "
            "Add it to PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS; nothing submitted"
        )


#: Seconds the start-up checks wait for a service's first answer.
SERVICE_CHECK_TIMEOUT_S = 10.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def check_prefect_api() -> None:
    """ConfigurationError naming ``PREFECT_API_URL`` when the configured Prefect API does not
    answer its health check (nothing listening, or not a Prefect API). No URL configured
    (Prefect's temporary server): nothing to check here (the CLI starts that one itself)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return
    settings = {"timeout": SERVICE_CHECK_TIMEOUT_S}
    with get_client(sync_client=True, httpx_settings=settings) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise ConfigurationError(
            f"PREFECT_API_URL={without_credentials(url)} does not answer as a Prefect API "
            f"({_first_line(problem)}): start the server or fix the setting; nothing was submitted"
        )


def check_lock_service() -> None:
    """ConfigurationError naming ``PREFECT_GPTIMAGE_LOCK_URL`` when its Redis refuses this
    process (a wrong password, none given where one is required, a database it does not have,
    not a Redis at all). Redis unreachable or restarting is left to the lock itself, which
    rides it out under the retry policy and reports it per row
    (:class:`~prefect_gptimage.errors.LockServiceUnavailable`). Unset: nothing to check."""
    url = get_settings().lock_url
    if not url:
        return
    shown = without_credentials(url)
    try:
        from redis import Redis
    except ImportError:
        raise ConfigurationError(
            "PREFECT_GPTIMAGE_LOCK_URL needs redis-py: pip install 'prefect-gptimage[redis]'; "
            "nothing was submitted"
        ) from None
    try:
        client = Redis.from_url(
            url,
            socket_connect_timeout=SERVICE_CHECK_TIMEOUT_S,
            socket_timeout=SERVICE_CHECK_TIMEOUT_S,
        )
    except ValueError as exc:  # not a redis:// URL redis-py can read
        raise ConfigurationError(
            f"PREFECT_GPTIMAGE_LOCK_URL={shown!r} is not a Redis URL ({_first_line(exc)}); "
            "nothing was submitted"
        ) from None
    try:
        client.ping()
    except Exception as exc:
        if is_transient_redis_error(exc):
            return  # unreachable for now: the lock's own retries decide
        raise ConfigurationError(
            f"PREFECT_GPTIMAGE_LOCK_URL={shown}: the Redis lock service refused this process "
            f"({_first_line(exc)}): fix the password or database in the URL; nothing was "
            "submitted"
        ) from None
    finally:
        client.close()


def bucket_name(bucket: Any) -> str | None:
    """The bucket name of a flow's ``bucket`` parameter (a name or an ``S3Bucket`` block)."""
    if bucket is None or bucket == "":
        return None
    if isinstance(bucket, str):
        return bucket
    name = getattr(bucket, "bucket_name", None)
    return name if isinstance(name, str) else None


def preflight_bucket(
    bucket: Any,
    prefix: str | None,
    *,
    presign_expires: int,
    default_prefix: str = "gptimage",
    probe: bool = True,
) -> tuple[S3Target | None, S3Client | None]:
    """Check the fal media host and the bucket, then ``bucket_target(...)``.

    The name is checked locally first (so ``Bad_Bucket!`` or ``b`` never reach the network nor
    pydantic), then, with ``probe``, the bucket must take a write with the credentials the run
    will stage with (an ``S3Bucket`` block's own), and the Redis lock, if one is set, must let
    this process in (:func:`check_lock_service`).
    """
    check_fal_media_host()
    if probe:  # a dry run does not ask Redis; batch_to_s3 probes later, and asks it itself
        check_lock_service()
    name = bucket_name(bucket)
    if name is not None:
        validate_bucket_name(name)
    try:
        target, client = bucket_target(
            bucket, prefix, presign_expires=presign_expires, default_prefix=default_prefix
        )
    except ValidationError as exc:  # S3Target's own checks (prefix, presign_expires)
        raise InvalidRequestError.from_validation_error(exc) from None
    if target is not None and probe:
        probe_bucket(target, client)
    return target, client
