"""The text a prompt quotes, and how OCR output is compared with it (no Prefect, no OCR here).

:class:`TextVerdict` is the comparison's outcome, the fields every verdict shares: the gate's
:class:`~prefect_gptimage.quality.gate.OcrVerdict` and the manifest's
:class:`~prefect_gptimage.reporting.manifest.OcrVerdictRecord` extend it (this module imports
nothing of the package, so the reporting layer can build on it without depending on the gate).

GPT Image renders the words a prompt puts in quotes (``a poster that says "GRAND OPENING"``).
:func:`quoted_text` finds them: text between straight double quotes or curly quotes (“…”), the
segments joined by one space. :func:`text_score` compares what OCR read with it:

* both are **normalized** (:func:`normalize_text`): Unicode NFKC, lower case, every character
  that is not a letter or digit dropped, *including whitespace*: OCR often merges or splits words
  (``GRANDOPENING``), and line breaks depend on the layout, so spacing carries no signal;
* the score is difflib's similarity ratio, ``2*M / (len(a) + len(b))``, of the expected text and
  the best-matching stretch of what was read (so other words in the picture, a logo or a caption,
  do not lower it);
* the text passes when the score is at least ``min_score`` (:data:`DEFAULT_MIN_SCORE`, 0.97).

One wrong letter in a text of *n* letters and digits scores about ``1 - 1/n``: at 0.97 it fails
texts of up to 33 characters, which is what a headline or a label is. Raise ``min_score`` to 1.0
for an exact match, lower it (0.9) for small text on busy backgrounds, where OCR itself errs.

Example:
    >>> quoted_text('a poster that says "Grand Opening" and “Free coffee”')
    'Grand Opening Free coffee'
    >>> normalize_text("  Grand  OPENING! ")
    'grandopening'
    >>> text_score("Grand Opening", "GRANDOPENING")
    1.0
    >>> round(text_score("Grand Opening", "Grand Opneing"), 3)
    0.917
"""

from __future__ import annotations

import difflib
import re
import unicodedata

from pydantic import BaseModel, Field

__all__ = ["DEFAULT_MIN_SCORE", "TextVerdict", "normalize_text", "quoted_text", "text_score"]

#: Default similarity a read text needs to pass (see the module docs).
DEFAULT_MIN_SCORE = 0.97


class TextVerdict(BaseModel):
    """Does what was read match what was expected: the fields of every OCR verdict."""

    passed: bool = Field(description="score >= min_score (always True when nothing is expected).")
    read_text: str = Field(description="What OCR read, lines joined by spaces.")
    expected: str = Field(description="The text the prompt quotes ('': nothing to check).")
    score: float = Field(description="Similarity of the normalized texts, 0..1.")
    min_score: float = Field(description="The score needed to pass.")


_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def quoted_text(prompt: str) -> str:
    """The text ``prompt`` quotes ("…" or “…”), segments joined by a space; ``""`` if none."""
    segments = (" ".join((a or b).split()) for a, b in _QUOTED.findall(prompt))
    return " ".join(s for s in segments if s)


def normalize_text(text: str) -> str:
    """NFKC, lower case, letters and digits only (whitespace and punctuation dropped)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def text_score(expected: str, read: str) -> float:
    """Similarity (0..1) of ``expected`` and the best-matching stretch of ``read``, normalized.

    An empty expected text scores 1.0 (nothing to check); nothing read scores 0.0.
    """
    want, got = normalize_text(expected), normalize_text(read)
    if not want:
        return 1.0
    if not got:
        return 0.0
    best = difflib.SequenceMatcher(None, want, got, autojunk=False).ratio()
    n = len(want)
    if len(got) > n:  # other text in the picture: score the best window (one edit either way)
        for size in (n - 1, n, n + 1):
            for start in range(len(got) - size + 1):
                window = got[start : start + size]
                score = difflib.SequenceMatcher(None, want, window, autojunk=False).ratio()
                best = max(best, score)
    return round(best, 6)
