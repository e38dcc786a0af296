"""Settings read from the environment (prefix ``PREFECT_GPTIMAGE_``), via pydantic-settings.

Nothing here is required: the defaults talk to the real fal.ai. The bundled emulator
(:mod:`prefect_gptimage.testing`) sets ``PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS`` so that
downloads from it are allowed.

Example:
    >>> import os
    >>> os.environ["PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES"] = "1000"
    >>> get_settings().max_download_bytes
    1000
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class GptImageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFECT_GPTIMAGE_", extra="ignore")

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
    output_dir: str = Field(default="gptimage-output", description="Where images are written.")

    @field_validator("allowed_media_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value


def get_settings() -> GptImageSettings:
    """Fresh settings from the current environment (cheap; read on each call on purpose)."""
    return GptImageSettings()
