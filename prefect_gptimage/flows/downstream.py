"""``read_manifest``: the downstream end of a batch, run by an automation on its completion.

A run ends by emitting ``prefect-gptimage.batch.completed`` whose resource id is its manifest's
URI (``s3://bucket/prefix/manifests/run.jsonl``, or ``file:///...`` without a bucket). A
deployment of this flow with a trigger on that event (``deployments/prefect.yaml``,
``read-manifest``) receives the URI as ``manifest_uri`` and reads the manifest: one JSON line per
image (its ``s3://`` URI, sha256, size, request id...) or failure. This example counts them; put
your captioning, indexing or publishing step where it logs.

The manifest is streamed, line by line, from S3 with boto3's default credential chain
(``AWS_*``, a profile, an instance role; ``AWS_ENDPOINT_URL_S3`` for MinIO or moto), so a
10,000-image manifest costs no more memory than a 10-image one.

Example:
    >>> totals = read_manifest("s3://my-images/gptimage/manifests/nightly.jsonl")  # doctest: +SKIP
    >>> for image in manifest_images("s3://my-images/gptimage/manifests/nightly.jsonl"):
    ...     caption.submit(image.s3_uri)  # any downstream task  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import TypeAdapter

from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.reporting.manifest import FailureLine, ImageLine, ManifestLine, ManifestTotals

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["manifest_images", "manifest_lines", "read_manifest"]

_LINE: TypeAdapter[ImageLine | FailureLine] = TypeAdapter(ManifestLine)


def _s3_client() -> S3Client:
    import boto3

    return boto3.client("s3")


def _raw_lines(manifest_uri: str) -> Iterator[bytes | str]:
    parts = urlsplit(manifest_uri)
    if parts.scheme == "s3" and parts.netloc and parts.path.strip("/"):
        body = _s3_client().get_object(Bucket=parts.netloc, Key=unquote(parts.path[1:]))["Body"]
        try:
            yield from body.iter_lines()
        finally:
            body.close()
    elif parts.scheme == "file" and parts.netloc in ("", "localhost"):
        with Path(url2pathname(parts.path)).open(encoding="utf-8") as fh:
            yield from fh
    else:
        raise InvalidRequestError(
            "manifest_uri", f"must be an s3://bucket/key or file:///path URI, got {manifest_uri!r}"
        )


def manifest_lines(manifest_uri: str) -> Iterator[ImageLine | FailureLine]:
    """Every line of a run's manifest, streamed (``s3://`` or ``file://``)."""
    for number, raw in enumerate(_raw_lines(manifest_uri), start=1):
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            yield _LINE.validate_python(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"{manifest_uri}:{number}: not a manifest line: {exc}") from exc


def manifest_images(manifest_uri: str) -> Iterator[ImageLine]:
    """The staged images of a run's manifest (failures skipped), streamed."""
    for line in manifest_lines(manifest_uri):
        if isinstance(line, ImageLine):
            yield line


@flow(name="gptimage-read-manifest", log_prints=False)
def read_manifest(manifest_uri: str) -> dict[str, Any]:
    """Read the manifest at ``manifest_uri``; log and return its counts.

    Returns ``{"manifest_uri", "images", "failures", "bytes", "estimated_cost_usd"}``.
    """
    totals = ManifestTotals()
    cost = 0.0
    for line in manifest_lines(manifest_uri):
        if isinstance(line, ImageLine):
            totals.images += 1
            totals.bytes += line.bytes
            cost += line.estimated_cost_usd or 0.0
        else:
            totals.failures += 1
    totals.estimated_cost_usd = round(cost, 6)
    get_run_logger().info(
        "%s: %d image(s), %d failure(s), %d bytes",
        manifest_uri,
        totals.images,
        totals.failures,
        totals.bytes,
    )
    return {"manifest_uri": manifest_uri, **totals.model_dump()}
