"""Run manifests: one JSON line per staged image or failed prompt, so a batch can be audited,
priced and re-driven later.

Lines are :class:`ImageLine` (``"kind": "image"``) or :class:`FailureLine` (``"kind":
"failure"``). ``parameters`` is the normalized request minus the prompt; inline ``data:`` URIs
are replaced by a short digest and the query string of presigned input URLs is dropped, so a
manifest never carries megabytes of base64 or a live signature. Presigned *output* URLs are not
stored either: they expire; the ``s3_uri`` does not. A link that does not expire (with
``PREFECT_GPTIMAGE_PUBLIC_BASE_URL`` set: ``<base>/<key>``) is stored as the line's ``url``.

An edit whose inputs the package read (local files, ``s3://`` objects, ``data:`` URIs: see
:mod:`prefect_gptimage.inputs`) adds ``"inputs"``, its lineage: one
:class:`~prefect_gptimage.schemas.InputSource` per input (``role``, ``source`` as the user named
it, ``sha256`` of the bytes fal got, size). Other lines have no ``"inputs"`` key.

A run through the OCR quality gate adds ``"ocr"`` to its lines, an :class:`OcrVerdictRecord`
(what OCR read, the expected text, the score, which attempt of how many); other runs' lines have
no ``"ocr"`` key at all, so their manifests are what they were before the gate existed.

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> m = Manifest()
    >>> request = GptImageRequest(prompt="a cat", quality="low")
    >>> _ = m.add_failure(request.prompt, request, reason="content refused")
    >>> m.totals().failures
    1
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, TypeAdapter, model_serializer

from prefect_gptimage._files import sweep_stale
from prefect_gptimage.pricing import price_per_image
from prefect_gptimage.quality.text import TextVerdict
from prefect_gptimage.s3 import StagedImage
from prefect_gptimage.schemas import AnyRequest, InputSource

__all__ = [
    "FailureLine",
    "ImageLine",
    "Manifest",
    "ManifestLine",
    "ManifestTotals",
    "ManifestWriter",
    "OcrVerdictRecord",
    "cost_per_image",
    "input_lineage",
    "manifest_parameters",
]


class OcrVerdictRecord(TextVerdict):
    """The OCR gate's verdict on one image, as the manifest and the artifacts carry it.

    The comparison (:class:`~prefect_gptimage.quality.text.TextVerdict`: what was read, what was
    expected, the score) and which attempt (request) of the row made the image; not the gate's
    own :class:`~prefect_gptimage.quality.gate.OcrVerdict`, so reporting depends only on the
    comparison module, which imports nothing of the package. ``ocr_gated_batch`` fills it in.

    Example:
        >>> OcrVerdictRecord(passed=True, read_text="GRAND OPENING", expected="Grand Opening",
        ...                  score=0.976, min_score=0.97, attempt=2, max_attempts=3,
        ...                  variant=1).label()
        'OCR 0.97: GRAND OPENING (attempt 2/3)'
    """

    attempt: int = Field(ge=1, description="Which request of the row made the image, from 1.")
    max_attempts: int = Field(ge=1, description="Requests the row was allowed.")
    variant: int = Field(description="The request's variant (the cache key's part).")

    def label(self, limit: int = 40) -> str:
        """One short line for tables and galleries (plain text: callers escape it).

        The score is rounded *down* to two decimals, so a shown score never reaches the pass
        mark the real one missed (0.969 shows as 0.96, not 0.97).
        """
        tries = f"(attempt {self.attempt}/{self.max_attempts})"
        if not self.expected:
            return f"OCR: no quoted text {tries}"
        shown = math.floor(self.score * 100 + 1e-9) / 100
        text = " ".join(self.read_text.split()) or "nothing read"
        if len(text) > limit:
            text = text[: limit - 1] + "…"
        return f"OCR {shown:.2f}: {text} {tries}"


_INPUTS = "An edit's inputs: where each came from, its sha256."


class _Line(BaseModel):
    """A manifest line: its ``ocr`` verdict (the last field), a public ``url`` and a ``note``
    are written only when there is one."""

    @model_serializer(mode="wrap")
    def _without_absent_ocr(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for key in ("inputs", "ocr", "billed_cost_usd", "url", "note"):  # absent: read as before
            if isinstance(data, dict) and data.get(key, 0) is None:
                del data[key]
        return data


class ImageLine(_Line):
    """One staged image."""

    kind: Literal["image"] = "image"
    prompt: str
    parameters: dict[str, Any] = Field(description="Normalized request minus the prompt.")
    endpoint: str
    request_id: str
    index: int
    s3_uri: str
    url: str | None = Field(
        default=None, description="A link that does not expire (PREFECT_GPTIMAGE_PUBLIC_BASE_URL)."
    )
    sha256: str
    width: int
    height: int
    bytes: int
    content_type: str
    estimated_cost_usd: float | None = Field(description="Per image, from fal's price table.")
    inputs: list[InputSource] | None = Field(default=None, description=_INPUTS)
    billed_cost_usd: float | None = Field(
        default=None, description="Per image, what fal billed (reconciled runs only)."
    )
    note: str | None = Field(default=None, description="E.g. that the row paid for two requests.")
    ocr: OcrVerdictRecord | None = Field(default=None, description="The OCR gate's verdict.")


class FailureLine(_Line):
    """One prompt (or request) that produced no image (``ocr``: a gated row's last verdict)."""

    kind: Literal["failure"] = "failure"
    prompt: str
    parameters: dict[str, Any]
    endpoint: str
    request_id: str | None = None
    reason: str
    error_type: str | None = None
    inputs: list[InputSource] | None = Field(default=None, description=_INPUTS)
    billed_cost_usd: float | None = Field(
        default=None, description="What fal billed for its request (reconciled runs only)."
    )
    ocr: OcrVerdictRecord | None = Field(default=None, description="A gated row's last verdict.")


ManifestLine = Annotated[ImageLine | FailureLine, Field(discriminator="kind")]
_LINE: TypeAdapter[ImageLine | FailureLine] = TypeAdapter(ManifestLine)


class ManifestTotals(BaseModel):
    images: int = 0
    failures: int = 0
    estimated_cost_usd: float = 0.0
    bytes: int = 0
    billed_cost_usd: float | None = None  # reconciled manifests only


def cost_per_image(request: AnyRequest | None) -> float | None:
    """Estimated USD of one output image of ``request`` (None without a request, or when its
    quality/size are not in the price table).

    Example:
        >>> from prefect_gptimage.schemas import GptImageRequest
        >>> cost_per_image(GptImageRequest(prompt="a kite", quality="medium",
        ...                                image_size="1024x1536", num_images=4))
        0.051
    """
    if request is None:
        return None
    try:
        return price_per_image(request.quality, request.image_size, request.endpoint)
    except (KeyError, ValueError, TypeError):
        return None


_PRESIGNED = re.compile(r"[?&](X-Amz-Signature|Signature|X-Amz-Credential|sig|se)=", re.I)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("data:"):
            head = value[: value.find(",")] if "," in value else value[:40]
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            return f"{head[:80]},<{len(value)} chars sha256:{digest}>"
        if _PRESIGNED.search(value):
            return value.split("?", 1)[0] + "?<presigned query redacted>"
        return value
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def manifest_parameters(request: Mapping[str, Any]) -> dict[str, Any]:
    """The request's arguments (``request.to_arguments()``) as stored in a manifest: without
    ``prompt``, data URIs and signatures redacted.

    Example:
        >>> manifest_parameters({"prompt": "x", "image_urls": ["data:image/png;base64,AAAA"]})
        ... # doctest: +ELLIPSIS
        {'image_urls': ['data:image/png;base64,<26 chars sha256:...>']}
    """
    return {k: _redact_value(v) for k, v in request.items() if k != "prompt"}


def input_lineage(request: AnyRequest) -> list[InputSource] | None:
    """The inputs an edit read, for its manifest lines (None: nothing was read)."""
    return list(getattr(request, "input_sources", ())) or None


class _Lines:
    """Builds manifest lines; subclasses decide where a line goes (``_append``)."""

    def _append(self, line: ImageLine | FailureLine) -> None:
        raise NotImplementedError

    def add_image(
        self,
        staged: StagedImage,
        prompt: str,
        request: AnyRequest,
        ocr: OcrVerdictRecord | None = None,
        note: str | None = None,
    ) -> ImageLine:
        """Record a staged image; the cost is fal's per-image price for the request's settings.

        ``note``: what else to know about the row (e.g. that it paid for two requests).

        ``ocr``: the OCR gate's verdict on it, for a gated run.
        """
        line = ImageLine(
            prompt=prompt,
            parameters=manifest_parameters(request.to_arguments()),
            endpoint=staged.endpoint,
            request_id=staged.request_id,
            index=staged.index,
            s3_uri=staged.s3_uri,
            url=staged.url if staged.url_expires_at is None else None,
            sha256=staged.sha256,
            width=staged.width,
            height=staged.height,
            bytes=staged.bytes,
            content_type=staged.content_type,
            estimated_cost_usd=cost_per_image(request),
            inputs=input_lineage(request),
            note=note,
            ocr=ocr,
        )
        self._append(line)
        return line

    def add_failure(
        self,
        prompt: str,
        request: AnyRequest,
        *,
        reason: str | BaseException,
        request_id: str | None = None,
        error_type: str | None = None,
        ocr: OcrVerdictRecord | None = None,
    ) -> FailureLine:
        """Record a failure. Pass the exception as ``reason`` to fill ``error_type`` from it.

        The endpoint is the request's; ``request_id`` is None when the request never reached fal.
        ``ocr``: a gated row's last verdict (what was read when it gave up).
        """
        if isinstance(reason, BaseException):
            request_id = request_id or getattr(reason, "request_id", None)
            error_type = error_type or type(reason).__name__
            reason = str(reason) or type(reason).__name__
        line = FailureLine(
            prompt=prompt,
            parameters=manifest_parameters(request.to_arguments()),
            endpoint=request.endpoint,
            request_id=request_id,
            reason=reason[:2000],
            error_type=error_type,
            inputs=input_lineage(request),
            ocr=ocr,
        )
        self._append(line)
        return line


class Manifest(_Lines):
    """Collects manifest lines (thread-safe) and writes/reads them as JSONL.

    Example:
        >>> m = Manifest()
        >>> line = m.add_image(staged, "a lighthouse", request)  # doctest: +SKIP
        >>> m.write("out/manifest.jsonl")  # doctest: +SKIP
        >>> Manifest.from_jsonl("out/manifest.jsonl").totals()  # doctest: +SKIP
    """

    def __init__(self, lines: list[ImageLine | FailureLine] | None = None) -> None:
        self._lines: list[ImageLine | FailureLine] = list(lines or [])
        self._lock = threading.Lock()

    @property
    def lines(self) -> list[ImageLine | FailureLine]:
        with self._lock:
            return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[ImageLine | FailureLine]:
        return iter(self.lines)

    def _append(self, line: ImageLine | FailureLine) -> None:
        with self._lock:
            self._lines.append(line)

    def totals(self) -> ManifestTotals:
        """Counts, bytes and estimated cost (images only; failures cost nothing to estimate)."""
        totals = ManifestTotals()
        for line in self.lines:
            _count(totals, line)
        return _rounded(totals)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write one JSON object per line, streaming; atomic (temp file, then rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(target)
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            for line in self.lines:
                fh.write(line.model_dump_json())
                fh.write("\n")
        os.replace(tmp, target)
        return target

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest back (blank lines ignored; a bad line raises naming its number)."""
        lines: list[ImageLine | FailureLine] = []
        with Path(path).open(encoding="utf-8") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    lines.append(_LINE.validate_python(json.loads(raw)))
                except ValueError as exc:
                    raise ValueError(
                        f"{os.fspath(path)}:{number}: not a manifest line: {exc}"
                    ) from exc
        return cls(lines)


class ManifestWriter(_Lines):
    """A manifest written to disk line by line as it is added: memory stays flat however long
    the run. The file appears at ``path`` (atomically) on :meth:`close`; :meth:`discard` drops it.

    Example:
        >>> w = ManifestWriter("out/manifest.jsonl")  # doctest: +SKIP
        >>> _ = w.add_failure("a cat", GptImageRequest(prompt="a cat"), reason="refused")
        ... # doctest: +SKIP
        >>> w.close(), w.totals().failures  # doctest: +SKIP
        (PosixPath('out/manifest.jsonl'), 1)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_path(self.path)
        self._fh = self._tmp.open("w", encoding="utf-8", newline="\n")
        self._totals = ManifestTotals()
        self._lock = threading.Lock()

    def _append(self, line: ImageLine | FailureLine) -> None:
        text = line.model_dump_json() + "\n"
        with self._lock:
            self._fh.write(text)
            _count(self._totals, line)

    def totals(self) -> ManifestTotals:
        """Counts, bytes and estimated cost of the lines written so far."""
        with self._lock:
            return _rounded(self._totals)

    def close(self) -> Path:
        """Finish the file and move it into place (once: a second call does nothing). Returns
        its path."""
        with self._lock:
            if not self._fh.closed:
                self._fh.close()
                os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Drop the unfinished file (the run failed before it could be closed)."""
        with self._lock:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


def _temp_path(target: Path) -> Path:
    # a killed run's unfinished manifests (a live writer appends a line at every row)
    sweep_stale(target.parent, f".{target.name}.*.tmp", older_than=3600)
    return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _count(totals: ManifestTotals, line: ImageLine | FailureLine) -> None:
    """Add one line to running totals (the cost unrounded: see :func:`_rounded`)."""
    if isinstance(line, ImageLine):
        totals.images += 1
        totals.bytes += line.bytes
        totals.estimated_cost_usd += line.estimated_cost_usd or 0.0
    else:
        totals.failures += 1
    if line.billed_cost_usd is not None:
        totals.billed_cost_usd = (totals.billed_cost_usd or 0.0) + line.billed_cost_usd


def _rounded(totals: ManifestTotals) -> ManifestTotals:
    billed = totals.billed_cost_usd
    return totals.model_copy(
        update={
            "estimated_cost_usd": round(totals.estimated_cost_usd, 6),
            "billed_cost_usd": None if billed is None else round(billed, 6),
        }
    )
