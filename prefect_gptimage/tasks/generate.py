"""The whole path for one request: submit → wait → fetch → download, as one task or one call.

:func:`generate` is the composition: each paid step is a cached Prefect task (see
:mod:`prefect_gptimage.tasks`), committed to storage the moment it completes, and a cache hit is
read straight from the result store without running any task. :func:`generate_images` is the
Prefect task around it. Pipelines call :func:`generate` inside their own per-row task with
``download_tasks=False``, so a row costs three task runs (row, submit, fetch) instead of six.

Example:
    >>> from prefect import flow
    >>> @flow
    ... def kites() -> list[str]:
    ...     return [i.path for i in generate_images(GptImageRequest(prompt="a kite")).images]
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.transactions import CommitMode, Transaction, transaction

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.errors import FalRequestFailed, PermanentFalError
from prefect_gptimage.schemas import (
    AnyRequest,
    GenerationResult,
    GptImageOutput,
    RequestHandle,
)
from prefect_gptimage.settings import get_settings
from prefect_gptimage.tasks.cache import cached_generation, is_submit_cached
from prefect_gptimage.tasks.concurrency import fal_request_slot
from prefect_gptimage.tasks.download import download_image
from prefect_gptimage.tasks.queue import fetch_result, submit_request


def durable() -> AbstractContextManager[Transaction]:
    """A transaction that commits its tasks' cache records the moment they complete.

    Prefect commits a nested task's records only when the outermost transaction commits (when the
    whole row is done). A paid submit must be on disk at once, so that a process killed with
    ``kill -9`` half way resumes the request on the next run instead of paying for it again.
    """
    return transaction(commit_mode=CommitMode.EAGER)


def _resubmit_reason(exc: Exception) -> str | None:
    """Why a fresh submit may succeed where the cached request cannot, or None."""
    if isinstance(exc, FalRequestFailed) and exc.resubmittable:
        return f"it failed at fal on their side ({exc.error_type or exc.status_code}), not billed"
    if isinstance(exc, PermanentFalError) and exc.status_code == 404:
        return "fal no longer knows it (results are kept 6 to 60 minutes)"
    return None


def _submit_and_fetch(
    request: AnyRequest,
    credentials: FalCredentials | None,
    timeout: float | None,
    refresh_cache: bool,
    variant: int,
    resubmits: int,
    max_in_flight: int | None,
) -> tuple[RequestHandle, GptImageOutput, bool]:
    """The paid steps as cached tasks under a fal request slot: (handle, output, was cached)."""
    log = get_run_logger()
    submit = submit_request.with_options(refresh_cache=True) if refresh_cache else submit_request
    with ExitStack() as slot:
        held = False

        def hold() -> None:  # a fal slot, from submit to fetched result
            nonlocal held
            if not held:
                slot.enter_context(fal_request_slot(local_limit=max_in_flight))
                held = True

        if refresh_cache or not is_submit_cached(request, variant):
            hold()
        for attempt in range(resubmits + 1):
            with durable():
                state = submit(request, credentials, variant, return_state=True)
            handle: RequestHandle = state.result()
            hold()
            try:
                with durable():
                    output = fetch_result(handle, credentials, timeout=timeout)
                return handle, output, state.name == "Cached"
            except Exception as exc:
                reason = _resubmit_reason(exc)
                if reason is None or attempt == resubmits:
                    raise
                log.warning("submitting %s again: %s", handle.request_id, reason)
                submit = submit_request.with_options(refresh_cache=True)
    raise AssertionError("unreachable")  # pragma: no cover


def generate(
    request: AnyRequest,
    credentials: FalCredentials | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    refresh_cache: bool = False,
    variant: int = 0,
    resubmits: int = 1,
    *,
    download_tasks: bool = True,
    max_in_flight: int | None = None,
) -> GenerationResult:
    """Submit, wait, fetch and download one request (call inside a flow or task).

    With ``download_tasks=False`` images are downloaded by plain calls (the caller's task retries
    transient failures), which keeps task runs per request to the paid steps. ``max_in_flight``
    lowers the local cap on fal requests (see :mod:`prefect_gptimage.tasks.concurrency`).
    """
    cached = None if refresh_cache else cached_generation(request, variant)
    if cached is not None:
        (handle, output), from_cache = cached, True
    else:
        handle, output, from_cache = _submit_and_fetch(
            request, credentials, timeout, refresh_cache, variant, resubmits, max_in_flight
        )
    dest = str(Path(output_dir or get_settings().output_dir))
    # the task, or its plain function when the caller's own task handles retries
    step = download_image if download_tasks else download_image.fn
    images = [
        step(image, request, handle.request_id, i, dest) for i, image in enumerate(output.images)
    ]
    return GenerationResult(
        handle=handle,
        request=request.to_arguments(),
        output=output,
        images=images,
        from_cache=from_cache,
    )


@task(name="gptimage-generate", cache_policy=NO_CACHE, task_run_name="generate {request.endpoint}")
def generate_images(
    request: AnyRequest,
    credentials: FalCredentials | None = None,
    output_dir: str | None = None,
    timeout: float | None = None,
    refresh_cache: bool = False,
    variant: int = 0,
    resubmits: int = 1,
) -> GenerationResult:
    """The whole path for one request: submit → wait → fetch result → download each image.

    Each step is its own task (cached and retried as in :mod:`prefect_gptimage.tasks`). A request
    that fails at fal with a server-side error (not billed), or that fal has forgotten, is
    submitted anew up to ``resubmits`` times; any other failure fails at once with fal's message.

    Example:
        >>> result = generate_images(GptImageRequest(prompt="a kite", num_images=2))
        >>> [(i.path, i.width, i.height, i.sha256) for i in result.images]
    """
    return generate(request, credentials, output_dir, timeout, refresh_cache, variant, resubmits)
