"""Read fal's prices once per run: the platform API's pricing route, else the built-in table.

A run (a batch, the OCR gate) calls :func:`load_prices` before it plans. It asks fal's platform
API (``PREFECT_GPTIMAGE_FAL_API_URL``, default ``https://api.fal.ai``) for the unit price of
both GPT Image 1.5 endpoints, once, with one short try: prices are not worth retrying for, the
built-in table is a fine answer. fal unreachable (no network, no key, an error) falls back to
the built-in table with one INFO line; a fal price that differs from the table is used, with one
warning naming both. From then on every price (estimate, ``max_cost``, fleet budget, reports)
is read from :mod:`prefect_gptimage.pricing`, the one price source.

Example:
    >>> load_prices()  # doctest: +SKIP
    'fal'
"""

from __future__ import annotations

import logging

from prefect_gptimage.credentials import FalCredentials
from prefect_gptimage.fal.platform import FalPlatformClient
from prefect_gptimage.pricing import use_fal_prices
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import EDIT_ENDPOINT, TEXT_TO_IMAGE_ENDPOINT
from prefect_gptimage.settings import get_settings

__all__ = ["PRICE_READ_TIMEOUT", "load_prices"]

logger = logging.getLogger("prefect_gptimage.prices")

#: Seconds the pricing read may take: one try, then the built-in table.
PRICE_READ_TIMEOUT = 10.0


def load_prices(
    credentials: FalCredentials | None = None,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> str:
    """Read fal's unit prices into the one price source; ``"fal"`` or ``"built-in"``."""
    out = log or logger
    url = get_settings().fal_api_url
    client = FalPlatformClient(
        url,
        key=(credentials or FalCredentials()).get_key(),
        retry=RetryPolicy(budget=PRICE_READ_TIMEOUT, attempts=1),
        timeout=PRICE_READ_TIMEOUT,
    )
    endpoints = [TEXT_TO_IMAGE_ENDPOINT, EDIT_ENDPOINT]
    try:
        prices = client.prices(endpoints)
    except Exception as exc:
        use_fal_prices({})
        out.info("prices: the built-in table (fal's pricing at %s not read: %s)", url, exc)
        return "built-in"
    usd = {e: p.unit_price for e, p in prices.items() if p.currency.upper() == "USD"}
    for change in use_fal_prices(usd):
        out.warning("%s", change)
    return "fal" if usd else "built-in"
