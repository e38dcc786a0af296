"""Prefect artifacts for a batch: a results table, a thumbnail gallery, links, live progress.

What the Prefect UI (3.8) renders, and so what this module produces:

* a **table** artifact: one row per image (prompt, request id, S3 URI, presigned link, WxH,
  format, estimated cost) and per failure;
* a **markdown gallery**: raw ``<img src="presigned-url" width="160">`` tags (the UI honours the
  width, which makes thumbnails; ``![](url)`` would be drawn full size), each wrapped in a link
  to the full image. Prompts are HTML-escaped and markdown-neutralized: a prompt is user input;
* one **link** artifact per image, capped (default 50; the rest are in the table);
* a **progress** artifact (:class:`BatchProgress`) updated at most every ~2 % or 2 s.

The images are shown through presigned S3 URLs, which the viewer's browser fetches directly;
they stop working when the URLs expire (``S3Target.presign_expires``).

Artifact keys may hold only lowercase letters, digits and dashes: build them with
:func:`artifact_key`. Creating artifacts needs a Prefect API; inside a flow run they are attached
to that run.

Example:
    >>> artifact_key("Nightly Batch", "2026-11-24", "gallery")
    'nightly-batch-2026-11-24-gallery'
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import re
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from pydantic import BaseModel, Field

from prefect_gptimage.manifest import cost_per_image
from prefect_gptimage.s3 import StagedImage
from prefect_gptimage.schemas import DownloadedImage

__all__ = [
    "BatchProgress",
    "FailureLike",
    "PublishedArtifacts",
    "artifact_key",
    "format_duration",
    "gallery_markdown",
    "publish_results",
    "results_table",
    "write_html_gallery",
]

ARTIFACT_KEY_MAX = 100


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
_log = logging.getLogger(__name__)


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _log


def _in_run() -> bool:
    from prefect.context import get_run_context
    from prefect.exceptions import MissingContextError

    try:
        get_run_context()
    except MissingContextError:
        return False
    return True


def _sync(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a Prefect ``async_dispatch`` artifact function synchronously, even from an async flow.

    Without ``_sync=True`` these functions return a coroutine when the current flow is async.
    """
    return fn(*args, _sync=True, **kwargs)


# --------------------------------------------------------------------------------------------
# Keys and escaping
# --------------------------------------------------------------------------------------------


def artifact_key(*parts: object, max_length: int = ARTIFACT_KEY_MAX) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) from arbitrary parts.

    Accents are folded, everything else becomes a dash, runs collapse. Keys longer than
    ``max_length`` are cut and end with 8 hex digits of a hash of the full key, so distinct long
    inputs stay distinct.

    Example:
        >>> artifact_key("GPT Image", "Ünïcode/../run_1", 7)
        'gpt-image-unicode-run-1-7'
        >>> len(artifact_key("x" * 500))
        100
    """
    raw = "-".join(str(p) for p in parts)
    folded = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    key = re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-") or "gptimage"
    if len(key) > max_length:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        key = f"{key[: max_length - 9].rstrip('-')}-{digest}"
    return key


_MD_SPECIAL = {c: f"&#{ord(c)};" for c in "\\`*_{}[]()#+!|~$"}


def _text(value: str, limit: int | None = 300) -> str:
    """Untrusted text for markdown/HTML: escaped, markdown specials neutralized, one line."""
    text = " ".join(str(value).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    escaped = html.escape(text, quote=True)
    return "".join(_MD_SPECIAL.get(c, c) for c in escaped)


def _url(value: str) -> str:
    """An http(s) URL escaped for an HTML attribute; anything else (``javascript:``) becomes #."""
    scheme = urllib.parse.urlsplit(value).scheme.lower()
    if scheme not in ("http", "https"):
        return "#"
    return html.escape(value, quote=True)


