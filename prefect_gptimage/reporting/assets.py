"""Prefect assets for staged images and their manifest, with lineage.

**Images.** Every image a run reports staged is materialized as the Prefect asset keyed by its
``s3://`` URI (never a presigned URL: those expire and carry ``?``, which asset keys refuse). Its
materialization event (``prefect.asset.materialization.succeeded``, resource = the URI) carries
this metadata: ``endpoint``, ``request_id``, ``prompt_sha256``, ``quality``, ``size`` (the
requested ``image_size``), ``width``, ``height``, ``format``, ``bytes``, ``sha256``,
``estimated_cost_usd`` (per image), ``cached``, ``uploaded``, ``index``, ``run_key`` and
``manifest_uri``. A re-run served from the cache materializes its images again, with the same
``sha256`` and ``uploaded: false``.

**Edits.** An edit's images have their source image's asset as upstream when the source is an
object of the run's bucket given as a presigned URL (how :func:`generate_then_edit` passes it,
and how any staged image is handed to fal): the URL is mapped back to ``s3://bucket/key``,
path-style (``https://host/bucket/key?X-Amz-...``, MinIO, moto, custom endpoints) or
virtual-hosted (``https://bucket.s3.<region>.amazonaws.com/key?...``). Any other ``http(s)``
source gets no upstream asset: its URL is not a durable identity (it may change, expire or be
someone else's), so instead it is listed, signature dropped, in the metadata's ``inputs``;
``data:`` inputs are listed as ``data:`` with their length.

An edit whose inputs the package read (``input_sources``: local files, ``s3://`` objects,
``data:`` URIs; see :mod:`prefect_gptimage.inputs`) names the inputs themselves instead: an
``s3://`` input's upstream asset is its own ``s3://bucket/key``, a local file's is its
``file://`` URI, and ``inputs`` lists each as ``<source> sha256:<hex>`` (a ``data:`` input by
its length), so source → edit → manifest is visible in the asset events.

**How, with Prefect's public API.** Keys are known only after fal answers, so each group of
images gets a small materializing task made on the spot with
``prefect.assets.materialize(*keys, asset_deps=[source], ...)``, whose body records each key's
metadata with ``add_asset_metadata``; Prefect's task engine then emits one materialization event
per key (and a ``prefect.asset.referenced`` event per upstream). A group is up to
:data:`GROUP_SIZE` images with the same upstream, flushed when full, when its upstream changes,
after :data:`GROUP_AGE_S` seconds, and when the run ends. One task run per image cost 17-22 ms
each in the flow's thread (1,000 images: about 20 s); one per 50 adds about 1 ms per image
(0.9 ms), and 1,000 images add about 2 s from the flow's start to the process's exit, events
included (``benchmarks/bench_assets.py --synthetic``, 2 cores, Prefect 3.9.1). Memory stays at one
group.

**The manifest** is an asset too (its ``s3://`` URI), materialized after it is staged, with the
run's totals as metadata. It does not list its images as upstream: Prefect puts every upstream
asset into the related resources of one materialization event, and events allow at most 100
related resources (``PREFECT_SERVER_EVENTS_MAXIMUM_RELATED_RESOURCES``) and 1.5 MB, so a
10,000-image manifest could not be recorded at all. The equivalent that scales is the other way
round: every image's metadata names its ``manifest_uri``, and every
``prefect-gptimage.image.staged`` event has the manifest as a related resource (role
``manifest``), so "the images of manifest M" is one paginated events query
(``related.id = M``), and the manifest file itself lists every image's ``s3://`` URI.

Without an S3 bucket nothing is staged and nothing is materialized. Materialization is skipped
outside a flow run and when events cannot be delivered (see
:func:`prefect_gptimage.reporting.events.events_enabled`); ``PREFECT_GPTIMAGE_ASSETS=false``
turns it off. It never fails a run: errors are one warning per process.

Example:
    >>> source_asset_key(
    ...     "http://127.0.0.1:9000/my-images/gptimage/a/00-x.png?X-Amz-Signature=ab", "my-images")
    's3://my-images/gptimage/a/00-x.png'
    >>> source_asset_key("https://my-images.s3.eu-west-1.amazonaws.com/k/00-x.png?X-Amz-Signature=1",
    ...                  "my-images")
    's3://my-images/k/00-x.png'
    >>> source_asset_key("https://example.com/photo.png", "my-images") is None
    True
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from prefect_gptimage.reporting.events import events_enabled, warn_once
from prefect_gptimage.reporting.wording import counted

if TYPE_CHECKING:
    from prefect_gptimage.s3 import StagedImage
    from prefect_gptimage.schemas import AnyRequest

__all__ = [
    "GROUP_AGE_S",
    "GROUP_SIZE",
    "ImageAssets",
    "assets_enabled",
    "input_refs",
    "materialize_assets",
    "source_asset",
    "source_asset_key",
]

#: Images materialized by one task run (at most).
GROUP_SIZE = 50
#: A group waiting longer than this (seconds) is materialized at the next image.
GROUP_AGE_S = 10.0
#: The tool named as materializer on every materialization event.
MATERIALIZED_BY = "prefect-gptimage"
_FALSE = {"0", "false", "no", "off"}
_SIGNATURE_PARAMS = ("x-amz-signature=", "signature=")


def assets_enabled() -> bool:
    """Materialize only inside a flow run, with events deliverable, unless turned off."""
    if os.environ.get("PREFECT_GPTIMAGE_ASSETS", "").strip().lower() in _FALSE:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None and events_enabled()


def source_asset_key(url: str, bucket: str) -> str | None:
    """The ``s3://`` asset key of a presigned S3 URL of ``bucket``, else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    query = parts.query.lower()
    if parts.scheme not in ("http", "https") or not any(p in query for p in _SIGNATURE_PARAMS):
        return None
    host = (parts.hostname or "").lower()
    path = parts.path
    if path.startswith(f"/{bucket}/"):  # path-style: any endpoint
        key = path[len(bucket) + 2 :]
    elif host == f"{bucket}.s3.amazonaws.com" or host.startswith(
        (f"{bucket}.s3.", f"{bucket}.s3-")
    ):
        key = path[1:]  # virtual-hosted
    else:
        return None
    key = unquote(key)
    return f"s3://{bucket}/{key}" if key and not key.endswith("/") else None


