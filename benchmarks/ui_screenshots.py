"""Screenshots of a batch's artifacts in a real Prefect server's UI, in headless Chromium.

Starts ``prefect server start`` on a free port with its own temporary ``PREFECT_HOME``, the
bundled fal emulator (HTTPS) and a local moto S3 server, runs ``prefect-gptimage batch`` on a
small prompt file (the bundled sample plus prompts full of markdown/HTML specials: ``|``, ``<``,
``>``, ``&``, ``#``, ``*``, backticks) with ``PREFECT_API_URL`` pointing at that server, then
screenshots, at 1400 px wide:

* ``run-v1.png``: the flow run's page in the V1 UI as it opens (it ignores ``?tab=`` on load);
* ``artifacts.png``: the global Artifacts page (V1);
* ``artifact-<key or id>.png`` and ``...-v2.png``: every artifact of the run, one page each, in
  both UIs (``--artifact-height`` tall, so a whole gallery fits);
* ``gallery-s3-stopped.png``: the gallery again after the S3 server stopped, which is what a
  viewer sees once the presigned links have expired;
* ``ui-graph-task-runs-v2.png``, ``ui-graph-artifacts-v2.png`` and ``ui-events-v1.png``: the
  run's page in the V2 UI with its graph and task-run list, and with its Artifacts tab, and the
  event feed, each once rendered (see ``ui_graph.py``); ``--docs`` copies them into
  ``docs/img/``, where docs/ui.md shows them.

It also writes ``artifacts.json`` (each artifact's id, key, type, description and data) and
prints a short report: artifacts by type, unkeyed artifacts, HTML entities that the UI shows
literally (it decodes only ``&amp; &lt; &gt; &quot;``), table columns. Look at the PNGs: that is
the point of the script.

Needs Debian's ``chromium`` (``apt-get install -y chromium``)::

    .venv/bin/python benchmarks/ui_screenshots.py --out /tmp/ui-shots/after --docs  # ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))

from ui_graph import Browser, shoot_run_pages  # noqa: E402

from prefect_gptimage.testing.emulator import FalEmulator  # noqa: E402
from prefect_gptimage.testing.s3 import LocalS3Server  # noqa: E402

BUCKET = "ui-shots"
FAL_KEY = "ui-shots-key-id:ui-shots-key-secret"
#: Prompts that would break a markdown table or inject HTML if they were not escaped.
HOSTILE_PROMPTS = [
    {
        "prompt": "Cats | dogs & <birds> #1 -- *bold* `code` [link](javascript:alert(1)) <b>x</b>",
        "quality": "low",
        "image_size": "1024x1024",
    },
    {
        "prompt": "50% off: R&D <script>alert('x')</script> a \\ back | slash # hash & amp;",
        "quality": "low",
        "image_size": "1024x1024",
    },
]
#: Entities the Prefect UI's markdown renderer shows literally (it decodes only these four).
ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-f]+|(?!(?:amp|lt|gt|quot);)[a-z][a-z0-9]*);", re.I)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no chromium on PATH: apt-get install -y chromium (as root)")


def cli() -> list[str]:
    script = Path(sys.executable).parent / "prefect-gptimage"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect_gptimage.cli"]


def prefect() -> list[str]:
    script = Path(sys.executable).parent / "prefect"
    return [str(script)] if script.exists() else [sys.executable, "-m", "prefect"]


def clean_env() -> dict[str, str]:
    """The caller's environment minus anything that would point the run elsewhere."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "FAL_", "AWS_"))
        and k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
    }


