"""S3 object keys: the documented, deterministic, collision-free layout of staged objects.

Kept apart from the upload code because the layout is a contract (people browse the bucket, other
tools read it, re-staging relies on it) and is pure: no boto3, no network.

Key layout
    ::

        {prefix}/{endpoint-slug}/{request-id}/{index:02d}-{prompt-slug}.{ext}
        {prefix}/manifests/{run-key}.jsonl

    * ``prefix`` is normalized: split on ``/``; each segment keeps only ``[A-Za-z0-9._-]`` (anything
      else becomes ``-``); empty, ``.`` and ``..`` segments are dropped; so no leading ``/``, no
      ``//``, no traversal. An empty prefix puts the endpoint slug at the top of the bucket.
    * ``endpoint-slug`` is the fal endpoint as a lowercase ``[a-z0-9-]`` slug
      (``fal-ai/gpt-image-1.5/edit`` -> ``fal-ai-gpt-image-1-5-edit``).
    * ``request-id`` keeps ``[A-Za-z0-9_-]`` (fal's UUIDs pass unchanged). If sanitizing had to
      change or truncate the id, 10 hex digits of the SHA-256 of the raw id are appended, so two
      distinct ids never share a folder.
    * ``index`` is the image's position in its request's output, zero padded: with the request id it
      makes the key unique. The prompt slug only helps humans browsing the bucket.
    * ``prompt-slug`` is the prompt reduced to lowercase ASCII ``[a-z0-9-]`` (accents folded,
      everything else dropped or dashed), at most 48 characters, ``image`` when nothing is left.
    * ``ext`` is ``png``, ``jpg`` or ``webp`` from the verified image format.
    * ``run-key`` is sanitized like a request id.

    Nothing from a prompt, a request id or a fal ``file_name`` reaches a key unsanitized, and the
    same image always maps to the same key, which is what makes re-staging idempotent.

    No HTML gallery is staged: the run's HTML page (``index.html`` in its local folder) shows the
    images from that folder, links that would not work from a bucket. The Prefect gallery
    artifact links the staged images (presigned, or ``PREFECT_GPTIMAGE_PUBLIC_BASE_URL``).

Example:
    >>> image_key("gptimage", endpoint="fal-ai/gpt-image-1.5", request_id="764cabcf-b745",
    ...           index=0, prompt="A Lighthouse at Dawn!", fmt="png")
    'gptimage/fal-ai-gpt-image-1-5/764cabcf-b745/00-a-lighthouse-at-dawn.png'
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Protocol


class HasPrefix(Protocol):
    """Anything with a key prefix (an :class:`~prefect_gptimage.s3.models.S3Target`)."""

    @property
    def prefix(self) -> str: ...


__all__ = [
    "PROMPT_SLUG_MAX",
    "check_key",
    "image_key",
    "manifest_key",
    "normalize_prefix",
    "safe_id",
    "slugify",
]

_EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}
PROMPT_SLUG_MAX = 48
_ID_MAX = 64


def slugify(text: str, max_len: int = PROMPT_SLUG_MAX, *, default: str = "image") -> str:
    """Lowercase ASCII ``[a-z0-9-]`` slug of ``text``, at most ``max_len`` chars, never empty.

    Accents are folded (``é`` -> ``e``); everything else that is not a letter or digit becomes a
    dash; runs of dashes collapse; leading/trailing dashes go.

    Example:
        >>> slugify("../../etc/passwd")
        'etc-passwd'
        >>> slugify("Crème brûlée, 4K!")
        'creme-brulee-4k'
        >>> slugify("日本語")
        'image'
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")
    slug = slug[:max_len].rstrip("-")
    return slug or default


def _short_hash(value: str, n: int = 10) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_id(value: str, max_len: int = _ID_MAX, *, default: str = "unknown") -> str:
    """A key segment made from an identifier (request id, run key): ``[A-Za-z0-9_-]`` only.

    Identifiers that are already safe pass unchanged; anything that had to be altered or
    truncated gets ``-`` plus 10 hex digits of the raw value's SHA-256, so distinct inputs stay
    distinct.

    Example:
        >>> safe_id("764cabcf-b745-4b3e-ae38-1200304cf45b")
        '764cabcf-b745-4b3e-ae38-1200304cf45b'
        >>> safe_id("../x").startswith("x-")
        True
    """
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")
    if cleaned == value and 0 < len(value) <= max_len:
        return value
    cleaned = cleaned[: max(1, max_len - 11)].strip("-_")
    return f"{cleaned or default}-{_short_hash(value)}"


def normalize_prefix(prefix: str) -> str:
    """Normalize a key prefix: safe segments joined by ``/``, no leading/trailing ``/``, no ``..``.

    Example:
        >>> normalize_prefix("/team a//../gptimage/")
        'team-a/gptimage'
    """
    segments = []
    for raw in prefix.replace("\\", "/").split("/"):
        seg = re.sub(r"[^A-Za-z0-9._-]+", "-", raw.strip()).strip("-")
        if seg in ("", ".", ".."):
            continue
        segments.append(seg[:64])
    return "/".join(segments)[:256].strip("/")


def _join(prefix: str, *parts: str) -> str:
    head = normalize_prefix(prefix)
    return "/".join([head, *parts]) if head else "/".join(parts)


def _prefix_of(target_or_prefix: HasPrefix | str) -> str:
    return target_or_prefix if isinstance(target_or_prefix, str) else target_or_prefix.prefix


def image_key(
    target_or_prefix: HasPrefix | str,
    *,
    endpoint: str,
    request_id: str,
    index: int,
    prompt: str,
    fmt: str,
) -> str:
    """The object key of one image (layout in the module docstring).

    Example:
        >>> image_key("p", endpoint="fal-ai/gpt-image-1.5/edit", request_id="r1", index=3,
        ...           prompt="", fmt="jpeg")
        'p/fal-ai-gpt-image-1-5-edit/r1/03-image.jpg'
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    ext = _EXTENSIONS.get(fmt.lower().lstrip("."))
    if ext is None:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of png, jpeg, webp")
    return _join(
        _prefix_of(target_or_prefix),
        slugify(endpoint, 96, default="unknown-endpoint"),
        safe_id(request_id),
        f"{index:02d}-{slugify(prompt)}.{ext}",
    )


def manifest_key(target_or_prefix: HasPrefix | str, run_key: str) -> str:
    """``{prefix}/manifests/{run_key}.jsonl`` with ``run_key`` sanitized.

    Example:
        >>> manifest_key("gptimage", "nightly-2026-11-24")
        'gptimage/manifests/nightly-2026-11-24.jsonl'
    """
    return _join(_prefix_of(target_or_prefix), "manifests", f"{safe_id(run_key, 128)}.jsonl")


def check_key(key: str) -> str:
    """Refuse keys that could escape a prefix or confuse tools (used for caller-made keys)."""
    if (
        not key
        or key.startswith("/")
        or len(key.encode("utf-8")) > 1024
        or any(part in ("", ".", "..") for part in key.split("/"))
        or re.search(r"[^A-Za-z0-9._/-]", key)
    ):
        raise ValueError(
            f"unsafe S3 key {key!r}: use [A-Za-z0-9._-] segments joined by '/', "
            "no empty, '.' or '..' segment, no leading '/' (see manifest_key)"
        )
    return key
