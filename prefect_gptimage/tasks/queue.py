"""Prefect tasks over fal's queue: submit, wait, fetch result, cancel.

The paid steps are cached (see :mod:`prefect_gptimage.tasks.cache`): :func:`submit_request` on
the normalized request, :func:`fetch_result` on the request id, both persisted the moment they
complete. ``refresh_cache=True`` submits anew; ``variant`` asks for a fresh image of an
identical request.

Example:
    >>> from prefect import flow
    >>> from prefect_gptimage import GptImageRequest, submit_request, fetch_result
    >>> @flow
    ... def poster() -> list[str]:
    ...     handle = submit_request(GptImageRequest(prompt="a tram in fog", quality="low"))
    ...     return [img.url for img in fetch_result(handle).images]
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from prefect_gptimage.credentials import FalCredentials, resolve_client
from prefect_gptimage.fal.polling import RequestStatus
from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle
from prefect_gptimage.tasks.cache import CACHE_EXPIRATION, RESULT_CACHE, SUBMIT_CACHE
from prefect_gptimage.tasks.retry import TRANSIENT_RETRIES

__all__ = ["cancel_request", "fetch_result", "submit_request", "wait_for_request"]


@task(
    name="gptimage-submit",
    task_run_name="submit {request.endpoint}",
    cache_policy=SUBMIT_CACHE,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
    **TRANSIENT_RETRIES,
)
def submit_request(
    request: AnyRequest,
    credentials: FalCredentials | None = None,
    variant: int = 0,
    start_timeout: float | None = None,
) -> RequestHandle:
    """Submit one request to fal's queue (the only billable call); cached and persisted.

    Example:
        >>> handle = submit_request(GptImageRequest(prompt="a koi pond", quality="low"))
        >>> handle.request_id
    """
    handle = resolve_client(credentials).submit(request, start_timeout=start_timeout)
    get_run_logger().info(
        "submitted %s to %s (%d image(s), %s quality)",
        handle.request_id,
        request.endpoint,
        request.num_images,
        request.quality,
    )
    return handle


@task(
    name="gptimage-wait",
    task_run_name="wait {handle.request_id}",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def wait_for_request(
    handle: RequestHandle,
    credentials: FalCredentials | None = None,
    timeout: float | None = None,
) -> RequestStatus:
    """Poll until the request completes, forwarding fal's logs and queue position.

    Polls adaptively (learns the usual latency; see :mod:`prefect_gptimage.fal.polling`). After
    ``timeout`` seconds the fal request is cancelled and the task fails.

    Example:
        >>> status = wait_for_request(handle, timeout=600)
    """
    return resolve_client(credentials).wait(handle, timeout=timeout, log=get_run_logger())


@task(
    name="gptimage-fetch-result",
    task_run_name="fetch {handle.request_id}",
    cache_policy=RESULT_CACHE,
    cache_expiration=CACHE_EXPIRATION,
    persist_result=True,
    **TRANSIENT_RETRIES,
)
def fetch_result(
    handle: RequestHandle,
    credentials: FalCredentials | None = None,
    wait: bool = True,
    timeout: float | None = None,
) -> GptImageOutput:
    """Fetch (after waiting, by default) the output of a request; cached on its request id.

    Example:
        >>> output = fetch_result(handle)
        >>> [img.url for img in output.images]
    """
    client = resolve_client(credentials)
    if wait:
        client.wait(handle, timeout=timeout, log=get_run_logger())
    return client.result(handle)


@task(
    name="gptimage-cancel",
    cache_policy=NO_CACHE,
    task_run_name="cancel {handle.request_id}",
    **TRANSIENT_RETRIES,
)
def cancel_request(handle: RequestHandle, credentials: FalCredentials | None = None) -> bool:
    """Cancel a request; False if it had already completed.

    Example:
        >>> cancel_request(handle)
    """
    return resolve_client(credentials).cancel(handle)