def _lookup(
    request_id: str,
    prompts: Mapping[str, str] | None,
    requests: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[str, Mapping[str, Any]]:
    request: Mapping[str, Any] = (requests or {}).get(request_id, {})
    prompt = (prompts or {}).get(request_id) or str(request.get("prompt", ""))
    return prompt, request


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``; ``42.4`` -> ``'42s'``.

    Example:
        >>> format_duration(125)
        '2m05s'
    """
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# --------------------------------------------------------------------------------------------
# Content builders (pure, testable without a Prefect API)
# --------------------------------------------------------------------------------------------


def results_table(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, Mapping[str, Any]] | None = None,
    max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """Rows for the table artifact: images first, then failures (``status`` tells them apart).

    Example:
        >>> from prefect_gptimage.manifest import FailureLine
        >>> results_table([], [FailureLine(prompt="p", parameters={}, endpoint="e", reason="r")])
        ... # doctest: +NORMALIZE_WHITESPACE
        [{'status': 'failed', 'prompt': 'p', 'request_id': '', 'index': None, 's3_uri': '',
          'link': '', 'size': '', 'format': '', 'bytes': None, 'cost_usd': None, 'reason': 'r'}]
    """
    rows: list[dict[str, Any]] = []
    for image in staged:
        prompt, request = _lookup(image.request_id, prompts, requests)
        rows.append(
            {
                "status": "ok",
                "prompt": " ".join(prompt.split())[:300],
                "request_id": image.request_id,
                "index": image.index,
                "s3_uri": image.s3_uri,
                "link": image.url,
                "size": f"{image.width}x{image.height}",
                "format": image.format,
                "bytes": image.bytes,
                "cost_usd": cost_per_image(request) if request else None,
                "reason": "",
            }
        )
    for failure in failures:
        rows.append(
            {
                "status": "failed",
                "prompt": " ".join(failure.prompt.split())[:300],
                "request_id": failure.request_id or "",
                "index": None,
                "s3_uri": "",
                "link": "",
                "size": "",
                "format": "",
                "bytes": None,
                "cost_usd": None,
                "reason": failure.reason[:300],
            }
        )
    return rows if max_rows is None else rows[:max_rows]


def gallery_markdown(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    title: str = "Generated images",
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, Mapping[str, Any]] | None = None,
    max_images: int = 60,
    thumb_width: int = THUMB_WIDTH,
) -> str:
    """The markdown gallery: a table of linked thumbnails with escaped prompts, then failures."""
    cost = sum(cost_per_image(_lookup(s.request_id, prompts, requests)[1]) or 0.0 for s in staged)
    out = [
        f"# {_text(title, 200)}",
        "",
        f"**{len(staged)}** images, **{len(failures)}** failures, estimated cost "
        f"**${cost:.3f}**. Thumbnails use presigned links, which expire.",
        "",
    ]
    if staged:
        out += ["| Image | Prompt | Details |", "|---|---|---|"]
        for image in staged[:max_images]:
            prompt, request = _lookup(image.request_id, prompts, requests)
            url = _url(image.url)
            price = cost_per_image(request) if request else None
            details = (
                f"{image.width}x{image.height} {_text(image.format, 10)}"
                + (f" &middot; ${price:.3f}" if price is not None else "")
                + f" &middot; {_text(image.request_id, 80)} &#35;{image.index}"
            )
            out.append(
                f'| <a href="{url}"><img src="{url}" width="{thumb_width}" '
                f'alt="{_text(prompt, 100)}"></a> | {_text(prompt)} | {details} |'
            )
        if len(staged) > max_images:
            out += ["", f"… and {len(staged) - max_images} more in the results table."]
    if failures:
        out += ["", "## Failures", ""]
        for failure in failures:
            kind = f" ({_text(failure.error_type, 60)})" if failure.error_type else ""
            out.append(f"- {_text(failure.prompt, 200)}: {_text(failure.reason, 300)}{kind}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


class PublishedArtifacts(BaseModel):
    """Ids and keys of what :func:`publish_results` created."""

    table_key: str
    table_id: UUID
    gallery_key: str
    gallery_id: UUID
    link_ids: list[UUID] = Field(default_factory=list)
    links_omitted: int = 0


def publish_results(
    staged: Sequence[StagedImage],
    failures: Sequence[FailureLike] = (),
    *,
    key_prefix: str,
    requests: Mapping[str, Mapping[str, Any]] | None = None,
    prompts: Mapping[str, str] | None = None,
    title: str | None = None,
    max_links: int = 50,
    max_gallery: int = 60,
    max_table_rows: int = 2000,
    key_links: bool = False,
) -> PublishedArtifacts:
    """Create the table, gallery and link artifacts of a batch (in the current flow run).

    Args:
        staged: the staged images.
        failures: manifest failure lines, or any records with ``prompt``, ``reason``,
            ``request_id`` and ``error_type`` (shown escaped).
        key_prefix: start of the artifact keys (sanitized): ``{key_prefix}-results`` (table),
            ``{key_prefix}-gallery`` (markdown).
        requests: request id -> the normalized request (its ``prompt``, and quality/size for the
            cost column).
        prompts: request id -> prompt, when ``requests`` is not at hand (takes precedence).
        max_links: at most this many link artifacts; the rest are only in the table.
        max_gallery: thumbnails in the gallery (each is a full image the browser downloads).
        max_table_rows: table rows (the manifest has every line).
        key_links: give link artifacts keys (``{key_prefix}-image-{request}-{index}``). Off by
            default: each key is a separate entry on the global Artifacts page, while keyless
            links still show on the flow run's Artifacts tab.

    Example:
        >>> @flow  # doctest: +SKIP
        ... def batch():
        ...     staged = [stage_image_task(i, prompt, req, target) for i in images]
        ...     publish_results(staged, key_prefix="nightly", requests={rid: req})
    """
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    if not _in_run():
        raise RuntimeError(
            "publish_results() must run inside a Prefect flow or task run: artifacts are "
            "attached to the run (creating them outside one is deprecated in Prefect 3)"
        )

    table_key = artifact_key(key_prefix, "results")
    gallery_key = artifact_key(key_prefix, "gallery")
    rows = results_table(
        staged, failures, prompts=prompts, requests=requests, max_rows=max_table_rows
    )
    total_rows = len(staged) + len(failures)
    table_desc = f"{len(staged)} images, {len(failures)} failures"
    if total_rows > len(rows):
        table_desc += f"; first {len(rows)} rows shown, the run manifest has all {total_rows}"
    table_id = _sync(create_table_artifact, table=rows, key=table_key, description=table_desc)
    gallery_id = _sync(
        create_markdown_artifact,
        markdown=gallery_markdown(
            staged,
            failures,
            title=title or f"{key_prefix}: generated images",
            prompts=prompts,
            requests=requests,
            max_images=max_gallery,
        ),
        key=gallery_key,
        description=f"Thumbnail gallery of {len(staged)} images",
    )
    link_ids: list[UUID] = []
    for image in staged[:max_links]:
        prompt, _ = _lookup(image.request_id, prompts, requests)
        link_ids.append(
            _sync(
                create_link_artifact,
                link=image.url,
                link_text=f"{image.index:02d} {_text(prompt, 60)} ({image.width}x{image.height})",
                key=(
                    artifact_key(key_prefix, "image", image.request_id, image.index)
                    if key_links
                    else None
                ),
                description=f"{image.s3_uri} (presigned link, expires {image.url_expires_at:%c})",
            )
        )
    omitted = max(0, len(staged) - max_links)
    if omitted:
        _logger().info(
            "%d images have no link artifact (cap %d); see table %r", omitted, max_links, table_key
        )
    return PublishedArtifacts(
        table_key=table_key,
        table_id=table_id,
        gallery_key=gallery_key,
        gallery_id=gallery_id,
        link_ids=link_ids,
        links_omitted=omitted,
    )


class BatchProgress:
    """A Prefect progress artifact for a long batch, with throttled, thread-safe updates.

    ``advance()`` is cheap and may be called from many threads; the artifact is updated only when
    progress moved at least ``min_step`` percentage points, or ``min_interval`` seconds passed,
    since the last update, so a 10,000-item batch makes about 50 API calls, not 10,000.
    Progress is best effort: an API failure is logged, never raised. :meth:`eta` gives a human
    ETA for logs.

    Example:
        >>> progress = BatchProgress().start(len(prompts), "nightly-progress")  # doctest: +SKIP
        >>> for future in futures:  # doctest: +SKIP
        ...     future.wait(); progress.advance()
        ...     logger.info("%s", progress.status())
        >>> progress.finish()  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        min_step: float = 2.0,
        min_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_step = min_step
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._total = 0
        self._done = 0
        self._started_at = clock()
        self._sent_pct = -1.0
        self._sent_at = float("-inf")
        self.key: str | None = None
        self.artifact_id: UUID | None = None
        self.updates = 0  # API update calls made (not counting the create)

    # -- state ---------------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self._total

    @property
    def done(self) -> int:
        return self._done

    @property
    def fraction(self) -> float:
        with self._lock:
            return 1.0 if self._total <= 0 else min(1.0, self._done / self._total)

    @property
    def percent(self) -> float:
        return round(self.fraction * 100.0, 2)

    @property
    def elapsed(self) -> float:
        return max(0.0, self._clock() - self._started_at)

    def eta_seconds(self) -> float | None:
        """Seconds left, from the elapsed time and the fraction done (None while unknown)."""
        fraction = self.fraction
        if fraction >= 1.0:
            return 0.0
        if fraction <= 0.0:
            return None
        return self.elapsed * (1.0 - fraction) / fraction

    def eta(self) -> str:
        """``'ETA 3m12s'``, ``'done'`` or ``'ETA unknown'``."""
        left = self.eta_seconds()
        if left is None:
            return "ETA unknown"
        return "done" if left == 0 else f"ETA {format_duration(left)}"

    def status(self) -> str:
        """``'120/10000 (1.2%), 35s elapsed, ETA 48m01s'`` for logs."""
        return (
            f"{self._done}/{self._total} ({self.percent:.1f}%), "
            f"{format_duration(self.elapsed)} elapsed, {self.eta()}"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, total: int, key: str, description: str | None = None) -> BatchProgress:
        """Create the progress artifact at 0 % (``key`` is sanitized with :func:`artifact_key`).

        Outside a flow or task run no artifact is made (that is deprecated in Prefect 3); counts
        and :meth:`eta` still work.
        """
        from prefect.artifacts import create_progress_artifact

        with self._lock:
            self._total = max(0, int(total))
            self._done = 0
            self._started_at = self._clock()
        self.key = artifact_key(key)
        if not _in_run():
            _logger().debug("no flow run: progress %r is tracked without an artifact", self.key)
            self.artifact_id = None
            return self
        try:
            self.artifact_id = _sync(
                create_progress_artifact,
                progress=0.0,
                key=self.key,
                description=description or f"{self._total} items",
            )
            self._sent_pct, self._sent_at = 0.0, self._clock()
        except Exception as exc:  # progress is cosmetic: never fail the batch for it
            _logger().warning("could not create progress artifact %r: %s", self.key, exc)
            self.artifact_id = None
        return self

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done (thread-safe); update the artifact if it is due."""
        with self._lock:
            self._done = min(self._done + n, self._total) if self._total else self._done + n
        self._send(force=False)

    def finish(self) -> None:
        """Mark everything done and set the artifact to 100 %."""
        with self._lock:
            self._done = max(self._done, self._total)
        self._send(force=True)

    def _send(self, *, force: bool) -> None:
        if self.artifact_id is None:
            return
        # Only one update in flight; others skip (their progress is sent by a later call).
        if not self._send_lock.acquire(blocking=force):
            return
        try:
            pct = self.percent
            now = self._clock()
            due = pct - self._sent_pct >= self.min_step or (
                now - self._sent_at >= self.min_interval and pct > self._sent_pct
            )
            if not (due or (force and pct != self._sent_pct)):
                return
            from prefect.artifacts import update_progress_artifact

            _sync(update_progress_artifact, artifact_id=self.artifact_id, progress=pct)
            self._sent_pct, self._sent_at = pct, now
            self.updates += 1
        except Exception as exc:
            _logger().warning("could not update progress artifact %r: %s", self.key, exc)
        finally:
            self._send_lock.release()


# --------------------------------------------------------------------------------------------
# Local HTML gallery
# --------------------------------------------------------------------------------------------

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


def write_html_gallery(
    images: Sequence[StagedImage | DownloadedImage],
    path: str | os.PathLike[str],
    title: str,
    *,
    prompts: Mapping[str, str] | None = None,
    requests: Mapping[str, Mapping[str, Any]] | None = None,
    failures: Sequence[FailureLike] = (),
) -> Path:
    """Write a self-contained HTML page of the images a person can open in a browser.

    :class:`DownloadedImage` items are shown through paths relative to the page (so the folder
    can be moved or zipped as a whole); :class:`StagedImage` items through their presigned URLs
    (which expire). Prompts and every other text are HTML-escaped. Written line by line.

    Example:
        >>> write_html_gallery(downloaded, "out/index.html", "Nightly batch",
        ...                    requests={rid: req})  # doctest: +SKIP
        PosixPath('out/index.html')
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    with target.open("w", encoding="utf-8") as fh:
        fh.write(
            _HTML_HEAD.format(
                title=esc(title),
                summary=esc(f"{len(images)} images, {len(failures)} failures"),
            )
        )
        for image in images:
            prompt, request = _lookup(image.request_id, prompts, requests)
            if isinstance(image, DownloadedImage):
                src = esc(_local_src(image.path, target.parent), quote=True)
                where = Path(image.path).name
            else:
                src = _url(image.url)
                where = image.s3_uri
            price = cost_per_image(request) if request else None
            meta = f"{image.width}x{image.height} {image.format}" + (
                f" · ${price:.3f}" if price is not None else ""
            )
            fh.write(
                f'<figure><a href="{src}"><img src="{src}" loading="lazy" '
                f'alt="{esc(prompt[:200], quote=True)}"></a>'
                f"<figcaption>{esc(prompt)}<div class=meta>{esc(meta)}<br>"
                f"{esc(image.request_id)} #{image.index} · {esc(where)}</div>"
                "</figcaption></figure>\n"
            )
        fh.write("</div>\n")
        if failures:
            fh.write("<h2>Failures</h2><ul>\n")
            for failure in failures:
                fh.write(
                    f"<li class=fail>{esc(failure.prompt)}: {esc(failure.reason)}"
                    + (f" ({esc(failure.error_type)})" if failure.error_type else "")
                    + "</li>\n"
                )
            fh.write("</ul>\n")
        fh.write("</body></html>\n")
    return target
