"""Quality gates on generated images: the OCR gate (does the image show the quoted text?).

* :mod:`~prefect_gptimage.quality.text`: :func:`quoted_text`, :func:`normalize_text`,
  :func:`text_score`, :class:`TextVerdict` (no Prefect, no OCR; the bundled emulator and the
  manifest use them too);
* :mod:`~prefect_gptimage.quality.ocr`: :func:`read_text` with RapidOCR, the ``ocr`` extra
  (``pip install "prefect-gptimage[ocr]"``), imported on first use;
* :mod:`~prefect_gptimage.quality.gate`: :class:`OcrVerdict`, :func:`judge`,
  :func:`check_image` and the Prefect task :func:`ocr_check`.

Names are loaded on first use, so ``prefect_gptimage.quality.text`` imports neither Prefect nor
the OCR engine.

Example:
    >>> from prefect_gptimage.quality import judge, quoted_text
    >>> judge(quoted_text('a sign saying "OPEN 24/7"'), read="OPEN 24 7").passed
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DEFAULT_MIN_SCORE": "text",
    "TextVerdict": "text",
    "normalize_text": "text",
    "quoted_text": "text",
    "text_score": "text",
    "OcrReading": "ocr",
    "read_text": "ocr",
    "OcrVerdict": "gate",
    "check_image": "gate",
    "judge": "gate",
    "ocr_check": "gate",
}

__all__ = [
    "DEFAULT_MIN_SCORE",
    "OcrReading",
    "OcrVerdict",
    "TextVerdict",
    "check_image",
    "judge",
    "normalize_text",
    "ocr_check",
    "quoted_text",
    "read_text",
    "text_score",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from prefect_gptimage.quality.gate import OcrVerdict, check_image, judge, ocr_check
    from prefect_gptimage.quality.ocr import OcrReading, read_text
    from prefect_gptimage.quality.text import (
        DEFAULT_MIN_SCORE,
        TextVerdict,
        normalize_text,
        quoted_text,
        text_score,
    )
