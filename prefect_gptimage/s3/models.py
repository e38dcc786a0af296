"""S3 staging models: where images go (:class:`S3Target`) and what was stored there
(:class:`StagedImage`, :class:`StagedFile`).

Pure pydantic models, validated on construction (bucket name, prefix normalized with the key
layout's rules, presigned-link lifetime within SigV4's 7 days, multipart part sizes within S3's
minimum), and serializable, so they can be passed to and returned from Prefect tasks and persisted.
"""

from __future__ import annotations

import datetime as dt

from boto3.s3.transfer import TransferConfig
from pydantic import BaseModel, ConfigDict, Field, field_validator

from prefect_gptimage.s3.keys import normalize_prefix

__all__ = [
    "MAX_PRESIGN_EXPIRES",
    "MIN_PART_SIZE",
    "S3Target",
    "StagedFile",
    "StagedImage",
    "validate_expires",
]

MiB = 1024 * 1024
#: S3's SigV4 limit for presigned URLs: 7 days.
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
#: S3 refuses multipart parts smaller than 5 MiB (except the last one).
MIN_PART_SIZE = 5 * MiB


class S3Target(BaseModel):
    """Where and how images are staged.

    Example:
        >>> S3Target(bucket="my-images", prefix="/team//gpt/").prefix
        'team/gpt'
        >>> S3Target(bucket="my-images", presign_expires=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for S3Target...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(min_length=3, max_length=255, description="Bucket name (or access point).")
    prefix: str = Field(default="gptimage", description="Key prefix; normalized.")
    presign_expires: int = Field(
        default=24 * 3600,
        description="Lifetime of presigned GET links, seconds (1 .. 604800 = 7 days).",
    )
    multipart_threshold: int = Field(
        default=8 * MiB, description="Bodies at least this large are uploaded in parts."
    )
    multipart_chunksize: int = Field(default=8 * MiB, description="Part size of multipart uploads.")
    max_concurrency: int = Field(
        default=4, ge=1, le=64, description="Threads per multipart upload (per image)."
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_ok(cls, value: str) -> str:
        is_arn = value.startswith("arn:")  # access point / outpost ARNs contain "/"
        if ("/" in value and not is_arn) or value != value.strip() or not value.isascii():
            raise ValueError(f"bucket must be a bare bucket name or an ARN, got {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_prefix(value)

    @field_validator("presign_expires")
    @classmethod
    def _expires_ok(cls, value: int) -> int:
        return validate_expires(value)

    @field_validator("multipart_threshold", "multipart_chunksize")
    @classmethod
    def _part_ok(cls, value: int) -> int:
        if value < MIN_PART_SIZE:
            raise ValueError(f"must be at least 5 MiB ({MIN_PART_SIZE} bytes; S3's minimum part)")
        return value

    def transfer_config(self) -> TransferConfig:
        """The boto3 managed-transfer settings for this target."""
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            use_threads=True,
        )


def validate_expires(value: int) -> int:
    """``value`` if it is a valid presigned-link lifetime (1 s .. 7 days), else ValueError."""
    if not 1 <= value <= MAX_PRESIGN_EXPIRES:
        raise ValueError(
            f"presign_expires must be between 1 and {MAX_PRESIGN_EXPIRES} seconds "
            f"(7 days, the SigV4 maximum for presigned URLs); got {value}"
        )
    return value


class StagedFile(BaseModel):
    """A file (manifest, gallery) stored in S3."""

    bucket: str
    key: str
    s3_uri: str
    url: str = Field(description="Presigned GET URL, or a public one (see url_expires_at).")
    url_expires_at: dt.datetime | None = Field(
        description="When url expires; None: a PREFECT_GPTIMAGE_PUBLIC_BASE_URL link, no expiry."
    )
    content_type: str
    bytes: int


class StagedImage(BaseModel):
    """An image stored in S3: serializable, safe to persist (the URL is time limited).

    ``uploaded`` is False when an identical object (same SHA-256) was already there.
    """

    bucket: str
    key: str
    s3_uri: str
    url: str = Field(description="Presigned GET URL, valid until url_expires_at (or public).")
    url_expires_at: dt.datetime | None = Field(
        description="When url expires; None: a PREFECT_GPTIMAGE_PUBLIC_BASE_URL link, no expiry."
    )
    content_type: str
    format: str
    bytes: int
    sha256: str
    width: int
    height: int
    request_id: str
    endpoint: str
    index: int
    uploaded: bool
