r"""Galleries of a batch's images: the markdown gallery artifact and a standalone HTML page.

Both render the same records (staged or downloaded images, failures) for people to look at, so
they share the escaping rules kept here: prompts and reasons are user input and are always
escaped; only ``http(s)`` URLs become links. The markdown gallery uses raw
``<img src="presigned-url" width="160">`` tags (the Prefect UI honours the width, which makes
thumbnails; ``![](url)`` would be drawn full size), each wrapped in a link to the full image. The
HTML page shows downloaded images through relative paths and staged ones through their presigned
URLs.

A run through the OCR quality gate passes each image's verdict (``verdicts``, keyed by request id
and index): it is shown beside the size and cost, in one short line
(:meth:`~prefect_gptimage.reporting.manifest.OcrVerdictRecord.label`, escaped like any text).

**Presigned links expire** (``S3Target.presign_expires``, 1 day by default): the gallery says
until when. After that each thumbnail is drawn as a broken image with its prompt as alt text, and
its link answers 403; the ``s3://`` URIs in the run manifest stay valid, and re-running the batch
(served from the cache: nothing is paid again) publishes the gallery again with fresh links.
With ``PREFECT_GPTIMAGE_PUBLIC_BASE_URL`` set (a CDN or a public bucket) the links are
``<base>/<key>`` and do not expire: :func:`links_lifetime` says which, in one place.

**Escaping for the Prefect UI.** Every character of a prompt shows as itself. The V1 UI's
markdown renderer decodes only ``&amp;``, ``&lt;``, ``&gt;`` and ``&quot;``; any other entity
(``&#124;``, ``&middot;``) is shown literally (the V2 UI decodes them all). So text is HTML-escaped
with those three, and every markdown special gets a backslash (CommonMark's escape, drawn as the
plain character by both UIs), ``|`` included: ``\\|`` never splits a table row's cells (GFM
tables split on unescaped pipes only) and is drawn as ``|``. A leading ``1.`` or ``-`` is
escaped too, so a prompt never starts a list. No other entity is ever written.
``benchmarks/ui_escapes.py`` screenshots all of it in both UIs (``docs/img/ui-escapes-*.png``).

Example:
    >>> escape_text("<b>*hi*</b> | #1 & more")
    '&lt;b&gt;\\*hi\\*&lt;/b&gt; \\| \\#1 &amp; more'
    >>> escape_text("1. a-b"), escape_text("- a")
    ('1\\. a-b', '\\- a')
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
import shutil
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from prefect_gptimage.reporting.manifest import ManifestTotals, OcrVerdictRecord, cost_per_image
from prefect_gptimage.reporting.wording import counted, plural
from prefect_gptimage.s3 import StagedImage
from prefect_gptimage.schemas import AnyRequest, DownloadedImage

__all__ = [
    "THUMB_WIDTH",
    "FailureLike",
    "HtmlGallery",
    "Verdicts",
    "escape_attr",
    "escape_text",
    "gallery_markdown",
    "links_lifetime",
    "links_valid_until",
    "lookup_request",
    "safe_url",
    "write_html_gallery",
]


class FailureLike(Protocol):
    """A failure record: :class:`~prefect_gptimage.manifest.FailureLine` or anything shaped so."""

    @property
    def prompt(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def error_type(self) -> str | None: ...


THUMB_WIDTH = 160

#: The OCR gate's verdict on each image of a gated run, by ``(request_id, index)``.
Verdicts = Mapping[tuple[str, int], OcrVerdictRecord]

#: CommonMark backslash escapes: drawn as the plain character, never as markup (``\\|`` also
#: keeps a GFM table row's cells).
_MD_SPECIAL = {c: "\\" + c for c in "\\`*_{}[]()#+!|~$"}
#: What starts a list or a rule only at the start of a line (``1.``, ``-``): escaped there only.
_LINE_START = re.compile(r"^(\d+)\.|^-")
_ATTR_SPECIAL = re.compile(r"[\\`*_{}\[\]()#+!|~$<>&\"']")


def _one_line(value: object, limit: int | None) -> str:
    text = " ".join(str(value).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def escape_text(value: str, limit: int | None = 300, *, in_table: bool = True) -> str:
    """Untrusted text for a markdown artifact: one line, cut to ``limit`` characters,
    HTML-escaped (``&amp; &lt; &gt;`` only) and markdown specials backslash-escaped, so that
    the Prefect UI draws each character as itself.

    The same text is safe anywhere in the markdown: in a table row (a ``|`` is ``\\|``), a list
    item, a heading or a paragraph of its own. ``in_table`` is accepted for callers written when
    a table row needed another pipe; it changes nothing.
    """
    del in_table
    escaped = html.escape(_one_line(value, limit), quote=False)
    out = "".join(_MD_SPECIAL.get(c, c) for c in escaped)
    return _LINE_START.sub(lambda m: f"{m[1]}\\." if m[1] else "\\-", out)


def escape_attr(value: str, limit: int | None = 100) -> str:
    """Untrusted text for a double-quoted HTML attribute (``alt``) inside a markdown table row.

    Markdown does not apply inside an attribute (a backslash would show), so markdown and HTML
    specials are replaced by spaces instead: the alt text, shown in place of an expired
    thumbnail, is the prompt's words.
    """
    return _one_line(_ATTR_SPECIAL.sub(" ", str(value)), limit)


def safe_url(value: str) -> str:
    """An http(s) URL escaped for an HTML attribute; anything else (``javascript:``) becomes #."""
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme not in ("http", "https"):
        return "#"
    return html.escape(value, quote=True)


