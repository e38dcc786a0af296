"""Package settings, in Prefect's settings tree: prefix ``PREFECT_GPTIMAGE_``.

Nothing here is required: the defaults talk to the real fal.ai. The bundled emulator
(:mod:`prefect_gptimage.testing`) sets ``PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS`` so that
downloads from it are allowed.

:class:`GptImageSettings` is a Prefect settings model (``PrefectBaseSettings``), so each field is
read, highest precedence first, from: keyword arguments, the environment
(``PREFECT_GPTIMAGE_<FIELD>``), a ``.env`` file, a ``[gptimage]`` table in ``prefect.toml``, a
``[tool.prefect.gptimage]`` table in ``pyproject.toml``, and the active Prefect profile in
``profiles.toml``. ``prefect config set`` refuses these keys and ``prefect config set/validate``
and ``prefect profile use`` rewrite ``profiles.toml`` without them, so to set them persistently use
``prefect.toml`` (or edit ``profiles.toml`` by hand).

Example:
    >>> import os
    >>> os.environ["PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES"] = "1000"
    >>> get_settings().max_download_bytes
    1000
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from prefect.settings.base import PrefectBaseSettings, build_settings_config
from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from prefect_gptimage.schemas import DEFAULT_MAX_BODY_BYTES

__all__ = ["GptImageSettings", "get_settings"]


class GptImageSettings(PrefectBaseSettings):
    """prefect-gptimage's settings (``PREFECT_GPTIMAGE_*``; ``[gptimage]`` in prefect.toml)."""

    model_config = build_settings_config(("gptimage",))

    allowed_media_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["fal.media", "*.fal.media"],
        description=(
            "Hosts images may be downloaded from (comma separated; '*.x' matches subdomains of x). "
            "Downloads from any other host, or over plain http, are refused."
        ),
    )
    max_download_bytes: int = Field(
        default=64 * 1024 * 1024, description="Largest image body accepted."
    )
    concurrency_limit_name: str = Field(
        default="fal-gpt-image",
        description="Prefect global concurrency limit that caps fal requests in flight.",
    )
    local_concurrency: int = Field(
        default=16, description="Cap on fal requests in flight when no global limit exists."
    )
    lookahead: int = Field(
        default=0,
        ge=0,
        description=(
            "Requests submitted beyond the local cap, to wait in fal's queue for the next free "
            "slot (use when the cap equals your fal account's limit; see README, Concurrency)."
        ),
    )
    slot_lease: float = Field(
        default=60.0,
        ge=60,
        le=86400,
        description=(
            "Seconds a global concurrency slot's lease lasts on the Prefect server. A live holder "
            "renews it every 3/4 of this; a worker killed while holding a slot gives it back when "
            "the lease ends (plus the server's repossessor loop, 15 s). The server refuses less "
            "than 60."
        ),
    )
    output_dir: str = Field(default="gptimage-output", description="Where images are written.")
    resubmit_expired: bool = Field(
        default=True,
        description=(
            "Submit anew, paying twice, a request whose result fal no longer has (404 after it "
            "completed); logged as 'paid twice: fal expired the result'. False: the row fails."
        ),
    )
    lock_url: str | None = Field(
        default=None,
        description=(
            "redis://host:port/db of a Redis server that serializes submits of the same request "
            "across processes and machines (needs the `redis` extra); unset: no lock."
        ),
    )
    retry_max_delay: float = Field(
        default=8.0,
        gt=0,
        description="Longest wait between two retries of a call, in seconds (backoff from 0.25 s).",
    )
    retry_budget: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Seconds one call to fal, a media host or S3 may spend retrying transient failures "
            "before the run fails (so a command with fal unreachable ends within 2 minutes)."
        ),
    )

    request_timeout: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds a request may take at fal, queue time and run time together, when no "
            "timeout is given (fal's p95 is about 80 s); then it is cancelled at fal and fails."
        ),
    )
    max_result_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES,
        gt=0,
        description=(
            "Largest answer body read from fal's queue (a result with four sync_mode images of "
            "the largest size, 1536x1024 RGBA even uncompressed, fits); a larger result fails, "
            "unread and uncached. Reading and caching a result takes ~6x its size in memory."
        ),
    )
    body_timeout: float = Field(
        default=120.0,
        gt=0,
        description=(
            "Seconds one body (a status, a result, an image) may take to arrive in all; a body "
            "trickled slower fails as transient and is retried within the retry budget."
        ),
    )
    # -- link lifetimes (issue 18) --
    public_base_url: str | None = Field(
        default=None,
        description=(
            "A CDN or public-bucket URL serving the bucket's objects (https://cdn.example.com): "
            "artifacts, galleries and manifests then link <base>/<key>, links that do not "
            "expire, instead of presigned S3 links (valid presign_expires, 1 day by default)."
        ),
    )

    @field_validator("public_base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("https://", "http://")) or "?" in value or "#" in value:
            raise ValueError(f"must be an http(s) URL without query or fragment, got {value!r}")
        return value

    # -- edit inputs and retention at fal (issue 19) ---------------------------------------
    input_max_bytes: int = Field(
        default=50 * 1024 * 1024,
        gt=0,
        description=(
            "Largest input image an edit takes (OpenAI's limit for GPT image edits is 50 MB); "
            "a larger input is refused before anything is paid."
        ),
    )
    inline_input_max_bytes: int = Field(
        default=7 * 1024 * 1024,
        gt=0,
        description=(
            "Largest local or s3:// input sent inline as a data: URI when the run has no "
            "bucket (fal's toolkit caps data URIs at 10 MB, base64 adds a third); larger ones "
            "need a bucket to be staged under <prefix>/inputs/."
        ),
    )
    input_link_expires: int = Field(
        default=3600,
        ge=1,
        le=604800,
        description=(
            "Seconds the presigned links to staged edit inputs stay valid: fal fetches them "
            "once, when the request starts, so keep it short (longer than a queue wait)."
        ),
    )
    store_io: bool = Field(
        default=True,
        description=(
            "Let fal keep each request's payloads (its JSON input and output, 30 days by "
            "default); false sends X-Fal-Store-IO: 0. fal's CDN media are not affected."
        ),
    )
    media_expires: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Seconds fal keeps the images it generates on its CDN "
            "(X-Fal-Object-Lifecycle-Preference); None: fal's default (at least 7 days)."
        ),
    )

    # -- budgets and the bill (issue 21) --
    budget_limit_name: str = Field(
        default="fal-gpt-image-budget",
        description=(
            "Prefect global concurrency limit that is the fleet's spend budget: 1 slot = $0.001, "
            "the limit is the budget, the slot decay per second its refill rate. Each billable "
            "submit takes its estimated price in slots, never handed back. No such limit: no "
            "fleet budget."
        ),
    )
    fal_api_url: str = Field(
        default="https://api.fal.ai",
        description=(
            "fal's platform API: prices are read from it once per run (the built-in table is "
            "the fallback), billing events with FAL_ADMIN_KEY."
        ),
    )
    billing_wait: float = Field(
        default=60.0,
        ge=0,
        description=(
            "Seconds a run (with an admin key) waits at most for fal's billing events of its "
            "requests to appear; rows still without one are reported as not yet billed."
        ),
    )

    # -- webhooks (issue 20): wait on fal's callbacks, not by polling ---------------------------
    webhook_url: str | None = Field(
        default=None,
        description=(
            "Public URL of the webhook receiver (`prefect-gptimage webhooks serve`). Set: every "
            "submit carries it (fal's `fal_webhook`) and a row waits for its callback instead of "
            "polling fal's status."
        ),
    )
    fal_jwks_url: str = Field(
        default="https://rest.alpha.fal.ai/.well-known/jwks.json",
        description="Where the receiver fetches fal's webhook signing keys (JWKS, cached 24 h).",
    )
    webhook_sweep_after: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Seconds a row waits for its callback before it polls fal (the sweep): a lost "
            "callback or a receiver that was down delays a row, never loses it."
        ),
    )
    webhook_suspend: bool = Field(
        default=False,
        description=(
            "With `PREFECT_GPTIMAGE_WEBHOOK_URL` set, a deployment run of the batch flow submits "
            "its rows in waves of its cap and suspends after each (its process ends, no worker "
            "held) until the receiver resumes it once the wave's callbacks are recorded (or "
            "after the sweep delay); it stages after the last wave."
        ),
    )
    queue_priority: Literal["normal", "low"] = Field(
        default="normal",
        description=(
            "fal's queue priority for every submit: `low` sends `X-Fal-Queue-Priority: low` "
            "(the request waits behind every normal one of the endpoint; for background runs)."
        ),
    )

    @field_validator("allowed_media_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value


_read: dict[tuple[str, tuple[tuple[str, str], ...]], GptImageSettings] = {}


def get_settings() -> GptImageSettings:
    """The settings of the current environment: read once per distinct ``PREFECT_*`` variables
    and working directory (where prefect.toml and .env are looked for), so a change to either
    is seen at once.

    Reading them builds the model from every source and stats several files: at one read per
    image, about 7% of a batch's CPU.
    """
    key = (
        os.getcwd(),
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_"))),
    )
    settings = _read.get(key)
    if settings is None:
        if len(_read) > 64:  # environments that come and go (tests): keep the last ones only
            _read.clear()
        settings = _read[key] = GptImageSettings()
    return settings
