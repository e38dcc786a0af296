"""How an edit names its input images, and what a resolved input is.

An edit's ``image_urls`` and ``mask_image_url`` take four kinds of reference
(:func:`input_kind`): an ``http(s)`` URL or a ``data:`` URI (fal fetches those itself), an
absolute local path, or an ``s3://bucket/key`` URI. The last two are not fetchable by fal: the
inputs layer (:mod:`prefect_gptimage.inputs`) reads them, checks them and turns each into a
presigned URL or a ``data:`` URI before anything is submitted, recording what it read as an
:class:`InputSource` (the source the user named and its bytes' sha256). The request's identity
(:mod:`prefect_gptimage._fingerprint`) counts a resolved input by that sha256, not its URL.
Imported through :mod:`prefect_gptimage.schemas`.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["InputKind", "InputSource", "check_input_ref", "input_kind", "split_s3_uri"]

#: The four ways to name an input image.
InputKind = Literal["http", "data", "local", "s3"]


def split_s3_uri(ref: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ``ValueError`` when either part is missing.

    Example:
        >>> split_s3_uri("s3://photos/products/shoe.png")
        ('photos', 'products/shoe.png')
    """
    rest = ref[len("s3://") :] if ref[:5].lower() == "s3://" else ""
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"an s3:// input needs a bucket and an object key, got {ref!r}")
    return bucket, key


def input_kind(ref: str) -> InputKind | None:
    """Which kind of reference ``ref`` is, or None when it is none of them.

    A local path must be absolute (a prompt file makes relative paths absolute against its own
    folder before this check); ``//host/x`` is a URL without a scheme, not a path.

    Example:
        >>> [input_kind(r) for r in ("https://x/a.png", "/photos/a.png", "s3://b/k.png", "a.png")]
        ['http', 'local', 's3', None]
    """
    text = ref.strip()
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return "http"
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith("s3://"):
        return "s3"
    if os.path.isabs(text) and not text.startswith("//") and ":" not in text[:2].strip("/"):
        return "local"
    return None


def check_input_ref(ref: str) -> str:
    """``ref`` if it names an input an edit can take: a URL fal fetches (see
    :func:`~prefect_gptimage.schemas.check_input_url`), an absolute local path or
    ``s3://bucket/key``; else ``ValueError`` saying what is accepted.

    Example:
        >>> check_input_ref("s3://photos/shoe.png")
        's3://photos/shoe.png'
        >>> check_input_ref("photos/shoe.png")
        Traceback (most recent call last):
        ...
        ValueError: must be an http(s) URL, a data: URI, an s3://bucket/key URI or an absolute \
local path (relative paths only in a prompt file), got 'photos/shoe.png'
    """
    from prefect_gptimage._request_models import check_input_url, shorten

    kind = input_kind(ref) if isinstance(ref, str) else None
    if kind == "s3":
        split_s3_uri(ref.strip())
        return ref
    if kind == "local":
        return ref
    if kind is None and isinstance(ref, str):
        scheme, sep, _ = ref.partition(":")
        if not sep or not scheme.isalpha():
            raise ValueError(
                "must be an http(s) URL, a data: URI, an s3://bucket/key URI or an absolute "
                f"local path (relative paths only in a prompt file), got {shorten(ref)!r}"
            )
    return check_input_url(ref)


class InputSource(BaseModel):
    """One input image of an edit as it was read: what the user named, and its bytes.

    Filled in by :mod:`prefect_gptimage.inputs` when it makes the input fetchable; never sent
    to fal. ``source`` is the user's reference (an absolute path, ``s3://bucket/key``, an
    ``http(s)`` URL without its signature, or ``data:<n bytes>``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["image", "mask"] = Field(description="An image to edit, or the mask.")
    index: int = Field(default=0, ge=0, description="Its position in ``image_urls`` (mask: 0).")
    source: str = Field(description="Where the input came from, as the user named it.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the bytes read.")
    bytes: int = Field(ge=0, description="Size of the input in bytes.")
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    content_type: str = Field(description="image/png, image/jpeg or image/webp.")
    has_alpha: bool = Field(default=False, description="Whether the image has an alpha channel.")
