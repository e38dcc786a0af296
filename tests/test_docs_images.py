"""The documentation's screenshots: each one in docs/img/ is shown by a page, each image a page
shows exists, and none is heavy (they are taken by benchmarks/ui_screenshots.py and
benchmarks/ui_escapes.py, not by this suite: no Chromium here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"
#: a screenshot kept in the repository stays under this size (crop or shrink it)
MAX_BYTES = 300_000
#: ``![alt](img/x.png)`` (the alt may span lines) or ``<img src="img/x.png">``
_IMAGE_REF = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*\ssrc=\"([^\"]+)\"", re.S)


def referenced() -> dict[Path, list[str]]:
    """Each image path the Markdown pages show, resolved, with the pages that show it."""
    refs: dict[Path, list[str]] = {}
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for match in _IMAGE_REF.finditer(page.read_text(encoding="utf-8")):
            target = match.group(1) or match.group(2)
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            refs.setdefault(path, []).append(str(page.relative_to(ROOT)))
    return refs


def test_every_screenshot_is_shown_by_a_page() -> None:
    shown = referenced()
    unshown = [p.name for p in sorted(IMAGES.iterdir()) if p.resolve() not in shown]
    assert not unshown, f"docs/img files no page shows: {unshown}"


def test_every_image_a_page_shows_exists() -> None:
    missing = {str(p): pages for p, pages in referenced().items() if not p.is_file()}
    assert not missing, f"images shown but missing: {missing}"


def test_screenshots_are_light() -> None:
    heavy = {p.name: p.stat().st_size for p in IMAGES.iterdir() if p.stat().st_size > MAX_BYTES}
    assert not heavy, f"over {MAX_BYTES} bytes, crop or shrink: {heavy}"