class PrefectServer:
    """``prefect server start`` on a free port with its own home; stopped by :meth:`stop`."""

    def __init__(self, home: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = clean_env()
        env.update(
            {
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "true",
                # the UI's JavaScript asks this URL for data (default: port 4200, not ours)
                "PREFECT_UI_API_URL": f"{self.url}/api",
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(self.port),
            }
        )
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [*prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"prefect server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"prefect server did not answer /api/health within {timeout} s")

    def api(self, method: str, route: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{self.url}/api{route}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def screenshot(url: str, path: Path, profile: Path, width: int, height: int, budget: int) -> None:
    """Screenshot ``url`` into ``path`` after ``budget`` virtual ms (see ``ui_graph.Browser``)."""
    if Browser(chromium(), profile, width).png(url, path, height, budget):
        print(f"  {path}  <-  {url}", file=sys.stderr)


def write_prompts(path: Path) -> int:
    sample = (ROOT / "prefect_gptimage" / "data" / "sample_prompts.jsonl").read_text()
    rows = [json.loads(line) for line in sample.splitlines() if line.strip()]
    rows += HOSTILE_PROMPTS
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def report(artifacts: list[dict[str, Any]]) -> list[str]:
    lines = [f"{len(artifacts)} artifacts on the run"]
    by_type: dict[str, int] = {}
    for a in artifacts:
        by_type[a["type"]] = by_type.get(a["type"], 0) + 1
    lines.append("by type: " + ", ".join(f"{t} {n}" for t, n in sorted(by_type.items())))
    lines.append(f"unkeyed: {sum(1 for a in artifacts if not a['key'])}")
    for a in artifacts:
        data = a["data"]
        if a["type"] == "markdown" and isinstance(data, str):
            # entities inside HTML attributes (href="...&amp;...") are fine; text is not
            text = re.sub(r'"[^"]*"', '""', data)
            found = sorted(set(ENTITY.findall(text)))
            if found:
                lines.append(f"markdown {a['key'] or a['id']}: literal entities {found}")
        if a["type"] == "table":
            rows = json.loads(data) if isinstance(data, str) else data
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                lines.append(f"table {a['key']}: {len(rows)} rows, columns {list(rows[0])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/ui-shots", help="where the PNGs go")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000, help="run and list pages")
    parser.add_argument("--artifact-height", type=int, default=1600, help="artifact pages")
    parser.add_argument("--budget", type=int, default=10000, help="virtual ms to render a page")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (Prefect home...)")
    parser.add_argument("--docs", action="store_true", help="also copy the ui-*.png into docs/img/")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="gptimage-ui-shots-"))
    server = PrefectServer(work / "prefect-home", work / "server.log")
    try:
        with FalEmulator(latency=0.3, concurrency_limit=4) as emulator:
            s3 = LocalS3Server().start()
            try:
                s3.create_bucket(BUCKET)
                prompts = work / "prompts.jsonl"
                n = write_prompts(prompts)
                server.wait()
                print(f"prefect server {server.url}, {n} prompts", file=sys.stderr)
                env = clean_env()
                env.update(emulator.env())
                env.update(s3.env())
                env.update(
                    {
                        "FAL_KEY": FAL_KEY,
                        "PREFECT_API_URL": f"{server.url}/api",
                        "PREFECT_HOME": str(work / "client-home"),
                    }
                )
                batch = subprocess.run(
                    [
                        *cli(),
                        "batch",
                        str(prompts),
                        "--bucket",
                        BUCKET,
                        "--prefix",
                        "ui",
                        "--concurrency",
                        "4",
                        "--output-dir",
                        str(work / "out"),
                        "--json",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
                (out / "batch.stdout").write_text(batch.stdout)
                (out / "batch.stderr").write_text(batch.stderr)
                print(f"batch exit {batch.returncode}", file=sys.stderr)

                (run,) = server.api(
                    "POST", "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1}
                )
                artifacts = server.api(
                    "POST",
                    "/artifacts/filter",
                    {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200},
                )
                (out / "artifacts.json").write_text(json.dumps(artifacts, indent=1))
                profile = work / "chromium-profile"

                def shoot(route: str, name: str, height: int = args.height) -> None:
                    screenshot(
                        server.url + route, out / name, profile, args.width, height, args.budget
                    )

                shoot(f"/runs/flow-run/{run['id']}", "run-v1.png")
                shoot("/artifacts", "artifacts.png")
                gallery = None
                for a in artifacts:
                    name = re.sub(r"[^a-z0-9-]+", "-", a["key"] or f"{a['type']}-{a['id']}")
                    tall = args.artifact_height
                    shoot(f"/artifacts/artifact/{a['id']}", f"artifact-{name}.png", tall)
                    shoot(f"/v2/artifacts/artifact/{a['id']}", f"artifact-{name}-v2.png", tall)
                    if a["key"] and a["key"].endswith("gallery"):
                        gallery = a
                browser = Browser(chromium(), profile, args.width)
                graph = shoot_run_pages(
                    browser, server.url, server.api, run["id"], out, args.budget
                )
            finally:
                s3.stop()
            if gallery is not None:
                shoot(
                    f"/artifacts/artifact/{gallery['id']}",
                    "gallery-s3-stopped.png",
                    args.artifact_height,
                )
        for line in [*graph, *report(artifacts)]:
            print(line)
        if args.docs:
            for png in sorted(out.glob("ui-*.png")):
                shutil.copyfile(png, ROOT / "docs" / "img" / png.name)
                print(f"copied {png.name} to docs/img/", file=sys.stderr)
        return 0 if batch.returncode == 0 else 1
    finally:
        server.stop()
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
