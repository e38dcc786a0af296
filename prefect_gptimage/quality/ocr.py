"""Read the text in an image with RapidOCR (``rapidocr-onnxruntime``, the ``ocr`` extra).

The OCR models (PP-OCRv4 detection and recognition, ONNX) ship inside the
``rapidocr-onnxruntime`` wheel: nothing is downloaded at run time, and nothing leaves the
machine. The package is imported on first use only, so the rest of prefect-gptimage works
without it; when it is missing, :func:`read_text` raises :class:`ConfigurationError` naming the
extra to install.

One engine is loaded per process (about 0.6 s, once) and shared. onnxruntime already uses every
core for one image, so calls are serialized by a lock: more threads would only contend.

Example:
    >>> reading = read_text("poster.png")  # doctest: +SKIP
    >>> reading.text, reading.lines  # doctest: +SKIP
    ('GRAND OPENING Saturday', ['GRAND OPENING', 'Saturday'])
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from prefect_gptimage.errors import ConfigurationError

__all__ = ["INSTALL_HINT", "OcrReading", "read_text", "require_ocr"]

INSTALL_HINT = 'the OCR quality gate needs its extra: pip install "prefect-gptimage[ocr]"'

#: Images are shrunk so that their longer side is at most this many pixels before OCR: text a
#: viewer can read at a glance stays readable, and detection time falls with the pixel count.
DEFAULT_MAX_SIDE = 1024

_lock = threading.Lock()
_engine: Any = None


class OcrReading(BaseModel):
    """What OCR read in one image."""

    text: str = Field(description="Every line read, top to bottom, joined by spaces.")
    lines: list[str] = Field(default_factory=list, description="Each text line read.")
    confidence: float | None = Field(
        default=None, description="Lowest recognition confidence of the lines (0..1)."
    )
    seconds: float = Field(description="Time spent reading, the engine's first load excluded.")


def require_ocr() -> None:
    """Load the OCR engine now (a flow's preflight), or raise :class:`ConfigurationError`."""
    with _lock:
        _load_engine()


def _load_engine() -> Any:
    global _engine
    if _engine is None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ConfigurationError(f"{INSTALL_HINT} ({exc})") from None
        _engine = RapidOCR(print_verbose=False)
    return _engine


def _pixels(image: str | Path | bytes, max_side: int) -> Any:
    """The image as an RGB numpy array, its longer side at most ``max_side``."""
    import numpy as np
    from PIL import Image

    source = io.BytesIO(image) if isinstance(image, bytes) else image
    with Image.open(source) as img:
        if img.mode in ("RGBA", "LA", "P"):  # transparent areas read as white, not black
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            rgb = flat
        else:
            rgb = img.convert("RGB")
        if max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        # RapidOCR works in OpenCV's BGR order
        return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


def read_text(image: str | Path | bytes, *, max_side: int = DEFAULT_MAX_SIDE) -> OcrReading:
    """Read every line of text in ``image`` (a file path or encoded bytes).

    Raises:
        ConfigurationError: the ``ocr`` extra (``rapidocr-onnxruntime``) is not installed.
    """
    with _lock:
        engine = _load_engine()
        pixels = _pixels(image, max_side)
        start = time.perf_counter()
        found, _ = engine(pixels, use_cls=False)
        seconds = time.perf_counter() - start
    boxes = found or []  # in reading order: top to bottom, then left to right
    lines = [str(f[1]).strip() for f in boxes if str(f[1]).strip()]
    confidence = min((float(f[2]) for f in boxes), default=None)
    return OcrReading(
        text=" ".join(lines), lines=lines, confidence=confidence, seconds=round(seconds, 4)
    )
