"""Prefect events a run emits, so automations can trigger what comes next.

=====================================  ========================  =================================
event                                  resource id               when
=====================================  ========================  =================================
``prefect-gptimage.image.staged``      the image's ``s3://`` URI  each image a run reports staged
``prefect-gptimage.batch.completed``   the manifest's ``s3://``   once per run, after its manifest
                                       URI (``file://`` without   is written (and staged)
                                       a bucket)
``prefect-gptimage.spend.refused``     ``prefect-gptimage.run.``  ``max_cost`` refused a batch:
                                       ``<run key>``              nothing was submitted
=====================================  ========================  =================================

Related resources: the flow run (``prefect.flow-run.<id>``, role ``flow-run``) on all three;
``image.staged`` adds the fal request (``fal.request.<request id>``, role ``fal-request``) and
the run's manifest (role ``manifest``), so "every image of manifest M" is one events query
(``related.id = M``) however large the batch. Prefect's events worker adds the flow, deployment,
work pool and tags of the run as further related resources.

Payloads (costs in USD from the price table, fal's when it answered; what fal billed only
with an admin key, see :mod:`prefect_gptimage.reporting.billing`):

* ``image.staged``: ``endpoint``, ``request_id``, ``index``, ``sha256``, ``bytes``, ``format``,
  ``width``, ``height``, ``estimated_cost_usd`` (per image), ``cached`` (the request was served
  from the cache: nothing paid now), ``uploaded`` (False when S3 already held these bytes),
  ``manifest_uri``, ``run_key``.
* ``batch.completed``: ``run_key``, ``manifest_uri``, ``images``, ``staged``, ``failed``
  (requests that produced no image), ``submitted`` (requests paid for by this run), ``cached``
  (requests served from the cache), ``estimated_cost_usd`` (the estimate made before
  submitting, when the flow made one, else null), ``cost_usd`` (the price of what this run
  submitted), ``billed_cost_usd`` (what fal billed for it; null without an admin key),
  ``costs`` (``billed`` or ``estimated``), ``ok``.
* ``spend.refused``: ``run_key``, ``estimated_cost_usd``, ``max_cost_usd``, ``requests``,
  ``cached``, ``uncached``.

Emission is best effort and never fails a run: an error is logged as one warning per process,
and nothing is built when events cannot be delivered (no flow run and no ``PREFECT_API_URL``:
Prefect would otherwise start a temporary API server just to send them).
``PREFECT_GPTIMAGE_EVENTS=false`` turns them off.

Example:
    >>> from prefect_gptimage.reporting.events import BATCH_COMPLETED
    >>> BATCH_COMPLETED
    'prefect-gptimage.batch.completed'
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect_gptimage._run_context import run_logger

if TYPE_CHECKING:
    from prefect_gptimage.s3 import StagedImage

__all__ = [
    "BATCH_COMPLETED",
    "IMAGE_STAGED",
    "SPEND_REFUSED",
    "batch_completed",
    "current_flow_run_id",
    "emit",
    "events_enabled",
    "flow_run_resource",
    "image_staged",
    "spend_refused",
]

IMAGE_STAGED = "prefect-gptimage.image.staged"
BATCH_COMPLETED = "prefect-gptimage.batch.completed"
SPEND_REFUSED = "prefect-gptimage.spend.refused"

_log = logging.getLogger(__name__)
_warned = threading.Event()
_FALSE = {"0", "false", "no", "off"}


def warn_once(what: str, exc: BaseException) -> None:
    """Log one warning per process for a failed emission (the run goes on)."""
    if _warned.is_set():
        return
    _warned.set()
    run_logger(_log).warning(
        "could not %s (%s: %s); the run goes on, later failures are not logged",
        what,
        type(exc).__name__,
        exc,
    )


def current_flow_run_id() -> UUID | None:
    """The id of the flow run this code runs in (or of the task run's flow run), else None."""
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        return flow_ctx.flow_run.id
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        return task_ctx.task_run.flow_run_id
    return None


def events_enabled() -> bool:
    """Whether events can be delivered from here, cheaply decided (no server is started).

    Inside a flow run the run's own events go to its API already (a temporary one included), so
    ours can too; outside one only a configured ``PREFECT_API_URL`` (or Prefect Cloud) takes them.
    """
    if os.environ.get("PREFECT_GPTIMAGE_EVENTS", "").strip().lower() in _FALSE:
        return False
    try:
        from prefect.events.worker import should_emit_events
        from prefect.settings import PREFECT_API_URL

        if not should_emit_events():
            return False
        return current_flow_run_id() is not None or bool(PREFECT_API_URL.value())
    except Exception as exc:  # a broken settings file must not fail the run
        warn_once("decide whether to emit events", exc)
        return False


def flow_run_resource(flow_run_id: UUID | None = None) -> list[dict[str, str]]:
    """The related resource of the current flow run (role ``flow-run``), or none."""
    flow_run_id = flow_run_id or current_flow_run_id()
    if flow_run_id is None:
        return []
    return [
        {
            "prefect.resource.id": f"prefect.flow-run.{flow_run_id}",
            "prefect.resource.role": "flow-run",
        }
    ]


def emit(
    event: str,
    resource: Mapping[str, str],
    payload: Mapping[str, Any],
    related: list[dict[str, str]] | None = None,
) -> bool:
    """Emit one event with ``prefect.events.emit_event``; True if it was handed to Prefect.

    The flow run is added as a related resource when there is one. Never raises.
    """
    try:
        from prefect.events import emit_event

        emitted = emit_event(
            event=event,
            resource=dict(resource),
            related=[*flow_run_resource(), *(related or [])],
            payload=dict(payload),
        )
        return emitted is not None
    except Exception as exc:
        warn_once(f"emit {event}", exc)
        return False


def image_staged(
    staged: StagedImage,
    *,
    cost: float | None,
    cached: bool,
    manifest_uri: str | None,
    run_key: str,
) -> None:
    """``prefect-gptimage.image.staged`` for one staged image (call only if
    :func:`events_enabled`)."""
    related = [
        {
            "prefect.resource.id": f"fal.request.{staged.request_id}",
            "prefect.resource.role": "fal-request",
            "fal.endpoint": staged.endpoint,
        }
    ]
    if manifest_uri:
        related.append({"prefect.resource.id": manifest_uri, "prefect.resource.role": "manifest"})
    emit(
        IMAGE_STAGED,
        {
            "prefect.resource.id": staged.s3_uri,
            "prefect.resource.name": staged.key.rsplit("/", 1)[-1],
        },
        {
            "endpoint": staged.endpoint,
            "request_id": staged.request_id,
            "index": staged.index,
            "sha256": staged.sha256,
            "bytes": staged.bytes,
            "format": staged.format,
            "width": staged.width,
            "height": staged.height,
            "estimated_cost_usd": cost,
            "cached": cached,
            "uploaded": staged.uploaded,
            "manifest_uri": manifest_uri,
            "run_key": run_key,
        },
        related,
    )


def batch_completed(manifest_uri: str, payload: Mapping[str, Any]) -> None:
    """``prefect-gptimage.batch.completed`` for a run's manifest (call only if
    :func:`events_enabled`)."""
    emit(
        BATCH_COMPLETED,
        {
            "prefect.resource.id": manifest_uri,
            "prefect.resource.name": manifest_uri.rsplit("/", 1)[-1],
        },
        {"manifest_uri": manifest_uri, **payload},
    )


def spend_refused(
    run_key: str, *, estimate: float, max_cost: float, requests: int, cached: int
) -> None:
    """``prefect-gptimage.spend.refused``: the budget guard refused a run; nothing submitted."""
    if not events_enabled():
        return
    emit(
        SPEND_REFUSED,
        {
            "prefect.resource.id": f"prefect-gptimage.run.{run_key}",
            "prefect.resource.name": run_key,
        },
        {
            "run_key": run_key,
            "estimated_cost_usd": round(estimate, 6),
            "max_cost_usd": max_cost,
            "requests": requests,
            "cached": cached,
            "uncached": requests - cached,
        },
    )
