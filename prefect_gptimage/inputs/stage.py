"""Making a checked input fetchable by fal, without the user doing anything.

With a run bucket, the input is uploaded once under a content-addressed key,
``<prefix>/inputs/<sha256>.<ext>`` (skipped when the object is there already: a re-run, or the
same photo in two rows, uploads nothing), and fal gets a presigned GET link that expires after
``link_expires`` seconds (``PREFECT_GPTIMAGE_INPUT_LINK_EXPIRES``, default one hour: fal reads it
when the request starts). Without a bucket, an input up to ``inline_max_bytes`` goes inline as a
``data:`` URI; a larger one is an :class:`~prefect_gptimage.errors.InputImageError` asking for a
bucket.

fal's own storage (``fal_client.upload_file``) is not used: its hosts are constants in
fal_client, so the tests could not show the bytes arrive offline without patching it.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from prefect_gptimage.errors import InputImageError
from prefect_gptimage.inputs.check import ACCEPTED_FORMATS, InputImage
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.s3.clients import resolve_client
from prefect_gptimage.s3.failures import s3_error
from prefect_gptimage.s3.keys import check_key, normalize_prefix
from prefect_gptimage.s3.staging import presign
from prefect_gptimage.schemas import InputSource

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["InputStager", "input_key"]

_EXTENSIONS = dict(ACCEPTED_FORMATS.values())


def input_key(prefix: str, sha256: str, extension: str) -> str:
    """``<prefix>/inputs/<sha256>.<ext>``: where a staged input lives (by content).

    Example:
        >>> input_key("team/", "ab" * 32, "png")
        'team/inputs/abababababababababababababababababababababababababababababababab.png'
    """
    base = normalize_prefix(prefix)
    name = f"inputs/{sha256}.{extension}"
    return check_key(f"{base}/{name}" if base else name)


@dataclass(frozen=True)
class InputStager:
    """Where a run's inputs go: ``bucket``/``prefix`` (None: inline only), uploaded with
    ``client`` (None: the run's client, else boto3's chain)."""

    bucket: str | None = None
    prefix: str = "gptimage"
    client: Any = None
    link_expires: int = 3600
    inline_max_bytes: int = 7 * 1024 * 1024

    def fetchable(self, field: str, source: str, image: InputImage) -> str:
        """A URL fal can fetch for ``image``: presigned from the bucket, else a data: URI."""
        if self.bucket is None:
            if len(image.data) > self.inline_max_bytes:
                raise InputImageError(
                    field,
                    source,
                    f"{len(image.data)} bytes is too large to send inline (at most "
                    f"{self.inline_max_bytes}): give the run a bucket to stage it in",
                )
            encoded = base64.b64encode(image.data).decode("ascii")
            return f"data:{image.content_type};base64,{encoded}"
        key = input_key(self.prefix, image.sha256, image.extension)
        client: S3Client = resolve_client(self.client)  # None: the package's client
        self._upload_once(client, key, image)
        return presign(self.bucket, key, self.link_expires, client)

    def signed_anew(self, source: InputSource) -> str | None:
        """A fresh presigned link to an input staged earlier in the run (None: not staged).

        Inputs are checked and uploaded before the run's first submit, but a row may start
        hours later: its links are signed again as it starts, so they are valid when fal
        fetches them (the request's identity is the sha256, not the link).
        """
        extension = _EXTENSIONS.get(source.content_type)
        if self.bucket is None or extension is None or source.source.startswith("data:"):
            return None
        key = input_key(self.prefix, source.sha256, extension)
        return presign(self.bucket, key, self.link_expires, self.client)

    def _upload_once(self, client: S3Client, key: str, image: InputImage) -> None:
        """PUT the input unless an object of its size is there already (its key is its sha256)."""
        assert self.bucket is not None
        bucket = self.bucket
        for attempt in RetryPolicy.from_settings().retrying():
            with attempt:
                try:
                    head = client.head_object(Bucket=bucket, Key=key)
                    if int(head.get("ContentLength") or -1) == len(image.data):
                        return
                except ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status not in (403, 404):
                        raise s3_error(exc, bucket=bucket, key=key, operation="HEAD") from exc
                except Exception as exc:
                    raise s3_error(exc, bucket=bucket, key=key, operation="HEAD") from exc
                try:
                    client.upload_fileobj(
                        io.BytesIO(image.data),
                        bucket,
                        key,
                        ExtraArgs={"ContentType": image.content_type},
                    )
                except Exception as exc:
                    raise s3_error(exc, bucket=bucket, key=key, operation="upload") from exc
