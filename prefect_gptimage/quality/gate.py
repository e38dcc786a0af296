"""The OCR quality gate: does a generated image show the text its prompt quotes?

:func:`judge` is the comparison alone (pure, no OCR): see :mod:`prefect_gptimage.quality.text`
for the normalization and the score. :func:`check_image` reads one downloaded image with
:func:`~prefect_gptimage.quality.ocr.read_text` and judges it; :func:`ocr_check` is the Prefect
task around it (``gptimage-ocr-check``), usable after any task that returns a
:class:`~prefect_gptimage.schemas.DownloadedImage`.

A prompt that quotes nothing has nothing to check: its images pass without being read.

Example:
    >>> verdict = judge("GRAND OPENING", read="Grand Opening")
    >>> verdict.passed, verdict.score
    (True, 1.0)
    >>> judge("GRAND OPENING", read="GRAND OPENIMG").passed
    False

In a flow (needs the ``ocr`` extra)::

    @flow
    def poster(prompt: str) -> bool:
        result = generate_images(GptImageRequest(prompt=prompt, quality="low"))
        return ocr_check(result.images[0], quoted_text(prompt)).passed
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from prefect_gptimage.quality.ocr import DEFAULT_MAX_SIDE, read_text
from prefect_gptimage.quality.text import DEFAULT_MIN_SCORE, TextVerdict, text_score
from prefect_gptimage.schemas import DownloadedImage

__all__ = ["OcrVerdict", "check_image", "judge", "ocr_check"]


class OcrVerdict(TextVerdict):
    """The gate's answer for one image: the comparison, and which image it was read in."""

    seconds: float = Field(default=0.0, description="OCR time for this image.")
    request_id: str | None = None
    index: int | None = None
    sha256: str | None = Field(default=None, description="The image judged.")


def judge(expected: str, *, read: str, min_score: float = DEFAULT_MIN_SCORE) -> OcrVerdict:
    """Compare OCR output ``read`` with ``expected`` (the comparison only; no OCR)."""
    if not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must be between 0 and 1, got {min_score}")
    score = text_score(expected, read)
    return OcrVerdict(
        passed=score >= min_score,
        read_text=read,
        expected=expected,
        score=score,
        min_score=min_score,
    )


def check_image(
    image: DownloadedImage,
    expected_text: str,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    max_side: int = DEFAULT_MAX_SIDE,
) -> OcrVerdict:
    """Read ``image`` and judge it against ``expected_text`` (plain call, no task run).

    Raises:
        ConfigurationError: the ``ocr`` extra is not installed (and there is text to check).
    """
    ids = {"request_id": image.request_id, "index": image.index, "sha256": image.sha256}
    if not expected_text.strip():
        verdict = judge("", read="", min_score=min_score)
        return verdict.model_copy(update=ids)
    reading = read_text(image.path, max_side=max_side)
    verdict = judge(expected_text, read=reading.text, min_score=min_score)
    return verdict.model_copy(update={"seconds": reading.seconds, **ids})


@task(
    name="gptimage-ocr-check",
    task_run_name="ocr-check {image.request_id}/{image.index}",
    cache_policy=NO_CACHE,
)
def ocr_check(
    image: DownloadedImage,
    expected_text: str,
    min_score: float = DEFAULT_MIN_SCORE,
    max_side: int = DEFAULT_MAX_SIDE,
) -> OcrVerdict:
    """Prefect task: OCR ``image`` and compare it with ``expected_text`` (see :func:`judge`).

    Not cached: OCR is local, free and deterministic (about 0.3-1 s per 1024 px image on two
    cores). A failed comparison is a verdict (``passed=False``), not a failed task; only a missing
    ``ocr`` extra (:class:`~prefect_gptimage.errors.ConfigurationError`) or an unreadable file
    fails it.
    """
    return check_image(image, expected_text, min_score=min_score, max_side=max_side)