def source_asset(source: str) -> str | None:
    """The asset key of an input the package read: ``s3://`` as it is, a local path as its
    ``file://`` URI; None for ``data:`` (no durable identity) and for a name Prefect refuses
    as a key (spaces, ``%``, over 512 characters: the input is still listed in ``inputs``).

    Example:
        >>> source_asset("/photos/shoe.png"), source_asset("s3://photos/shoe.png")
        ('file:///photos/shoe.png', 's3://photos/shoe.png')
        >>> source_asset("/photos/shoe 1.png") is None
        True
    """
    from prefect.assets import Asset

    if source.startswith("s3://"):
        key = source
    elif source.startswith("/"):
        key = f"file://{source}"
    else:
        return None
    try:
        Asset(key=key)
    except ValueError:
        return None
    return key


def input_refs(request: AnyRequest, bucket: str) -> tuple[list[str], list[str]]:
    """An edit's inputs: (upstream asset keys, what to list in the metadata's ``inputs``)."""
    from prefect_gptimage.schemas import stable_url

    sources = getattr(request, "input_sources", ())
    if sources:
        keys = [source_asset(s.source) for s in sources]
        read = [f"{s.source} sha256:{s.sha256}"[:500] for s in sources]
        return list(dict.fromkeys(k for k in keys if k is not None)), read

    urls = list(getattr(request, "image_urls", None) or [])
    mask = getattr(request, "mask_image_url", None)
    if mask:
        urls.append(mask)
    upstream: list[str] = []
    listed: list[str] = []
    for url in urls:
        key = source_asset_key(url, bucket)
        if key is not None:
            if key not in upstream:
                upstream.append(key)
            listed.append(key)
        elif url.startswith("data:"):
            listed.append(f"data:<{len(url)} chars>")
        else:
            listed.append(stable_url(url)[:500])
    return upstream, listed


