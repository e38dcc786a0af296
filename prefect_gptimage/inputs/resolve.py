"""An edit's inputs, from wherever the user named them, made fetchable before anything is paid.

:class:`InputResolver` turns a :class:`~prefect_gptimage.schemas.GptImageEditRequest` whose
``image_urls``/``mask_image_url`` name local paths, ``s3://`` objects or ``data:`` URIs into the
request fal gets: each such input read once (:mod:`~prefect_gptimage.inputs.read`), checked
(:mod:`~prefect_gptimage.inputs.check`), made fetchable (:mod:`~prefect_gptimage.inputs.stage`)
and recorded in ``input_sources`` with its sha256, the request's identity
(:func:`~prefect_gptimage.schemas.request_fingerprint`). ``http(s)`` inputs pass unchanged: fal
fetches them. The request is validated again, so a mask whose size differs from its image's is
refused here. Every problem is one :class:`~prefect_gptimage.errors.InputImageError` naming the
input.

One resolver serves one run: an input named by several rows is read, checked and uploaded once
(a presigned link is re-signed for each; what is remembered is the small record, not the bytes).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from prefect_gptimage.errors import InvalidRequestError
from prefect_gptimage.inputs.check import inspect_image
from prefect_gptimage.inputs.read import read_input
from prefect_gptimage.inputs.stage import InputStager
from prefect_gptimage.schemas import AnyRequest, GptImageEditRequest, InputSource, input_kind

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["InputResolver", "resolve_inputs", "source_label"]


def source_label(ref: str) -> str:
    """How an input is named in records: the reference, a ``data:`` URI by its length only.

    Example:
        >>> source_label("data:image/png;base64,iVBORw0KGgo=")
        'data:image/png;base64,<16 chars>'
    """
    if input_kind(ref) == "data":
        head, _, payload = ref.partition(",")
        return f"{head[:60]},<{len(payload)} chars>"
    return ref.strip()


class InputResolver:
    """Resolves the inputs of a run's edits (see the module docs).

    ``stager``: where inputs go (default: inline ``data:`` URIs only); ``max_bytes``: the largest
    input (default: ``PREFECT_GPTIMAGE_INPUT_MAX_BYTES``); ``s3_client``: reads ``s3://`` inputs
    (default: the user's boto3 chain); ``read_only``: read and check, record the sha256, but
    stage nothing and keep the references (a dry run: the identity without uploads).
    """

    def __init__(
        self,
        stager: InputStager | None = None,
        *,
        max_bytes: int | None = None,
        s3_client: S3Client | None = None,
        read_only: bool = False,
    ) -> None:
        from prefect_gptimage.settings import get_settings

        settings = get_settings()
        self.stager = stager or InputStager(inline_max_bytes=settings.inline_input_max_bytes)
        self.max_bytes = max_bytes or settings.input_max_bytes
        self.s3_client = s3_client
        self.read_only = read_only
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[InputSource, str]] = {}

    def resolve(self, request: AnyRequest) -> AnyRequest:
        """``request`` with every input fetchable and recorded; unchanged when it is no edit,
        or has nothing to read (only ``http(s)`` inputs), or was resolved already."""
        if not isinstance(request, GptImageEditRequest) or request.input_sources:
            return request
        refs = [("image_urls", "image", i, ref) for i, ref in enumerate(request.image_urls)]
        if request.mask_image_url:
            refs.append(("mask_image_url", "mask", 0, request.mask_image_url))
        if not any(input_kind(ref) in ("local", "s3", "data") for *_, ref in refs):
            return request
        urls: list[str] = []
        mask: str | None = None
        sources: list[InputSource] = []
        for field, role, index, ref in refs:
            url, source = self._one(field, role, index, ref)  # type: ignore[arg-type]
            if source is not None:
                sources.append(source)
            if role == "mask":
                mask = url
            else:
                urls.append(url)
        data: dict[str, Any] = request.model_dump()
        data.update(image_urls=urls, mask_image_url=mask, input_sources=sources)
        try:
            return GptImageEditRequest.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequestError.from_validation_error(exc) from None

    def signed_anew(self, request: AnyRequest) -> AnyRequest:
        """``request`` (resolved) with the links to its staged inputs signed again: call it as
        the row starts (see :meth:`InputStager.signed_anew`). Its identity is unchanged."""
        if not isinstance(request, GptImageEditRequest) or not request.input_sources:
            return request
        if self.read_only:
            return request
        urls = list(request.image_urls)
        mask = request.mask_image_url
        for source in request.input_sources:
            fresh = self.stager.signed_anew(source)
            if fresh is None:
                continue
            if source.role == "mask":
                mask = fresh
            elif source.index < len(urls):
                urls[source.index] = fresh
        return request.model_copy(update={"image_urls": urls, "mask_image_url": mask})

    def resolve_all(self, requests: Sequence[AnyRequest]) -> list[AnyRequest]:
        """:meth:`resolve` for each request, in order (the first problem raises)."""
        return [self.resolve(r) for r in requests]

    def _one(
        self, field: str, role: Literal["image", "mask"], index: int, ref: str
    ) -> tuple[str, InputSource | None]:
        """(URL fal gets, record) of one input; http(s) inputs: (unchanged, None)."""
        kind = input_kind(ref)
        if kind not in ("local", "s3", "data"):
            return ref, None
        with self._lock:
            seen = self._seen.get((role, ref))
        if seen is not None:
            source, url = seen
            return url, source.model_copy(update={"index": index})
        label = source_label(ref)
        data = read_input(field, ref, self.max_bytes, self.s3_client)
        image = inspect_image(field, label, data, role)
        staged = kind != "data" and not self.read_only
        url = self.stager.fetchable(field, label, image) if staged else ref
        source = InputSource(
            role=role,
            index=index,
            source=label,
            sha256=image.sha256,
            bytes=len(data),
            width=image.width,
            height=image.height,
            content_type=image.content_type,
            has_alpha=image.has_alpha,
        )
        with self._lock:
            self._seen[(role, ref)] = (source, url)
        return url, source


def resolve_inputs(request: AnyRequest, resolver: InputResolver | None = None) -> AnyRequest:
    """``request`` with its inputs made fetchable (see :class:`InputResolver`; default: inline
    ``data:`` URIs, no bucket). A request with nothing to read is returned as it is."""
    if not isinstance(request, GptImageEditRequest) or request.input_sources:
        return request
    if not any(input_kind(r) in ("local", "s3", "data") for r in request.image_urls) and not (
        request.mask_image_url and input_kind(request.mask_image_url) in ("local", "s3", "data")
    ):
        return request
    return (resolver or InputResolver()).resolve(request)
