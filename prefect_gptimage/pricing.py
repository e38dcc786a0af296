"""fal's price table for GPT Image 1.5 (fal-protocol §4.4) and cost estimates.

Only the per-image output price is estimated; prompt and image-input tokens add a little
on top (about $0.005 per 1K prompt tokens), which the estimate leaves out and says so.

Example:
    >>> from prefect_gptimage.schemas import GptImageRequest
    >>> estimate_cost(GptImageRequest(prompt="a kite", quality="high", num_images=2))
    0.266
"""

from __future__ import annotations

from prefect_gptimage.schemas import AnyRequest

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


def estimate_cost(request: AnyRequest) -> float:
    """Estimated USD for one request (its quality, size and image count; defaults are fal's)."""
    return round(price_per_image(request.quality, request.image_size) * request.num_images, 6)
