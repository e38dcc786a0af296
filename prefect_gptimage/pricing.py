"""The one price source of GPT Image 1.5 on fal (fal-protocol §4.4): estimates, budgets, max-cost.

The built-in table is fal's published price per output image, by quality then size. When fal's
platform API answered a run's pricing read (:func:`use_fal_prices`, called once per run by
:func:`prefect_gptimage.tasks.prices.load_prices`), fal's unit price of an endpoint is read as
the price of its base unit (``low``, ``1024x1024``) and the whole table of that endpoint scales
with it: fal's pricing route gives one ``unit_price`` per endpoint, not a table. The estimate,
the per-run ``max_cost``, the fleet budget and the reports all price through
:func:`price_per_image` / :func:`estimate_cost`, so they always agree.

Only the per-image output price is estimated; prompt and image-input tokens add a little
on top (about $0.005 per 1K prompt tokens), which the estimate leaves out and says so.

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> estimate_cost(GptImageRequest(prompt="a kite", quality="high", num_images=2))
    0.266
"""

from __future__ import annotations

import threading

from prefect_gptimage.schemas import TEXT_TO_IMAGE_ENDPOINT, AnyRequest

__all__ = [
    "BASE_QUALITY",
    "BASE_SIZE",
    "PRICE_PER_IMAGE",
    "PriceChange",
    "builtin_unit_price",
    "estimate_cost",
    "price_per_image",
    "price_source",
    "use_fal_prices",
]

#: USD per output image, by quality then size (the built-in table: fal's published prices).
PRICE_PER_IMAGE: dict[str, dict[str, float]] = {
    "low": {"1024x1024": 0.009, "1024x1536": 0.013, "1536x1024": 0.013},
    "medium": {"1024x1024": 0.034, "1024x1536": 0.051, "1536x1024": 0.050},
    "high": {"1024x1024": 0.133, "1024x1536": 0.200, "1536x1024": 0.199},
}
#: The unit fal's ``unit_price`` prices: one image at this quality and size.
BASE_QUALITY, BASE_SIZE = "low", "1024x1024"

_lock = threading.Lock()
#: endpoint id -> fal's unit price, as last read (a cache of fal's answer, not run state)
_fal_unit_prices: dict[str, float] = {}


class PriceChange(tuple[str, float, float]):
    """(endpoint id, built-in unit price, fal's unit price): where fal's price differs."""

    __slots__ = ()

    def __str__(self) -> str:
        endpoint, builtin, fal = self
        return (
            f"fal prices {endpoint} at ${fal:g} per image, the built-in table at ${builtin:g}: "
            "using fal's price"
        )


def builtin_unit_price() -> float:
    """The built-in price of fal's unit (one ``low`` 1024x1024 image)."""
    return PRICE_PER_IMAGE[BASE_QUALITY][BASE_SIZE]


def use_fal_prices(unit_prices: dict[str, float]) -> list[PriceChange]:
    """Price from now on with fal's ``unit_prices`` (endpoint id -> USD per unit); returns where
    they differ from the built-in table. An empty dict goes back to the built-in table."""
    builtin = builtin_unit_price()
    with _lock:
        _fal_unit_prices.clear()
        _fal_unit_prices.update({e: p for e, p in unit_prices.items() if p > 0})
        return [
            PriceChange((e, builtin, p))
            for e, p in sorted(_fal_unit_prices.items())
            if abs(p - builtin) > 1e-9
        ]


def price_source() -> str:
    """Where prices come from now: ``"fal"`` (the pricing route answered) or ``"built-in"``."""
    with _lock:
        return "fal" if _fal_unit_prices else "built-in"


def price_per_image(quality: str, image_size: str, endpoint: str = TEXT_TO_IMAGE_ENDPOINT) -> float:
    """Price of one output image. ``auto`` (edit only) is priced as the dearest size."""
    table = PRICE_PER_IMAGE[quality]
    price = table[image_size] if image_size in table else max(table.values())
    with _lock:
        fal = _fal_unit_prices.get(endpoint)
    if fal is None:
        return price
    return round(price * fal / builtin_unit_price(), 6)


def estimate_cost(request: AnyRequest) -> float:
    """Estimated USD for one request (its quality, size and image count; defaults are fal's)."""
    each = price_per_image(request.quality, request.image_size, request.endpoint)
    return round(each * request.num_images, 6)
