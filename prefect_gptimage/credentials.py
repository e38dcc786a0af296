"""``FalCredentials``: a Prefect credentials block holding a fal API key, with fal_client's
env fallback.

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
from typing import TYPE_CHECKING, Any

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, SecretStr

if TYPE_CHECKING:
    from prefect_gptimage.fal.async_client import AsyncFalQueueClient
    from prefect_gptimage.fal.client import FalQueueClient


class FalCredentials(CredentialsBlock):
    """Credentials for fal.ai's queue API (GPT Image 1.5).

    With no ``api_key`` the key comes from the environment: ``FAL_KEY``, else ``FAL_KEY_ID``
    with ``FAL_KEY_SECRET``.

    Example:
        Load stored credentials and get a queue client:
        ```python
        from prefect_gptimage.credentials import FalCredentials

        fal_credentials = FalCredentials.load("BLOCK_NAME")
        client = fal_credentials.get_client()
        ```
    """

    _block_type_name = "fal Credentials"
    _block_type_slug = "fal-credentials"
    _logo_url = "https://fal.ai/logo.png"  # type: ignore[assignment]
    _description = (
        "API key for fal.ai (OpenAI GPT Image 1.5). Falls back to FAL_KEY, or FAL_KEY_ID with "
        "FAL_KEY_SECRET, from the environment."
    )
    _documentation_url = "https://fal.ai/docs"  # type: ignore[assignment]

    api_key: SecretStr | None = Field(
        default=None,
        title="API key",
        description=(
            "fal API key ('key-id:key-secret'). Empty: use FAL_KEY (or FAL_KEY_ID and "
            "FAL_KEY_SECRET) from the environment."
        ),
    )

    admin_key: SecretStr | None = Field(
        default=None,
        title="Admin API key",
        description=(
            "fal admin API key, to read billing events and reconcile a run's bill. Empty: "
            "FAL_ADMIN_KEY from the environment, else costs stay estimates."
        ),
    )

    def get_admin_key(self) -> str | None:
        """The admin key: the block's, else ``FAL_ADMIN_KEY``, else None."""
        if self.admin_key is not None and self.admin_key.get_secret_value():
            return self.admin_key.get_secret_value()
        return os.environ.get("FAL_ADMIN_KEY") or None

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

    def get_client(self, *args: Any, **kwargs: Any) -> FalQueueClient:
        """The shared :class:`~prefect_gptimage.fal.client.FalQueueClient` for this key.

        One client per key and process (see ``FalQueueClient.shared``); no arguments are used.
        """
        from prefect_gptimage.fal.client import FalQueueClient

        return FalQueueClient.shared(self.get_key())

    def get_async_client(self) -> AsyncFalQueueClient:
        """A new :class:`~prefect_gptimage.fal.async_client.AsyncFalQueueClient` for this key."""
        from prefect_gptimage.fal.async_client import AsyncFalQueueClient

        return AsyncFalQueueClient(self.get_key())


def resolve_client(credentials: FalCredentials | None) -> FalQueueClient:
    """The client for ``credentials``, or for the environment's key when None."""
    return (credentials or FalCredentials()).get_client()