def lookup_request(
    request_id: str,
    prompts: Mapping[str, str] | None,
    requests: Mapping[str, AnyRequest] | None,
) -> tuple[str, AnyRequest | None]:
    """``(prompt, request)`` of a request id; ``prompts`` wins over the request's prompt."""
    request = (requests or {}).get(request_id)
    prompt = (prompts or {}).get(request_id) or (request.prompt if request is not None else "")
    return prompt, request


def links_valid_until(staged: Sequence[StagedImage]) -> str | None:
    """When the first of these presigned links expires, in UTC (``'2026-12-01 17:35 UTC'``);
    None when none expires (public links, see :func:`links_lifetime`) or there are none."""
    expiring = [s.url_expires_at for s in staged if s.url_expires_at is not None]
    if not expiring:
        return None
    first = min(expiring)
    if first.tzinfo is not None:
        first = first.astimezone(dt.timezone.utc)
    return f"{first:%Y-%m-%d %H:%M} UTC"


def links_lifetime(staged: Sequence[StagedImage]) -> str | None:
    """How long these images' links work, in words for an artifact: ``'presigned links valid
    until 2026-12-01 17:35 UTC'``, or ``'public links (PREFECT_GPTIMAGE_PUBLIC_BASE_URL), they
    do not expire'``; None when there are no links.

    Example:
        >>> links_lifetime([]) is None
        True
    """
    if not staged:
        return None
    until = links_valid_until(staged)
    if until is not None:
        return f"presigned links valid until {until}"
    return "public links (PREFECT_GPTIMAGE_PUBLIC_BASE_URL), they do not expire"


