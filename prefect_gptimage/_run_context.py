"""Helpers for code that may run inside or outside a Prefect flow/task run.

S3 staging, artifact publishing and batch progress are called from flows and tasks, but also from
plain scripts and tests. They share three needs, gathered here so each is written once:

* log through the Prefect run logger when there is a run (so lines reach the UI), else through a
  plain module logger (:func:`run_logger`);
* know whether there is a run at all: artifacts may only be created inside one (:func:`in_run`),
  and which flow run it is (:func:`current_flow_run`);
* call Prefect's async artifact functions (``acreate_table_artifact``, ...) synchronously, even
  from an async flow (:func:`call_sync`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["call_sync", "current_flow_run", "in_run", "run_logger"]


def run_logger(fallback: logging.Logger) -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a flow/task run (so lines reach the UI), else ``fallback``."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return fallback


def in_run() -> bool:
    """True inside a Prefect flow or task run."""
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def current_flow_run() -> FlowRun | None:
    """The flow run this code runs in (its flow's context, copied into threads), else None."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow_run if context is not None else None


def call_sync(afn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kwargs: Any) -> Any:
    """Run Prefect's async twin ``afn`` (e.g. ``acreate_table_artifact``) to completion, here.

    Prefect's sync artifact functions hand back a coroutine when the current flow is async;
    their public async twins, run by Prefect's public ``run_coro_as_sync``, behave the same in
    sync and async flows, and in plain code.
    """
    from prefect.utilities.asyncutils import run_coro_as_sync

    return run_coro_as_sync(afn(*args, **kwargs))
