"""What a flow run reports back: images produced, failures with their reasons, cost."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from prefect_gptimage.errors import FalError, GptImageError, PaidRequestFailed
from prefect_gptimage.schemas import AnyRequest, shorten


class Failure(BaseModel):
    """One request that produced no image, and why."""

    prompt: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    endpoint: str
    request_id: str | None = None
    reason: str
    error_type: str | None = None
    line: int | None = Field(default=None, description="The prompt file's line, for a batch row.")
    paid: bool = Field(
        default=False, description="This run paid for its request (fal accepted it) first."
    )

    @classmethod
    def from_exception(
        cls, exc: BaseException, request: AnyRequest, line: int | None = None
    ) -> Failure:
        """The failure of ``request``; its arguments (minus the prompt) are the parameters.

        ``error_type`` is fal's when fal gave one, else the error's class (``SubmitOutcomeUnknown``,
        ``PermanentDownloadError``, ...), so the manifest always says what kind of failure it was.
        """
        params = {k: v for k, v in request.to_arguments().items() if k != "prompt"}
        request_id, paid = getattr(exc, "request_id", None), getattr(exc, "paid", False) is True
        if isinstance(exc, PaidRequestFailed):  # failed after fal accepted: report the error
            request_id, paid, exc = exc.request_id, exc.paid, exc.error
        fal_type = exc.error_type if isinstance(exc, FalError) else None
        return cls(
            prompt=request.prompt,
            parameters=params,
            endpoint=request.endpoint,
            request_id=request_id,
            paid=paid,
            reason=str(exc) if isinstance(exc, GptImageError) else f"{type(exc).__name__}: {exc}",
            error_type=fal_type or type(exc).__name__,
            line=line,
        )

    def label(self) -> str:
        """Which row failed, for one line of output: ``line 7 "a lighthouse at ..."``."""
        where = f"line {self.line} " if self.line is not None else ""
        return f'{where}"{shorten(self.prompt, 40)}"'


class RunSummary(BaseModel):
    """The one-line JSON the CLI prints last (``--json``)."""

    images: list[dict[str, Any]] = Field(
        default_factory=list, description="The images (at most 1000; the manifest has all)."
    )
    failures: list[Failure] = Field(default_factory=list)
    images_total: int = Field(default=0, description="Images produced.")
    staged: int = Field(default=0, description="Images staged to S3.")
    submitted: int = Field(
        default=0,
        description="Requests paid for by this run (not cached), including those whose row "
        "failed after fal accepted them.",
    )
    estimated_cost_usd: float = 0.0
    billed_cost_usd: float | None = Field(
        default=None,
        description="What fal billed for the requests this run paid (an admin key; else None).",
    )
    costs: str = Field(
        default="estimated",
        description="'billed' when fal's billing events reconciled the run, else 'estimated'.",
    )
    cost_differences: list[str] = Field(
        default_factory=list, description="Requests whose bill differs from the estimate."
    )
    not_billed_yet: list[str] = Field(
        default_factory=list, description="Requests with images but no billing event yet."
    )
    swept: int | None = Field(
        default=None,
        description="Requests polled by the webhook sweep (no callback in time); None when "
        "PREFECT_GPTIMAGE_WEBHOOK_URL is not set.",
    )
    manifest_uri: str | None = None
    gallery: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures
