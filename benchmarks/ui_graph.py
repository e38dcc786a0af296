"""A run in the Prefect UI, in headless Chromium: its graph, task-run list, artifacts and events.

Used by ``ui_screenshots.py`` (which starts the server and runs the batch); kept apart so that
script stays short. Writes, into ``--out`` and, with ``--docs``, into ``docs/img/``:

* ``ui-graph-task-runs-v2.png``: the V2 UI's run page on its Task Runs tab: the graph (the
  timeline) above, where each row's task run is a bar labelled with its name
  (``row 6: Cats | dogs & <birds> ...``), and the list of task runs below;
* ``ui-graph-artifacts-v2.png``: the V2 UI's run page on its Artifacts tab (the V1 UI ignores
  ``?tab=`` on load);
* ``ui-events-v1.png``: the V1 UI's event feed, newest first: the flow run's end, the package's
  ``prefect-gptimage.batch.completed`` and the assets' "Asset materialization succeeded" (the
  open-source UI has no assets page).

A page counts as rendered when a condition holds, not after a sleep: Chromium runs the page on
virtual time (``--virtual-time-budget``, which does not advance while requests are in flight);
where the page lists the task runs, its DOM must hold every row's name; and two screenshots,
with a budget and twice it, cropped, must agree pixel for pixel (within 0.1 %), because the
canvas graph lays out its time axis late and a single screenshot may catch it half drawn.
"""

from __future__ import annotations

import html
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

#: Two screenshots whose pixels differ in at most this fraction show the same, settled page.
SETTLED = 0.001
#: How many times to load a page, at most, the virtual-time budget doubling each time.
ATTEMPTS = 6
#: What the V1 event feed must show: an asset materialization and this package's own event.
EVENT_FEED = ("Asset materialization succeeded", "prefect-gptimage.batch.completed")
#: A PNG kept in docs/img stays under this size.
MAX_DOC_BYTES = 300_000


@dataclass(frozen=True)
class Browser:
    """How to run headless Chromium: its binary, where its profiles go and the window's width.

    Each run gets a fresh profile: with one shared profile, what a page stored on one load
    (local storage) changed the next, and screenshots of the same page alternated between two
    pictures.
    """

    binary: str
    profile: Path
    width: int

    def run(
        self, url: str, height: int, budget: int, *mode: str
    ) -> subprocess.CompletedProcess[str]:
        """Load ``url`` in a ``width`` x ``height`` window for ``budget`` virtual ms."""
        self.profile.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.profile) as profile:
            return subprocess.run(
                self.command(url, height, budget, profile, *mode),
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )

    def command(self, url: str, height: int, budget: int, profile: str, *mode: str) -> list[str]:
        """The Chromium command line of :meth:`run`."""
        return [
            self.binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={self.width},{height}",
            f"--virtual-time-budget={budget}",
            *mode,
            url,
        ]

    def shoot(self, url: str, path: Path, height: int, budget: int) -> str:
        """Screenshot the window into ``path`` and return the DOM, both of one page load.

        Raises :class:`RuntimeError` when Chromium wrote no screenshot.
        """
        path.unlink(missing_ok=True)
        result = self.run(url, height, budget, "--dump-dom", f"--screenshot={path}")
        if not path.exists():
            raise RuntimeError(f"no screenshot of {url}: {result.stderr.strip()[-500:]}")
        return result.stdout

    def png(self, url: str, path: Path, height: int, budget: int) -> int:
        """Screenshot the window into ``path``; its size in bytes (0 when Chromium failed)."""
        path.unlink(missing_ok=True)
        result = self.run(url, height, budget, f"--screenshot={path}")
        if not path.exists():
            print(f"  FAILED {path.name}: {result.stderr.strip()[-500:]}", file=sys.stderr)
            return 0
        return path.stat().st_size


@dataclass(frozen=True)
class Shot:
    """One page to screenshot: where, how tall, what it must show, where to crop it."""

    name: str
    route: str
    height: int
    #: texts the DOM must contain (HTML-escaped before the check, as the DOM serializes them)
    expect: tuple[str, ...]
    #: keep only the top ``crop`` pixels (None: the whole window)
    crop: int | None = None
    #: the page has the canvas graph, which draws no DOM: wait until the picture stops changing
    canvas: bool = True


