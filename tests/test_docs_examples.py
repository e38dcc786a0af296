"""The documentation's examples run: the Python blocks of README.md and docs/*.md, and the
offline command-line recipe (docs/cli.md), so they stay true.

Conventions for a fenced code block in those files:

* A ``python`` block is run as a script (``__name__ == "__main__"``) in a fresh namespace, from a
  temporary working directory, against the pytest plugin's fal emulator, the local S3 server (its
  bucket ``my-images`` exists) and the session's Prefect API. Most blocks only define flows and
  tasks, so running them checks that every name they import exists; the work under
  ``if __name__ == "__main__":`` runs for real. Keep those few and cheap.
* ``<!-- not run: reason -->`` on the line before a block skips it, with that reason.
* ``<!-- run: test -->`` before a ``python`` block also calls each ``test_*`` function it
  defines, with the plugin's fixtures as arguments.
* ``<!-- run: offline -->`` before a ``bash`` block puts it in the offline recipe: those blocks
  run in order, as one bash script, in one test. Other shell blocks are not run (they need a
  real fal key, AWS account or server).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from real_services import free_port

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: the bucket the examples stage to
EXAMPLE_BUCKET = "my-images"
#: the fixed ports of the offline recipe, replaced by free ones in the test
RECIPE_PORTS = ("8443", "5000")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<verb>not run|run)\s*:?\s*(?P<arg>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its marker and its text."""

    path: Path
    line: int
    lang: str
    marker: tuple[str, str] | None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, dedented by their fence's indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, lang, start = fence["indent"], fence["lang"].lower(), i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        marker = None
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        found = _MARKER.match(lines[before]) if before >= 0 else None
        if found is not None:
            marker = (found["verb"], found["arg"])
        blocks.append(Block(path, start + 1, lang, marker, "\n".join(body) + "\n"))
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in code_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
RECIPE_BLOCKS = [b for b in ALL_BLOCKS if b.marker == ("run", "offline")]


@pytest.fixture
def example_env(
    fal_emulator: Any, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The emulator, S3 with the examples' bucket, and a scratch working directory."""
    s3.create_bucket(EXAMPLE_BUCKET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_example_runs(block: Block, example_env: Path, request: pytest.FixtureRequest):
    if block.marker is not None and block.marker[0] == "not run":
        pytest.skip(f"{block.id}: not run: {block.marker[1] or 'no reason given'}")
    script = example_env / f"example_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    namespace = runpy.run_path(str(script), run_name="__main__")
    if block.marker == ("run", "test"):
        tests = {n: f for n, f in namespace.items() if n.startswith("test_") and callable(f)}
        assert tests, f"{block.id} is marked `run: test` but defines no test_* function"
        for test in tests.values():
            fixtures = inspect.signature(test).parameters
            test(**{name: request.getfixturevalue(name) for name in fixtures})


def test_markers_are_well_formed() -> None:
    """A marker names its reason, and a `run:` marker one of the known kinds."""
    for block in ALL_BLOCKS:
        if block.marker is None:
            continue
        verb, arg = block.marker
        if verb == "not run":
            assert arg, f"{block.id}: `not run` needs a reason"
        else:
            assert arg in ("test", "offline"), f"{block.id}: unknown marker `run: {arg}`"
            wanted = "python" if arg == "test" else "bash"
            assert block.lang == wanted, f"{block.id}: `run: {arg}` marks a {wanted} block"


def test_settings_page_lists_every_setting() -> None:
    """docs/settings.md has a row for each field of the settings model."""
    from prefect_gptimage.settings import GptImageSettings

    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    missing = [
        name
        for name in GptImageSettings.model_fields
        if f"`PREFECT_GPTIMAGE_{name.upper()}`" not in page
    ]
    assert not missing, f"docs/settings.md does not list: {missing}"


def _recipe_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment of a user's shell: none of this session's fal, TLS or AWS variables (the
    recipe exports its own), the package's commands first on PATH, the session's Prefect API."""
    dropped = ("FAL_", "AWS_", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PREFECT_GPTIMAGE_ALLOWED")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(home / "prefect-home")
    env["PREFECT_API_URL"] = api_url  # a Prefect API already running: no temporary one to start
    return env


@pytest.mark.timeout(700)  # past the 600 s below, so the servers the recipe started are ended
def test_offline_recipe_runs(tmp_path: Path, prefect_harness: dict[str, Any]) -> None:
    """docs/cli.md's offline recipe, run as written (on free ports): the emulator and moto's S3
    server started by hand, every command succeeds, and the second batch is served from the
    cache."""
    assert RECIPE_BLOCKS, "no `<!-- run: offline -->` block in the docs"
    script = "\n".join(textwrap.dedent(b.code) for b in RECIPE_BLOCKS)
    for port in RECIPE_PORTS:
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    prelude = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n"
    proc = subprocess.Popen(
        ["bash", "-c", prelude + script],
        cwd=tmp_path,
        env=_recipe_env(tmp_path, prefect_harness["api_url"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a timeout can end the servers it started too
    )
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
        pytest.fail(f"the offline recipe did not finish in 600 s\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(summaries) == 3, out  # generate, batch, batch again (the dry run prints none)
    generated, first, again = summaries
    assert generated["staged"] == 1 and not generated["failures"], generated
    assert first["staged"] == 2 and first["submitted"] == 2, first
    assert again["staged"] == 2 and again["submitted"] == 0, again
