"""The identity of a paid request: what the submit cache keys on.

:func:`request_fingerprint` hashes the endpoint, the normalized request and the variant, with
an edit's inputs counted by content: the sha256 of the bytes read (``input_sources``, filled in
by :mod:`prefect_gptimage.inputs`), else presigned URLs by object (:func:`stable_url`). So the
same request is the same fingerprint on every run, however its inputs were signed or uploaded,
and an input whose bytes changed is a new request. Imported through :mod:`prefect_gptimage.schemas`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect_gptimage._request_models import AnyRequest

_SIGNED_QUERY = re.compile(r"(^|&)(X-Amz-Signature|Signature|X-Goog-Signature|sig)=", re.I)


def stable_url(url: str) -> str:
    """A presigned URL without its query: the same object however (and whenever) it was signed.

    Example:
        >>> stable_url("https://b.s3.amazonaws.com/k.png?X-Amz-Date=1&X-Amz-Signature=ab")
        'https://b.s3.amazonaws.com/k.png'
    """
    base, _, query = url.partition("?")
    return base if query and _SIGNED_QUERY.search(query) else url


def request_fingerprint(request: AnyRequest, variant: int = 0) -> str:
    """sha256 of the endpoint and the normalized request: the identity of a paid request.

    Input images the package read (``input_sources``) count by their bytes' sha256; other
    presigned URLs by object, not by signature. So an edit is the same request on every run.
    """
    arguments = request.to_arguments()
    for source in getattr(request, "input_sources", ()):
        content = f"sha256:{source.sha256}"
        if source.role == "mask" and arguments.get("mask_image_url"):
            arguments["mask_image_url"] = content
        elif source.role == "image" and source.index < len(arguments.get("image_urls", [])):
            arguments["image_urls"][source.index] = content
    for field in ("image_urls", "mask_image_url"):
        value = arguments.get(field)
        if isinstance(value, list):
            arguments[field] = [stable_url(u) for u in value]
        elif isinstance(value, str):
            arguments[field] = stable_url(value)
    canonical = json.dumps(
        {"endpoint": request.endpoint, "arguments": arguments, "variant": variant},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
