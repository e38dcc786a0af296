"""How the Prefect UI draws escaped markdown: one artifact of probes, screenshotted in Chromium.

Starts ``prefect server start`` (its own temporary ``PREFECT_HOME``), creates through the API

* a markdown artifact: a table with, for every markdown/HTML special character, the text
  ``a<c>b`` written three ways (CommonMark backslash, numeric entity, as
  :func:`~prefect_gptimage.reporting.gallery.escape_text` writes it), then the same outside a table
  (a list, as the gallery's failures are), then a prompt full of specials as the gallery writes it;
* a table artifact whose cells are :func:`escape_text` output (``in_table=False``, as the results
  table writes them),

and screenshots both in the V1 and the V2 UI (``ui-escapes-*.png`` in ``--out``). What the
pictures show decided the escaping rules in ``prefect_gptimage/reporting/gallery.py``; the
screenshots kept in ``docs/img/`` are from this script. Needs Debian's ``chromium``::

    .venv/bin/python benchmarks/ui_escapes.py --out /tmp/ui-escapes
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ui_screenshots import PrefectServer, screenshot  # noqa: E402

from prefect_gptimage.reporting.gallery import escape_text  # noqa: E402

SPECIALS = "|\\`*_{}[]()#+-!~$<>&\"'."
#: A prompt a person might write, every special in it.
PROMPT = 'Sale | 50% off *today* & <b>tomorrow</b> #1 `code` [x](y) a\\b ~$5~ "q" 1. _u_'


def probe_markdown() -> str:
    rows = ["| char | backslash | entity | escape_text (table) |", "|---|---|---|---|"]
    for c in SPECIALS:
        backslash = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}.get(c, "\\" + c)
        rows.append(f"| {ord(c)} | a{backslash}b | a&#{ord(c)};b | {escape_text(f'a{c}b')} |")
    lines = ["# Escape probes", "", *rows, "", "## Outside a table (a list)", ""]
    for c in SPECIALS:
        lines.append(f"- `{ord(c)}`: a&#{ord(c)};b / {escape_text(f'a{c}b', in_table=False)}")
    lines += [
        "",
        "## The gallery's prompt",
        "",
        "| prompt (escape_text) |",
        "|---|",
        f"| {escape_text(PROMPT)} |",
        "",
        f"- {escape_text(PROMPT, in_table=False)}: a failure's reason",
        "",
        f"1\\. {escape_text('1. starts like a list')}",
        "",
        f"- {escape_text('1. a list item that starts like a numbered list')}",
        f"- {escape_text('- a list item that starts like a bullet')}",
        f"- {escape_text('+ plus')} / {escape_text('=== equals')}",
        "",
        escape_text("1. a paragraph that starts like a numbered list"),
        "",
        escape_text("- a paragraph that starts like a bullet"),
        "",
    ]
    return "\n".join(lines)


def probe_table() -> list[dict[str, str]]:
    """The V2 UI shows ten rows a page: the telling ones first."""
    link = "[00-a-cat.png](https://example.com/a.png)"
    first = [
        {"char": "prompt", "escape_text": escape_text(PROMPT, in_table=False), "raw": PROMPT},
        {"char": "link", "escape_text": link, "raw": link},
    ]
    return first + [
        {"char": c, "escape_text": escape_text(f"a{c}b", in_table=False), "raw": f"a{c}b"}
        for c in "<>&|*#-\\`_{}[]()+!~$\"'."
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/ui-escapes")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2700)
    parser.add_argument("--budget", type=int, default=15000, help="virtual ms to render a page")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gptimage-ui-escapes-"))
    server = PrefectServer(work / "prefect-home", work / "server.log")
    try:
        server.wait(timeout=240)
        markdown = probe_markdown()
        (out / "probe.md").write_text(markdown)
        md = server.api(
            "POST", "/artifacts/", {"type": "markdown", "key": "escape-probes", "data": markdown}
        )
        table = server.api(
            "POST", "/artifacts/", {"type": "table", "key": "escape-table", "data": probe_table()}
        )
        profile = work / "chromium-profile"
        for name, artifact in (("markdown", md), ("table", table)):
            for ui, route in (("v1", "/artifacts/artifact/"), ("v2", "/v2/artifacts/artifact/")):
                screenshot(
                    server.url + route + artifact["id"],
                    out / f"ui-escapes-{name}-{ui}.png",
                    profile,
                    args.width,
                    args.height,
                    args.budget,
                )
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
