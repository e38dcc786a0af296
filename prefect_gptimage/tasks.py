"""Prefect tasks: submit, wait, fetch result, download, cancel, and ``generate_images`` for all.

Retries go through :func:`~prefect_gptimage.retry.retry_if_transient` (transient failures only,
exponential backoff with jitter); a permanent failure fails at once with fal's own message.

**Never pay twice.** :func:`submit_request` is cached on the endpoint and the normalized request
(every default spelled out; credentials excluded) and its result is persisted, so a task retry, a
flow retry or a later run of the same request gets the same fal request id back and resumes it
instead of submitting again. :func:`fetch_result` is cached on the request id and persisted the
moment it arrives (fal keeps results only 6 to 60 minutes). Both expire after
``CACHE_EXPIRATION`` (6 days: fal keeps media URLs at least 7). ``refresh_cache=True`` submits
anew; ``variant`` asks for a fresh image of an identical request.

Example:
    >>> from prefect import flow
    >>> from prefect_gptimage import GptImageRequest, generate_images
    >>> @flow
    ... def poster() -> list[str]:
    ...     result = generate_images(GptImageRequest(prompt="a tram in fog", quality="low"))
    ...     return [img.path for img in result.images]
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.results import ResultStore, get_result_store

from prefect_gptimage.credentials import FalCredentials, resolve_client
from prefect_gptimage.download import download_image_file
from prefect_gptimage.polling import RequestStatus
from prefect_gptimage.retry import TRANSIENT_RETRIES
from prefect_gptimage.schemas import (
    AnyRequest,
    DownloadedImage,
    GptImageOutput,
    ImageFile,
    RequestHandle,
)
from prefect_gptimage.settings import get_settings

CACHE_EXPIRATION = timedelta(days=6)


_SIGNED_QUERY = re.compile(r"(^|&)(X-Amz-Signature|Signature|X-Goog-Signature|sig)=", re.I)


def stable_url(url: str) -> str:
    """A presigned URL without its query: the same object however (and whenever) it was signed.

    Example:
        >>> stable_url("https://b.s3.amazonaws.com/k.png?X-Amz-Date=1&X-Amz-Signature=ab")
        'https://b.s3.amazonaws.com/k.png'
    """
    base, _, query = url.partition("?")
    return base if query and _SIGNED_QUERY.search(query) else url


def request_fingerprint(request: AnyRequest, variant: int = 0) -> str:
    """sha256 of the endpoint and the normalized request: the identity of a paid request.

    Input images given as presigned URLs count by object, not by signature, so an edit of a
    staged image is the same request on every run.
    """
    arguments = request.to_arguments()
    for field in ("image_urls", "mask_image_url"):
        value = arguments.get(field)
        if isinstance(value, list):
            arguments[field] = [stable_url(u) for u in value]
        elif isinstance(value, str):
            arguments[field] = stable_url(value)
    canonical = json.dumps(
        {"endpoint": request.endpoint, "arguments": arguments, "variant": variant},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_cache_key(request: AnyRequest, variant: int = 0) -> str:
    """The cache key of :func:`submit_request` for this request."""
    return "gptimage-submit-" + request_fingerprint(request, variant)


def _submit_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return submit_cache_key(parameters["request"], parameters.get("variant", 0))


def result_cache_key(handle: RequestHandle) -> str:
    """The cache key of :func:`fetch_result` for this request."""
    return f"gptimage-result-{handle.endpoint.replace('/', '_')}-{handle.request_id}"


def _result_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return result_cache_key(parameters["handle"])


@task(
    name="gptimage-submit",
    task_run_name="submit {request.endpoint}",
    cache_key_fn=_submit_key,
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


def _store(task: Any) -> ResultStore:
    # _sync: update_for_task is async-dispatched; these helpers run in sync code (flows, the CLI)
    return get_result_store().update_for_task(task, _sync=True)  # type: ignore[call-arg,return-value]


def _cached(task: Any, key: str) -> bool:
    return _store(task).exists(key)


def cached_value(task: Any, key: str) -> Any | None:
    """The value ``task`` cached under ``key``, read straight from the result store, or None.

    Lets a pipeline serve a cache hit without the cost of a task run (a 1000-row re-run is
    mostly cache hits).
    """
    store = _store(task)
    if not store.exists(key):
        return None
    try:
        return store.read(key).result
    except Exception:  # unreadable or expired between the two calls: treat as a miss
        return None


def is_submit_cached(request: AnyRequest, variant: int = 0) -> bool:
    """Whether this request was already submitted (and cached): re-running it is free."""
    return _cached(submit_request, submit_cache_key(request, variant))


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

    Polls adaptively (learns the usual latency; see :mod:`prefect_gptimage.polling`). After
    ``timeout`` seconds the fal request is cancelled and the task fails.

    Example:
        >>> status = wait_for_request(handle, timeout=600)
    """
    return resolve_client(credentials).wait(handle, timeout=timeout, log=get_run_logger())


@task(
    name="gptimage-fetch-result",
    task_run_name="fetch {handle.request_id}",
    cache_key_fn=_result_key,
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
    name="gptimage-download",
    cache_policy=NO_CACHE,
    task_run_name="download {request_id}#{index}",
    **TRANSIENT_RETRIES,
)
def download_image(
    image: ImageFile,
    request: AnyRequest,
    request_id: str,
    index: int = 0,
    output_dir: str | None = None,
) -> DownloadedImage:
    """Stream one image to ``output_dir``, check it decodes as promised, record its sha256.

    Example:
        >>> files = [download_image(img, request, handle.request_id, i)
        ...          for i, img in enumerate(output.images)]
    """
    return download_image_file(
        image,
        dest_dir=output_dir or get_settings().output_dir,
        request_id=request_id,
        endpoint=request.endpoint,
        index=index,
        expected_format=request.output_format,
        expected_size=request.expected_size(),
    )


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