def settled(browser: Browser, url: str, shot: Shot, path: Path, budget: int) -> int:
    """Screenshot ``url`` into ``path`` once it has rendered; the budget (virtual ms) it needed.

    Each try loads the page once for ``budget`` virtual ms, dumps its DOM and screenshots it;
    the next try doubles the budget. A try is kept when its DOM holds every text of
    ``shot.expect`` and, for a page with the canvas graph, when its picture, cropped, differs
    from the previous try's in at most :data:`SETTLED` of its pixels: the graph lays out its time
    axis late, so a short budget may catch it half drawn, and only a longer one that changes
    nothing shows it is done. Raises :class:`RuntimeError` after :data:`ATTEMPTS` tries.
    """
    previous: Image.Image | None = None
    for _ in range(ATTEMPTS):
        dom = browser.shoot(url, path, shot.height, budget)
        image = cropped(path, shot.crop)
        missing = [t for t in shot.expect if html.escape(t, quote=False) not in dom]
        if missing:
            print(f"  {shot.name}: {len(missing)} texts missing at {budget} ms", file=sys.stderr)
            previous = None
        elif not shot.canvas or (previous is not None and differing(previous, image) <= SETTLED):
            image.save(path, optimize=True)
            return budget
        else:
            previous = image
        budget *= 2
    raise RuntimeError(f"{shot.name}: not rendered at {budget // 2} virtual ms")


def cropped(path: Path, height: int | None) -> Image.Image:
    """The top ``height`` pixels of the PNG at ``path`` (all of it for None), as RGB."""
    with Image.open(path) as image:
        return image.convert("RGB").crop(
            (0, 0, image.width, min(height or image.height, image.height))
        )


def differing(a: Image.Image, b: Image.Image) -> float:
    """The fraction of pixels in which two images of the same size differ."""
    if a.size != b.size:
        return 1.0
    mask = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v else 0)
    return mask.histogram()[255] / (a.width * a.height)


def task_run_names(api: Callable[[str, str, Any], Any], flow_run_id: str) -> list[str]:
    """The names of the flow run's task runs, as the graph and the list label them."""
    runs = api(
        "POST",
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
    )
    return [str(r["name"]) for r in runs]


def shots(flow_run_id: str, rows: Sequence[str], artifact_keys: Sequence[str]) -> list[Shot]:
    """The flow run's pages in the V2 UI, and the V1 event feed, with what each must show.

    Not the V1 UI's run page: its graph lays its time axis out at a point in virtual time that
    varies from one Chromium run to the next (all labels stacked at the left edge, no grid) and
    sometimes stays so for budgets from 10 to 60 s, so no condition told it had finished.
    """
    run = f"runs/flow-run/{flow_run_id}"
    return [
        Shot("ui-graph-task-runs-v2.png", f"/v2/{run}?tab=TaskRuns", 1500, tuple(rows), 1460),
        Shot("ui-graph-artifacts-v2.png", f"/v2/{run}?tab=Artifacts", 880, tuple(artifact_keys)),
        Shot("ui-events-v1.png", "/events", 1000, EVENT_FEED, canvas=False),
    ]


def shoot_run_pages(
    browser: Browser,
    base_url: str,
    api: Callable[[str, str, Any], Any],
    flow_run_id: str,
    out: Path,
    budget: int,
) -> list[str]:
    """Screenshot the flow run's graph, task-run list, Artifacts tab and the event feed.

    Returns report lines: the task-run names (they must be distinct, or the graph's rows cannot
    be told apart) and, per PNG, its size and the budget it needed.
    """
    names = task_run_names(api, flow_run_id)
    lines = [f"{len(names)} task runs, {len(set(names))} distinct names:"]
    lines += [f"  {name}" for name in names]
    rows = [n for n in names if n.startswith("row ")]
    if len(set(rows)) != len(rows):
        lines.append("ROWS SHARE NAMES: the graph cannot tell them apart")
    artifacts = api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    for shot in shots(flow_run_id, rows, [str(a["key"]) for a in artifacts if a["key"]]):
        path = out / shot.name
        needed = settled(browser, base_url + shot.route, shot, path, budget)
        size = path.stat().st_size
        flag = "" if size <= MAX_DOC_BYTES else f" (over {MAX_DOC_BYTES} bytes)"
        lines.append(f"{shot.name}: {size} bytes, settled at {needed} virtual ms{flag}")
        print(f"  {path}  <-  {base_url}{shot.route}", file=sys.stderr)
    return lines
