"""fal's price table for GPT Image 1.5 (fal-protocol §4.4) and cost estimates.

Only the per-image output price is estimated; prompt and image-input tokens add a little
on top (about $0.005 per 1K prompt tokens), which the estimate leaves out and says so.

Example:
    >>> estimate_cost({"quality": "high", "image_size": "1024x1024", "num_images": 2})
    0.266
"""

from __future__ import annotations

from typing import Any

#: USD per output image, by quality then size.
PRICE_PER_IMAGE: dict[str, dict[str, float]] = {
    "low": {"1024x1024": 0.009, "1024x1536": 0.013, "1536x1024": 0.013},
    "medium": {"1024x1024": 0.034, "1024x1536": 0.051, "1536x1024": 0.050},
    "high": {"1024x1024": 0.133, "1024x1536": 0.200, "1536x1024": 0.199},
}


def price_per_image(quality: str, image_size: str) -> float:
    """Price of one output image. ``auto`` (edit only) is priced as the dearest size."""
    table = PRICE_PER_IMAGE[quality]
    if image_size in table:
        return table[image_size]
    return max(table.values())


def estimate_cost(arguments: dict[str, Any]) -> float:
    """Estimated USD for one request given its normalized arguments (defaults as fal's)."""
    quality = str(arguments.get("quality", "high"))
    default_size = "auto" if arguments.get("image_urls") else "1024x1024"
    size = str(arguments.get("image_size", default_size))
    n = int(arguments.get("num_images", 1))
    return round(price_per_image(quality, size) * n, 6)
