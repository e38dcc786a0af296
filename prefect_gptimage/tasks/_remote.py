"""What a fanned-out batch runs on a Dask worker: a row's task run, with one API client per thread.

prefect-dask runs each task run through ``run_task_sync`` in a fresh context, so every task run
on a worker builds its own Prefect API clients, each loading a CA bundle into a new SSL context:
measured on a worker, that was about half of its CPU per row (the row's own work, fal, the
download and the upload, was under a tenth). :func:`run_row` keeps one open client per worker
thread and Prefect API and lends it to each task run, as a flow's own process does for the task
runs of its thread pool. The flow's settings (its API among them) still travel with every row,
and are validated once per worker, not once per row (that took another eighth of its CPU).

The flow also runs :func:`stop_profiler` once on every worker before the first row. This module
is imported on the workers: it imports nothing of the flows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import threading
from typing import Any

__all__ = ["run_row", "stand_in_flow_fn", "stop_profiler"]

_local = threading.local()
_settings: dict[str, Any] = {}
_settings_lock = threading.Lock()


def stand_in_flow_fn() -> None:  # pragma: no cover - never called
    """Stands in, on the workers, for the batch flow whose rows they run (see flows/_fanout)."""


def _api_of(context: dict[str, Any]) -> tuple[Any, ...]:
    settings = (context.get("settings_context") or {}).get("settings") or {}
    api = settings.get("api") or {}
    return (api.get("url"), str(api.get("key")), str(api.get("auth_string")))


def _settings_scope(serialized: dict[str, Any] | None) -> Any:
    """A fresh (not yet entered) copy of the flow's settings context, validated once."""
    from prefect.context import SettingsContext

    if not serialized:
        return contextlib.nullcontext()
    digest = hashlib.sha256(json.dumps(serialized, sort_keys=True, default=str).encode())
    key = digest.hexdigest()
    with _settings_lock:
        known = _settings.get(key)
    if known is None:
        known = SettingsContext(**serialized)
        with _settings_lock:
            if len(_settings) >= 8:  # a worker serving many flows: forget the oldest
                _settings.pop(next(iter(_settings)))
            _settings[key] = known
    return known.model_copy()


def _thread_client(context: dict[str, Any]) -> Any:
    """This thread's open client for the flow's API (built under the flow's settings)."""
    from prefect.client.orchestration import get_client

    key = _api_of(context)
    clients: dict[tuple[Any, ...], Any] = getattr(_local, "clients", None) or {}
    _local.clients = clients
    client = clients.get(key)
    if client is None:
        client = get_client(sync_client=True)
        client.__enter__()  # kept open for the thread's life, like a flow run's own client
        clients[key] = client
    return client


def run_row(*, context: dict[str, Any], **run_task_kwargs: Any) -> Any:
    """``run_task_sync`` of one row's task run, under the flow's settings (validated once per
    worker) and with this thread's API client."""
    from prefect.context import ContextModel, SyncClientContext
    from prefect.task_engine import run_task_sync

    rest = {k: v for k, v in context.items() if k != "settings_context"}
    with _settings_scope(context.get("settings_context")):
        scope = SyncClientContext.model_construct(client=_thread_client(context))
        ContextModel.__enter__(scope)  # only the context variable: the client is open already
        try:
            return run_task_sync(context=rest, **run_task_kwargs)
        finally:
            ContextModel.__exit__(scope)


def stop_profiler(dask_worker: Any) -> bool:
    """On a worker (``client.run``): stop Dask's statistical profiler on Python < 3.12, where
    its ``sys._current_frames()`` can deadlock the process with the garbage collector; whether
    it was running. It also costs CPU every 10 ms on every busy thread."""
    if sys.version_info >= (3, 12):
        return False
    running = False
    for name in ("profile", "profile-cycle"):
        callback = dask_worker.periodic_callbacks.pop(name, None)
        if callback is not None:
            callback.stop()
            running = True
    return running
