"""Async twins of the sync tasks, as prefect-aws writes them: the same work in a worker thread.

An async twin has its sync task's signature and documentation (``functools.wraps``), so Prefect
sees the same parameters, and runs the sync function with Prefect's ``run_sync_in_worker_thread``,
so an async flow can await many at once without blocking its event loop. One body per task:
nothing to drift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from prefect.utilities.asyncutils import run_sync_in_worker_thread

P = ParamSpec("P")
R = TypeVar("R")


def async_twin(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """An ``async def`` named ``a<fn>`` with ``fn``'s signature that runs ``fn`` in a thread."""

    @functools.wraps(fn)
    async def twin(*args: P.args, **kwargs: P.kwargs) -> R:
        return await run_sync_in_worker_thread(fn, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"a{fn.__name__}"
    twin.__doc__ = f"Async twin of :func:`{fn.__name__}` (runs it in a worker thread).\n\n" + (
        fn.__doc__ or ""
    )
    return twin