def gallery_markdown(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    title: str = "Generated images",
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, AnyRequest] | None = None,
    max_images: int = 60,
    thumb_width: int = THUMB_WIDTH,
    totals: ManifestTotals | None = None,
    prompt_chars: int = 60,
    verdicts: Verdicts | None = None,
    note: str | None = None,
    billed: Mapping[str, float] | None = None,
) -> str:
    """The markdown gallery: a table of linked thumbnails with escaped prompts, then failures.

    ``billed``: request id -> what fal billed per image (a reconciled run), shown beside the
    estimate per image and, from ``totals``, in total.

    Three narrow columns (image, prompt cut to ``prompt_chars``, size/format/cost and, with
    ``verdicts``, the OCR verdict), readable at 1400 px; request ids, ``s3://`` URIs and checksums
    are in the run manifest. ``totals`` gives the whole run's image count and cost when ``staged``
    is only its start. ``note``: a sentence of plain text (escaped) under the counts, e.g. the
    OCR gate's regenerations and their cost.
    """
    if totals is None:
        n_images = len(staged)
        cost = sum(
            cost_per_image(lookup_request(s.request_id, prompts, requests)[1]) or 0.0
            for s in staged
        )
    else:
        n_images, cost = totals.images, totals.estimated_cost_usd
    out = [
        f"# {escape_text(title, 200)}",
        "",
        f"**{n_images}** {plural(n_images, 'image')}, **{len(failures)}** "
        f"{plural(len(failures), 'failure')}, estimated cost **${cost:.3f}**"
        + (
            f", fal billed **${totals.billed_cost_usd:.3f}**."
            if totals is not None and totals.billed_cost_usd is not None
            else "."
        ),
    ]
    if note:
        out += ["", escape_text(note, 500)]  # "$" escaped: never read as a math delimiter
    until = links_valid_until(staged[:max_images])
    if until:
        out += [
            "",
            f"Thumbnails and links are presigned S3 URLs, valid until **{until}**. After that the "
            "thumbnails show as broken images; the s3:// URIs in the run manifest stay valid, and "
            "re-running the batch (from the cache, at no cost) publishes fresh links.",
        ]
    elif staged:
        out += ["", f"Thumbnails and links are {links_lifetime(staged[:max_images])}."]
    out.append("")
    if staged:
        out += ["| Image | Prompt | Size · cost |", "|---|---|---|"]
        for image in staged[:max_images]:
            prompt, request = lookup_request(image.request_id, prompts, requests)
            url = safe_url(image.url)
            price = cost_per_image(request)
            details = f"{image.width}x{image.height} {escape_text(image.format, 10)}" + (
                f" · ${price:.3f}" if price is not None else ""
            )
            if billed is not None and image.request_id in billed:
                details += f" (billed ${billed[image.request_id]:.3f})"
            verdict = (verdicts or {}).get((image.request_id, image.index))
            if verdict is not None:
                details += f" · {escape_text(verdict.label(), 60)}"
            out.append(
                f'| <a href="{url}"><img src="{url}" width="{thumb_width}" '
                f'alt="{escape_attr(prompt, 40)}"></a> | {escape_text(prompt, prompt_chars)} '
                f"| {details} |"
            )
        if n_images > max_images:
            out += ["", f"… and {n_images - max_images} more in the results table and manifest."]
    if failures:
        out += ["", "## Failures", ""]
        for failure in failures:
            kind = f" ({escape_text(failure.error_type, 60)})" if failure.error_type else ""
            out.append(
                f"- {escape_text(failure.prompt, 200)}: {escape_text(failure.reason, 300)}{kind}"
            )
    return "\n".join(out) + "\n"


