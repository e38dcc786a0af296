"""Counts in words for what people read: task run names, artifact descriptions, galleries.

``assets: 1 images`` or ``2 request(s)`` reads as a machine's; every count this package shows a
person goes through :func:`counted` (or :func:`plural` when the number is drawn apart, e.g. in
bold), so the rule is kept in one place.

Example:
    >>> counted(1, "image"), counted(0, "image"), counted(3, "failure")
    ('1 image', '0 images', '3 failures')
    >>> f"**{2}** {plural(2, 'entry', 'entries')}"
    '**2** entries'
"""

from __future__ import annotations

__all__ = ["counted", "dry_run_message", "plural"]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``noun`` for one, else its plural (``many``, by default ``noun + "s"``)."""
    if count == 1:
        return noun
    return many if many is not None else noun + "s"


def counted(count: int, noun: str, many: str | None = None) -> str:
    """``'1 image'``, ``'2 images'``: the count and the noun in the matching number."""
    return f"{count} {plural(count, noun, many)}"


def dry_run_message(estimate: float, rows: int, cached: int) -> str:
    """The one line of a dry run (the CLI's and the batch flow's): what a real run would pay.

    Example:
        >>> dry_run_message(0.018, 3, 1)
        'dry run: $0.018 for 2 requests (1 cached)'
        >>> dry_run_message(0.0, 2, 2)
        'dry run: nothing to pay: all 2 requests are cached'
    """
    to_pay = rows - cached
    if to_pay == 0 and rows:
        verb = "is" if rows == 1 else "are"
        return f"dry run: nothing to pay: all {counted(rows, 'request')} {verb} cached"
    cached_note = f" ({cached} cached)" if cached else ""
    return f"dry run: ${estimate:.3f} for {counted(to_pay, 'request')}{cached_note}"
