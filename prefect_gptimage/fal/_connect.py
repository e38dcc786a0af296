"""The httpx clients every queue call goes through, built from fal_client's public parts only.

fal_client's ``SyncClient``/``AsyncClient`` keep their httpx client private and retry every call
themselves (submit included, fal-protocol §2.4), so the client layer does not use them. It builds
its own httpx client the way fal_client does, from fal_client's public names:

* the key: the one given, or fal_client's own chain (``FAL_KEY``, ``FAL_KEY_ID`` +
  ``FAL_KEY_SECRET``, a Colab secret, a ``fal auth login`` token) through
  ``fal_client.auth.fetch_auth_credentials[_async]``;
* fal_client's ``User-Agent`` and its backup-domain transport (``queue.falrun.com`` when
  ``queue.fal.run`` cannot be reached), with :class:`~prefect_gptimage.fal._transport.FalTransport`
  outermost, so every failure is this package's error and only the client core retries.

fal_client's request handles (``SyncRequestHandle``/``AsyncRequestHandle``, public) are then
driven over this client for status and cancel; submit and result are plain calls on it.
"""

from __future__ import annotations

import httpx
from fal_client.auth import AuthCredentials, fetch_auth_credentials, fetch_auth_credentials_async
from fal_client.client import USER_AGENT, AsyncBackupDomainTransport, BackupDomainTransport

from prefect_gptimage.fal._transport import BodyLimits, FalTransport

__all__ = ["SUBMIT_TIMEOUT", "async_http", "sync_http"]

#: Seconds a submit's answer may take (fal_client's ``default_timeout``).
SUBMIT_TIMEOUT = 120.0


def _headers(authorization: str) -> dict[str, str]:
    return {"Authorization": authorization, "User-Agent": USER_AGENT}


def sync_http(key: str | None, limits: BodyLimits) -> httpx.Client:
    """A synchronous client for ``key`` (None: fal_client's credential chain).

    Raises fal_client's ``MissingCredentialsError`` when there is no key anywhere.
    """
    auth = fetch_auth_credentials() if key is None else AuthCredentials("Key", key)
    return httpx.Client(
        transport=FalTransport(BackupDomainTransport(), limits),
        headers=_headers(auth.header_value),
        timeout=SUBMIT_TIMEOUT,
        follow_redirects=True,
    )


async def async_http(key: str | None, limits: BodyLimits) -> httpx.AsyncClient:
    """:func:`sync_http` for asyncio."""
    auth = await fetch_auth_credentials_async() if key is None else AuthCredentials("Key", key)
    return httpx.AsyncClient(
        transport=FalTransport(AsyncBackupDomainTransport(), limits),
        headers=_headers(auth.header_value),
        timeout=SUBMIT_TIMEOUT,
        follow_redirects=True,
    )