def _record(metadata: dict[str, dict[str, Any]]) -> int:
    """The materializing task's body: each key's metadata onto its materialization event."""
    from prefect.assets import add_asset_metadata

    for key, values in metadata.items():
        add_asset_metadata(key, values)
    return len(metadata)


def materialize_assets(
    metadata: dict[str, dict[str, Any]], upstream: list[str] | None = None, label: str = "image"
) -> bool:
    """Materialize the assets keyed like ``metadata`` in one task run; True if it completed.

    ``upstream`` asset keys become the materializations' upstream (``asset_deps``). ``label``
    names one asset in the task run's name (``assets: 1 image``, ``assets: 20 images``). Never
    raises: an invalid key or a Prefect error is a warning (once per process).
    """
    if not metadata:
        return False
    try:
        from prefect.assets import materialize
        from prefect.cache_policies import NO_CACHE

        task = materialize(
            *metadata,
            by=MATERIALIZED_BY,
            name="gptimage-materialize-assets",
            task_run_name=f"assets: {counted(len(metadata), label)}",
            asset_deps=list(upstream or []) or None,
            cache_policy=NO_CACHE,
            persist_result=False,
            retries=0,
            log_prints=False,
        )(_record)
        state = task(metadata, return_state=True)
        if not state.is_completed():
            raise RuntimeError(f"materializing task ended {state.name}: {state.message}")
        return True
    except Exception as exc:
        warn_once("materialize Prefect assets", exc)
        return False


class ImageAssets:
    """Collects a run's staged images and materializes them in groups (see the module docs)."""

    def __init__(self, bucket: str, run_key: str, manifest_uri: str | None) -> None:
        self.bucket, self.run_key, self.manifest_uri = bucket, run_key, manifest_uri
        self.materialized = 0
        self._group: dict[str, dict[str, Any]] = {}
        self._upstream: list[str] = []
        self._since = 0.0

    def add(self, staged: StagedImage, request: AnyRequest, prompt: str, *, cached: bool) -> None:
        """One staged image: into the current group, which is flushed first if it must be."""
        from prefect.assets import Asset

        from prefect_gptimage.reporting.manifest import cost_per_image

        try:
            Asset(key=staged.s3_uri)  # a key Prefect refuses (over 512 characters) is skipped
        except ValueError as exc:
            warn_once(f"use {staged.s3_uri[:80]!r} as an asset key", exc)
            return
        upstream, inputs = input_refs(request, self.bucket)
        if self._group and (
            upstream != self._upstream
            or len(self._group) >= GROUP_SIZE
            or time.monotonic() - self._since >= GROUP_AGE_S
        ):
            self.flush()
        if not self._group:
            self._upstream, self._since = upstream, time.monotonic()
        values: dict[str, Any] = {
            "endpoint": staged.endpoint,
            "request_id": staged.request_id,
            "index": staged.index,
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest(),
            "quality": request.quality,
            "size": request.image_size,
            "width": staged.width,
            "height": staged.height,
            "format": staged.format,
            "bytes": staged.bytes,
            "sha256": staged.sha256,
            "estimated_cost_usd": cost_per_image(request),
            "cached": cached,
            "uploaded": staged.uploaded,
            "run_key": self.run_key,
            "manifest_uri": self.manifest_uri,
        }
        if inputs:
            values["inputs"] = inputs
        self._group[staged.s3_uri] = values

    def flush(self) -> None:
        """Materialize the current group now."""
        group, upstream = self._group, self._upstream
        self._group, self._upstream = {}, []
        if group and materialize_assets(group, upstream):
            self.materialized += len(group)

    def manifest(self, manifest_uri: str, totals: dict[str, Any]) -> None:
        """The staged manifest as an asset, with the run's totals (after the images' groups)."""
        self.flush()
        materialize_assets({manifest_uri: {"run_key": self.run_key, **totals}}, label="manifest")
