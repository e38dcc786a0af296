"""How one request is generated: the one frozen options object passed down the whole path.

:class:`GenerationOptions` goes from a flow (or a direct call) through the row task to every step
of :func:`~prefect_gptimage.tasks.generate.generate`: credentials, where files go, the deadline,
the cache and resubmit rules, the local cap, the stop, the fleet budget's wait and what fal may
keep. One object, so a step never takes ten parameters and a new option reaches every step.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.fal.retention import Retention
from prefect_gptimage.settings import get_settings

__all__ = ["GenerationOptions"]


class GenerationOptions(BaseModel):
    """How one request is generated. Frozen: pass one object down the whole path.

    Example:
        >>> GenerationOptions(timeout=600, variant=1).resubmits
        1
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    credentials: FalCredentials | None = Field(
        default=None, description="fal key (None: FAL_KEY from the environment)."
    )
    output_dir: str | None = Field(
        default=None, description="Where images are written (None: PREFECT_GPTIMAGE_OUTPUT_DIR)."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Seconds to wait for fal (queue and run time) before cancelling the request "
            "(None: PREFECT_GPTIMAGE_REQUEST_TIMEOUT, default 600)."
        ),
    )
    refresh_cache: bool = Field(default=False, description="Submit anew even if cached.")
    resubmit_unknown: bool = Field(
        default=False,
        description=(
            "Submit anew a request whose earlier submit's outcome is unknown (possibly billed: "
            "a dropped connection, a killed run). Off: such a request fails, unpaid, saying so."
        ),
    )
    variant: int = Field(default=0, ge=0, description="Ask for a fresh image of a same request.")
    resubmits: int = Field(
        default=1,
        ge=0,
        description="Fresh submits after a failure fal did not bill, or a result fal expired.",
    )
    resubmit_expired: bool | None = Field(
        default=None,
        description=(
            "Submit anew, paying twice, a request whose result fal no longer has (404 after it "
            "completed); logged as 'paid twice: fal expired the result'. None: the setting "
            "PREFECT_GPTIMAGE_RESUBMIT_EXPIRED (default True)."
        ),
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, description="Lower the local cap on fal requests in flight."
    )
    lookahead: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Requests in flight beyond the local cap, waiting in fal's queue for the next free "
            "slot (None: PREFECT_GPTIMAGE_LOOKAHEAD). Only when the cap is the account's limit."
        ),
    )
    stop: Any = Field(
        default=None,
        exclude=True,
        description=(
            "A stop request (an object with a ``requested`` flag: the engine's Stop): once "
            "requested, a request not yet submitted is not submitted (fails 'not started')."
        ),
    )
    budget_wait: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a submit may wait for the fleet budget to refill (0: fail at once).",
    )
    download_tasks: bool = Field(
        default=False,
        description="Download each image as its own task run (default: plain calls, one task "
        "run per request).",
    )
    store_io: bool | None = Field(
        default=None,
        description="Let fal store the request's payloads; False sends X-Fal-Store-IO: 0 "
        "(None: PREFECT_GPTIMAGE_STORE_IO).",
    )
    media_expires: int | None = Field(
        default=None,
        ge=1,
        description="Seconds fal keeps the generated images on its CDN "
        "(X-Fal-Object-Lifecycle-Preference; None: PREFECT_GPTIMAGE_MEDIA_EXPIRES).",
    )

    paid_in_run: frozenset[str] = Field(
        default_factory=frozenset,
        description="fal request ids this flow run paid for before it suspended (a resumed "
        "batch, see engine/suspend): their recorded submits count as paid, not cached.",
    )

    def retention(self) -> Retention:
        """What fal may keep of each request: these options, else the settings."""
        settings = get_settings()
        return Retention(
            store_io=settings.store_io if self.store_io is None else self.store_io,
            media_expires=self.media_expires or settings.media_expires,
        )
