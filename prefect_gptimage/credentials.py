"""``FalCredentials``: a Prefect block holding a fal API key, with fal_client's env fallback.

A block is optional: with none, everything uses the key fal_client finds itself (``FAL_KEY``,
or ``FAL_KEY_ID`` with ``FAL_KEY_SECRET``). The key is a ``SecretStr``: it never shows in logs,
task results, cache keys, artifacts or exception messages.

Example:
    >>> from pydantic import SecretStr
    >>> FalCredentials(api_key=SecretStr("key-id:key-secret")).save("fal")   # once
    >>> creds = FalCredentials.load("fal")
    >>> client = creds.get_client()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from prefect_gptimage.fal.client import FalQueueClient


class FalCredentials(Block):
    """Credentials for fal.ai's queue API."""

    _block_type_name = "fal Credentials"
    _block_type_slug = "fal-credentials"
    _description = "API key for fal.ai (GPT Image 1.5). Falls back to FAL_KEY / FAL_KEY_ID+SECRET."
    _documentation_url = "https://fal.ai/docs"  # type: ignore[assignment]

    api_key: SecretStr | None = Field(
        default=None,
        description="fal API key ('key-id:key-secret'). Empty: use FAL_KEY from the environment.",
    )

    def get_key(self) -> str | None:
        """The key to use: the block's, else ``FAL_KEY``, else ``FAL_KEY_ID:FAL_KEY_SECRET``.

        None leaves the choice to fal_client (which also knows ``fal auth login`` tokens).
        """
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if key := os.environ.get("FAL_KEY"):
            return key
        key_id, secret = os.environ.get("FAL_KEY_ID"), os.environ.get("FAL_KEY_SECRET")
        if key_id and secret:
            return f"{key_id}:{secret}"
        return None

    def get_client(self) -> FalQueueClient:
        """A shared :class:`~prefect_gptimage.client.FalQueueClient` for this key."""
        from prefect_gptimage.fal.client import FalQueueClient

        return FalQueueClient.shared(self.get_key())


def resolve_client(credentials: FalCredentials | None) -> FalQueueClient:
    """The client for ``credentials``, or for the environment's key when None."""
    return (credentials or FalCredentials()).get_client()
