"""Is it an image fal's edit takes? Decoded with Pillow, never parsed by hand.

The bytes must decode as a PNG, JPEG or WebP (the formats GPT image edits accept) and Pillow
must be able to load its pixels (a truncated file fails here, not at fal). A mask must besides
be a PNG with an alpha channel: its fully transparent pixels mark where the image is edited.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError

from prefect_gptimage.errors import InputImageError

__all__ = ["ACCEPTED_FORMATS", "InputImage", "inspect_image"]

#: Pillow format name -> (content type, file extension) of the inputs an edit takes.
ACCEPTED_FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}


@dataclass(frozen=True)
class InputImage:
    """What was read for one input: its bytes and what Pillow saw in them."""

    data: bytes
    sha256: str
    width: int
    height: int
    content_type: str
    extension: str
    has_alpha: bool


def inspect_image(
    field: str, source: str, data: bytes, role: Literal["image", "mask"] = "image"
) -> InputImage:
    """``data`` as an :class:`InputImage`; :class:`InputImageError` naming ``source`` when it is
    not an image an edit takes (or, for a mask, not a PNG with an alpha channel)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = (img.format or "").upper()
                img.load()  # decodes every pixel: a truncated or corrupt file fails here
                width, height = img.size
                has_alpha = "A" in img.getbands() or "transparency" in img.info
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputImageError(field, source, "not an image (Pillow cannot decode it)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputImageError(field, source, f"not a readable image ({exc})") from None
    if fmt not in ACCEPTED_FORMATS:
        raise InputImageError(
            field, source, f"a {fmt or 'unknown'} image: an edit takes PNG, JPEG or WebP"
        )
    if role == "mask" and (fmt != "PNG" or not has_alpha):
        raise InputImageError(
            field,
            source,
            "a mask must be a PNG with an alpha channel (its fully transparent pixels are "
            "where the image is edited)",
        )
    content_type, extension = ACCEPTED_FORMATS[fmt]
    return InputImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        content_type=content_type,
        extension=extension,
        has_alpha=has_alpha,
    )
