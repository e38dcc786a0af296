"""Cache keys and cache reads: what makes a paid request the same request, and where it is kept.

**Never pay twice.** A submit is cached on the endpoint and the normalized request (every
default spelled out; credentials excluded) and persisted, so a task retry, a flow retry or a later
run of the same request, on this machine or any other sharing the result storage, gets the same
fal request id back and resumes it instead of submitting again. A fetched result is cached on its
request id and persisted the moment it arrives (fal keeps results only 6 to 60 minutes). Both
expire after :data:`CACHE_EXPIRATION` (6 days: fal keeps media URLs at least 7).

The two cache policies are the only place these keys are computed; pipelines read a cache hit
straight from the result store (:func:`cached_generation`), without the cost of a task run.

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> submit_cache_key(GptImageRequest(prompt="a kite")).startswith("gptimage-submit-")
    True
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.results import ResultStore, get_result_store

from prefect_gptimage.schemas import AnyRequest, GptImageOutput, RequestHandle

__all__ = [
    "CACHE_EXPIRATION",
    "RESULT_CACHE",
    "SUBMIT_CACHE",
    "cached_generation",
    "cached_value",
    "is_submit_cached",
    "request_fingerprint",
    "result_cache_key",
    "stable_url",
    "submit_cache_key",
]

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
    """The cache key of a submit of this request."""
    return "gptimage-submit-" + request_fingerprint(request, variant)


def result_cache_key(handle: RequestHandle) -> str:
    """The cache key of the fetched result of this fal request."""
    return f"gptimage-result-{handle.endpoint.replace('/', '_')}-{handle.request_id}"


def _submit_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return submit_cache_key(parameters["request"], parameters.get("variant", 0))


def _result_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return result_cache_key(parameters["handle"])


#: Cache policy of the submit tasks (sync and async share it, so they share the records).
SUBMIT_CACHE = CacheKeyFnPolicy(cache_key_fn=_submit_key)
#: Cache policy of the fetch-result tasks.
RESULT_CACHE = CacheKeyFnPolicy(cache_key_fn=_result_key)


def _records() -> None:
    """Stands for every cached step of this package when the result store is resolved."""


#: The cached tasks' options as a task, so reads resolve the store exactly as the tasks do
#: (default result storage, ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``, the policy's lock manager).
_RECORDS = task(cache_policy=SUBMIT_CACHE, persist_result=True)(_records)


def _store() -> ResultStore:
    # _sync: update_for_task is async-dispatched; reads run in sync code (flows, the CLI)
    return get_result_store().update_for_task(_RECORDS, _sync=True)  # type: ignore[call-arg,return-value]


def cached_value(key: str) -> Any | None:
    """The value cached under ``key``, read straight from the result store, or None."""
    store = _store()
    if not store.exists(key):
        return None
    try:
        return store.read(key).result
    except Exception:  # unreadable or expired between the two calls: treat as a miss
        return None


def is_submit_cached(request: AnyRequest, variant: int = 0) -> bool:
    """Whether this request was already submitted (and cached): re-running it is free."""
    return _store().exists(submit_cache_key(request, variant))


def cached_generation(
    request: AnyRequest, variant: int = 0
) -> tuple[RequestHandle, GptImageOutput] | None:
    """Handle and output of a request already submitted and fetched, or None."""
    handle = cached_value(submit_cache_key(request, variant))
    if not isinstance(handle, RequestHandle):
        return None
    output = cached_value(result_cache_key(handle))
    return (handle, output) if isinstance(output, GptImageOutput) else None
