"""The options every row-engine run shares, in one frozen object.

The flows keep their keyword parameters (Prefect users and deployments pass them) and build one
:class:`RunOptions` from them; the engine takes only the object.

Example:
    >>> RunOptions(bucket="my-images", concurrency=4).generation("out/run").max_in_flight
    4
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.tasks.options import GenerationOptions

__all__ = ["RunOptions"]


class RunOptions(BaseModel):
    """How a run of rows goes: where images land, what it may spend, how wide it fans out."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    bucket: Any = Field(
        default=None, description="A bucket name or a prefect-aws S3Bucket block (None: local)."
    )
    prefix: str | None = Field(default=None, description="Key prefix (None: the block's folder).")
    output_dir: str | None = Field(
        default=None, description="Local folder (None: PREFECT_GPTIMAGE_OUTPUT_DIR)."
    )
    credentials: FalCredentials | None = None
    timeout: float | None = Field(default=None, gt=0, description="Seconds per request at fal.")
    refresh: bool = Field(default=False, description="Submit anew even if cached.")
    presign_expires: int = Field(default=86400, description="Lifetime of presigned links (s).")
    resubmit_unknown: bool = Field(
        default=False, description="Submit anew a request whose earlier outcome is unknown."
    )
    concurrency: int = Field(default=8, ge=1, description="Requests in flight at fal, at most.")
    lookahead: int | None = Field(
        default=None, ge=0, description="Requests queued at fal beyond the cap (None: setting)."
    )
    max_cost: float | None = Field(
        default=None, ge=0, description="Refuse (or stop paying) beyond this many USD."
    )
    cluster: str | None = Field(default=None, description="A Dask scheduler address.")
    store_io: bool | None = Field(
        default=None, description="False: X-Fal-Store-IO: 0 (None: PREFECT_GPTIMAGE_STORE_IO)."
    )
    media_expires: int | None = Field(
        default=None, ge=1, description="Seconds fal keeps the images (None: the setting)."
    )
    input_link_expires: int | None = Field(
        default=None,
        ge=1,
        le=604800,
        description="Lifetime of the links to staged edit inputs, seconds (None: the setting).",
    )
    budget_wait: float = Field(
        default=0.0, ge=0, description="Seconds a submit may wait for the fleet budget to refill."
    )

    def generation(self, output_dir: str, stop: Any = None) -> GenerationOptions:
        """The options of each row's request (its ``variant`` is set per row); ``stop``: the
        run's :class:`~prefect_gptimage.engine.stop.Stop`, checked before each submit."""
        return GenerationOptions(
            stop=stop,
            credentials=self.credentials,
            output_dir=output_dir,
            timeout=self.timeout,
            refresh_cache=self.refresh,
            resubmit_unknown=self.resubmit_unknown,
            max_in_flight=self.concurrency,
            lookahead=self.lookahead,
            store_io=self.store_io,
            media_expires=self.media_expires,
            budget_wait=self.budget_wait,
        )
