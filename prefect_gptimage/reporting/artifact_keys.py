"""Prefect artifact keys: lowercase letters, digits and dashes, at most 100 characters.

Prefect rejects any other key, and keys here are built from run names, request ids and
user-chosen prefixes, so every artifact this package creates (tables, galleries, links, progress)
gets its key from :func:`artifact_key`. A module of its own because both
:mod:`prefect_gptimage.reporting.artifacts` and :mod:`prefect_gptimage.reporting.progress` need it.

Example:
    >>> artifact_key("Nightly Batch", "2026-11-24", "gallery")
    'nightly-batch-2026-11-24-gallery'
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["ARTIFACT_KEY_MAX", "artifact_key"]

ARTIFACT_KEY_MAX = 100


def artifact_key(*parts: object, max_length: int = ARTIFACT_KEY_MAX) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) from arbitrary parts.

    Accents are folded, everything else becomes a dash, runs collapse. Keys longer than
    ``max_length`` are cut and end with 8 hex digits of a hash of the full key, so distinct long
    inputs stay distinct.

    Example:
        >>> artifact_key("GPT Image", "Ünïcode/../run_1", 7)
        'gpt-image-unicode-run-1-7'
        >>> len(artifact_key("x" * 500))
        100
    """
    raw = "-".join(str(p) for p in parts)
    folded = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    key = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-") or "gptimage"
    if len(key) > max_length:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        key = f"{key[: max_length - 9].rstrip('-')}-{digest}"
    return key
