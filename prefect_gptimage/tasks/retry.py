"""Prefect retry policy shared by every task: retry only what is transient.

Tasks use :func:`retry_if_transient` as ``retry_condition_fn`` together with exponential backoff
and jitter, so a 429 or a 503 is retried while a 401, a 422 or a request that failed at fal
fails at once with fal's own message.

Example:
    >>> from prefect import task
    >>> @task(**TRANSIENT_RETRIES)
    ... def my_step() -> None: ...
"""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from prefect_gptimage.errors import is_transient


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn``: True only when the failure is a transient one."""
    # _sync: in an async flow or task, result() would otherwise hand back a coroutine
    exc = state.result(raise_on_failure=False, _sync=True)
    return isinstance(exc, BaseException) and is_transient(exc)


#: Task options: 4 retries, 1 s, 2 s, 4 s, 8 s (plus up to 50% jitter), transient failures only.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 4,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