_HTML_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5rem;background:#fafafa;color:#222}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1rem}}
figure{{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem}}
img{{width:100%;height:auto;display:block;border-radius:4px}}
figcaption{{font-size:.85rem;margin-top:.4rem;word-wrap:break-word}}
.meta{{color:#666;font-size:.75rem}} .fail{{color:#a00}}
.pair{{display:flex;gap:.4rem;align-items:center}} .pair>*{{flex:1;min-width:0}}
.inputs img{{opacity:.9;margin-bottom:.2rem}}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<div class="grid">
"""


def _local_src(path: str, gallery_dir: Path) -> str:
    try:
        rel = os.path.relpath(Path(path).resolve(), gallery_dir.resolve())
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_uri()
    return urllib.parse.quote(rel.replace(os.sep, "/"))


class HtmlGallery:
    """A standalone HTML page of a run's images, written as they arrive (memory stays flat).

    :class:`DownloadedImage` items are shown through paths relative to the page (so the folder
    can be moved or zipped as a whole); :class:`StagedImage` items through their presigned URLs
    (which expire). Prompts and every other text are HTML-escaped. Figures go to a temporary file
    beside the page; :meth:`close` writes the page (its heading counts the images) and removes
    it. Failures are listed after the images.

    Example:
        >>> page = HtmlGallery("out/index.html", "Nightly batch")  # doctest: +SKIP
        >>> page.add_image(downloaded, prompt=req.prompt, request=req)  # doctest: +SKIP
        >>> page.close()  # doctest: +SKIP
        PosixPath('out/index.html')
    """

    def __init__(self, path: str | os.PathLike[str], title: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.images = 0
        self._failures: list[str] = []
        self._body_path = self.path.with_name(
            f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.body"
        )
        self._body = self._body_path.open("w", encoding="utf-8")
        self._lock = threading.Lock()

    def add_image(
        self,
        image: StagedImage | DownloadedImage,
        prompt: str,
        request: AnyRequest | None = None,
        ocr: OcrVerdictRecord | None = None,
    ) -> None:
        """Add one image's figure (thread-safe); ``ocr``: its OCR gate verdict, shown under it."""
        esc = html.escape
        if isinstance(image, DownloadedImage):
            src = esc(_local_src(image.path, self.path.parent), quote=True)
            where = Path(image.path).name
        else:
            src = safe_url(image.url)
            where = image.s3_uri
        price = cost_per_image(request)
        meta = f"{image.width}x{image.height} {image.format}" + (
            f" · ${price:.3f}" if price is not None else ""
        )
        if ocr is not None:
            meta += f" · {ocr.label()}"
        output = (
            f'<a href="{src}"><img src="{src}" loading="lazy" '
            f'alt="{esc(prompt[:200], quote=True)}"></a>'
        )
        inputs = self._inputs(request)
        if inputs:  # an edit: its inputs beside the output
            output = f"<div class=pair><div class=inputs>{inputs}</div><div>{output}</div></div>"
        figure = (
            f"<figure>{output}"
            f"<figcaption>{esc(prompt)}<div class=meta>{esc(meta)}<br>"
            f"{esc(image.request_id)} #{image.index} · {esc(where)}</div>"
            "</figcaption></figure>\n"
        )
        with self._lock:
            self._body.write(figure)
            self.images += 1

    def _inputs(self, request: AnyRequest | None) -> str:
        """Thumbnails of an edit's inputs the package read (local files through relative
        paths, staged ones through their presigned links), each titled with its source."""
        esc = html.escape
        shown = []
        for source in getattr(request, "input_sources", ()):
            if source.source.startswith("/"):
                src = esc(_local_src(source.source, self.path.parent), quote=True)
            else:  # the link fal was given (presigned), or "#" for an inline one
                urls = [*getattr(request, "image_urls", []), getattr(request, "mask_image_url", "")]
                src = safe_url(urls[-1 if source.role == "mask" else source.index] or "")
            title = esc(f"{source.role}: {source.source} sha256:{source.sha256[:12]}", quote=True)
            shown.append(f'<img src="{src}" loading="lazy" title="{title}" alt="{title}">')
        return "".join(shown)

    def add_failure(self, failure: FailureLike) -> None:
        """List a failed prompt, with its reason, below the images."""
        esc = html.escape
        kind = f" ({esc(failure.error_type)})" if failure.error_type else ""
        with self._lock:
            self._failures.append(
                f"<li class=fail>{esc(failure.prompt)}: {esc(failure.reason)}{kind}</li>\n"
            )

    def close(self) -> Path:
        """Write the page and drop the temporary file. Returns the page's path."""
        with self._lock:
            self._body.close()
            summary = f"{counted(self.images, 'image')}, {counted(len(self._failures), 'failure')}"
            with self.path.open("w", encoding="utf-8") as fh:
                fh.write(_HTML_HEAD.format(title=html.escape(self.title), summary=summary))
                with self._body_path.open(encoding="utf-8") as body:
                    shutil.copyfileobj(body, fh)
                fh.write("</div>\n")
                if self._failures:
                    fh.write("<h2>Failures</h2><ul>\n")
                    fh.writelines(self._failures)
                    fh.write("</ul>\n")
                fh.write("</body></html>\n")
            self._body_path.unlink(missing_ok=True)
        return self.path

    def discard(self) -> None:
        """Drop the unfinished page (the run failed before it could be closed)."""
        with self._lock:
            self._body.close()
            self._body_path.unlink(missing_ok=True)


def write_html_gallery(
    images: Sequence[StagedImage | DownloadedImage],
    path: str | os.PathLike[str],
    title: str,
    *,
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, AnyRequest] | None = None,
    failures: Sequence[FailureLike] = (),
) -> Path:
    """Write the :class:`HtmlGallery` page of ``images`` in one call.

    Example:
        >>> write_html_gallery(downloaded, "out/index.html", "Nightly batch",
        ...                    requests={rid: req})  # doctest: +SKIP
        PosixPath('out/index.html')
    """
    page = HtmlGallery(path, title)
    for image in images:
        prompt, request = lookup_request(image.request_id, prompts, requests)
        page.add_image(image, prompt, request)
    for failure in failures:
        page.add_failure(failure)
    return page.close()
