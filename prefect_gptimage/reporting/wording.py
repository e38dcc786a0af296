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

__all__ = ["counted", "plural"]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``noun`` for one, else its plural (``many``, by default ``noun + "s"``)."""
    if count == 1:
        return noun
    return many if many is not None else noun + "s"


def counted(count: int, noun: str, many: str | None = None) -> str:
    """``'1 image'``, ``'2 images'``: the count and the noun in the matching number."""
    return f"{count} {plural(count, noun, many)}"
