"""What a new user meets on a first run (issue 11), run as the user runs it where it can be.

* the host fal_client is configured for (``FAL_QUEUE_RUN_HOST`` / ``FAL_RUN_HOST``) serves images
  that are downloaded with no other setting; anything else is still refused, hop by hop;
* the temporary Prefect API (Prefect's own) prints nothing, leaves nothing in the temp folder,
  is stopped with a CLI killed by ``kill -9``, and a slow one is one line;
* nothing is printed at INFO unless ``--verbose``; a path is printed only for a file written;
* an invalid bucket name is one line, before Prefect is imported;
* fal unreachable: one line, within two minutes (the retry budget spent once);
* a missing fal key is one line, before Prefect, with nothing written;
* help is plain text;
* the demo says what to install when moto is missing, and shows the cache on a second run.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process, start_cli_process

from prefect_gptimage.errors import PermanentDownloadError
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.media import download_image_file
from prefect_gptimage.schemas import GptImageRequest, ImageFile
from prefect_gptimage.tasks.policies import media_policy
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.certs import shared_tls

#: Prefect's temporary server takes up to a minute to answer on a loaded machine (20 s default)
SLOW_OK = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240"}
FAST = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)
KEY_VARIABLES = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET")


def _emulated_image(unique: str) -> ImageFile:
    request = GptImageRequest(prompt=f"a heron {unique}", quality="low")
    return FalQueueClient(retry=FAST).run(request)[1].images[0]


def _download(image: ImageFile, dest: Path) -> Path:
    got = download_image_file(
        image,
        dest_dir=dest,
        request_id="req-1",
        endpoint="fal-ai/gpt-image-1.5",
        index=0,
        expected_format="png",
        expected_size=(1024, 1024),
        policy=media_policy(),
        retry=FAST,  # type: ignore[arg-type]
    )
    return Path(got.path)


# -- 1. the configured fal host is trusted ------------------------------------------------------


def test_media_from_the_configured_fal_host_is_accepted_without_an_allowlist(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _emulated_image(unique)
    assert image.url.startswith(f"https://{fal_emulator.host}/")
    monkeypatch.delenv("PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS", raising=False)
    monkeypatch.delenv("FAL_RUN_HOST", raising=False)
    monkeypatch.setenv("FAL_QUEUE_RUN_HOST", fal_emulator.host)  # localhost:PORT

    assert _download(image, tmp_path / "trusted").stat().st_size > 0

    # with neither the allowlist nor a fal host naming it, the same image is refused, and the
    # message says which variable to set
    monkeypatch.delenv("FAL_QUEUE_RUN_HOST")
    with pytest.raises(PermanentDownloadError) as refused:
        _download(image, tmp_path / "refused")
    assert "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS" in str(refused.value)
    assert "FAL_QUEUE_RUN_HOST" in str(refused.value)
    assert not list((tmp_path / "refused").glob("*.png"))


@pytest.fixture
def redirector() -> Iterator[dict[str, Any]]:
    """An HTTPS server on localhost (the emulator's certificate) answering 302 to ``to``."""
    where: dict[str, Any] = {"to": ""}

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", where["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    context: ssl.SSLContext = shared_tls().server_context
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    where["port"] = server.server_address[1]
    try:
        yield where
    finally:
        server.shutdown()
        server.server_close()


def test_trust_is_https_only_and_checked_on_every_redirect_hop(
    fal_emulator: FalEmulator,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redirector: dict[str, Any],
) -> None:
    image = _emulated_image(unique)
    media_path = image.url.split(fal_emulator.host, 1)[1]
    monkeypatch.delenv("PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS", raising=False)
    monkeypatch.setenv("FAL_QUEUE_RUN_HOST", f"localhost:{redirector['port']}")
    monkeypatch.setenv("FAL_RUN_HOST", f"localhost:{redirector['port']}")
    start = ImageFile(url=f"https://localhost:{redirector['port']}/files/x.png")

    # a hop to the trusted host: followed
    redirector["to"] = f"https://localhost:{fal_emulator.port}{media_path}"
    assert _download(start, tmp_path / "ok").stat().st_size > 0
    # a hop to another host (the same server, by address): refused at that hop
    redirector["to"] = f"https://127.0.0.1:{fal_emulator.port}{media_path}"
    with pytest.raises(PermanentDownloadError, match=r"'127\.0\.0\.1'"):
        _download(start, tmp_path / "hop")
    # plain http on the trusted host: refused, first hop or later
    with pytest.raises(PermanentDownloadError, match="only https"):
        _download(ImageFile(url=f"http://localhost:{fal_emulator.port}{media_path}"), tmp_path)
    redirector["to"] = f"http://localhost:{fal_emulator.port}{media_path}"
    with pytest.raises(PermanentDownloadError, match="only https"):
        _download(start, tmp_path / "http-hop")


def _user_env(tmp_path: Path, harness: dict[str, Any] | None = None) -> dict[str, str]:
    """The session's environment as a user's: only standard variables, no media allowlist."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "PREFECT_API_URL",
            "PREFECT_HOME",
            "PREFECT_LOCAL_STORAGE_PATH",
            "PREFECT_SERVER_ANALYTICS_ENABLED",
            "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS",
        )
    }
    env["PREFECT_GPTIMAGE_OUTPUT_DIR"] = str(tmp_path / "images")
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path / "results")
    if harness is not None:
        env["PREFECT_API_URL"] = str(harness["api_url"])
    return env


def test_generate_against_a_fal_compatible_host_needs_no_allowlist(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    env = _user_env(tmp_path, prefect_harness)  # FAL_QUEUE_RUN_HOST=localhost:PORT, as a user has

    done = run_cli_process(["generate", f"a kite {unique}", "--quality", "low", "--json"], env)

    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == 1 and Path(summary["images"][0]["path"]).is_file()

    # fal_client pointed at 127.0.0.1 while the media comes from 'localhost': not trusted
    other = {**env, "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{fal_emulator.port}"}
    other["FAL_RUN_HOST"] = other["FAL_QUEUE_RUN_HOST"]
    refused = run_cli_process(["generate", f"a kite {unique} again", "--quality", "low"], other)
    assert refused.returncode == 1
    assert "refusing to download from host 'localhost'" in refused.stderr
    assert "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS" in refused.stderr


# -- 2a. the temporary Prefect API is quiet and leaves nothing behind ---------------------------


def test_a_run_on_the_temporary_api_prints_nothing_about_it_and_leaves_no_files(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"{unique} quiet", "quality": "low"}) + "\n")
    private_tmp = tmp_path / "tmp"  # the CLI's temporary folder, watched
    private_tmp.mkdir()
    env = _user_env(tmp_path)  # no PREFECT_API_URL, telemetry setting left at Prefect's default
    env.update({"PREFECT_HOME": str(tmp_path / "home"), "TMPDIR": str(private_tmp), **SLOW_OK})

    done = run_cli_process(["generate", f"a gull {unique}", "--quality", "low", "--json"], env)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "temporary API server" not in done.stderr  # offline, telemetry used to log an error
    assert "telemetry" not in done.stderr.lower()
    assert list(private_tmp.iterdir()) == []  # the server's log is gone too


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``: their command lines."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid and stat[0] != "Z":
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.timeout(900)  # CLI runs and their re-run, each importing Prefect
def test_a_killed_run_leaves_no_server_and_the_next_run_resumes(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    fal_emulator.set_latency(6.0)  # still at fal when the run is killed
    env = {**_user_env(tmp_path), "PREFECT_HOME": str(tmp_path / "home"), **SLOW_OK}
    args = ["generate", f"a killed run {unique}", "--quality", "low", "--json"]
    accepted, polls = fal_emulator.stats["accepted"], fal_emulator.stats["status"]
    first = start_cli_process(args, env)
    try:
        deadline = time.monotonic() + 240
        # a status poll comes after the submit's handle is recorded: a re-run resumes it
        while fal_emulator.stats["status"] == polls and time.monotonic() < deadline:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        servers = [p for p, cmd in _children(first.pid).items() if "uvicorn" in cmd]
        assert len(servers) == 1, _children(first.pid)  # Prefect's own temporary server
        first.kill()  # SIGKILL: no atexit, no handler
    finally:
        first.kill()
        first.communicate(timeout=120)
    deadline = time.monotonic() + 120  # a generous deadline: a loaded machine reaps slowly
    while _alive(servers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(servers[0]), "the killed run's temporary server is still running"

    again = run_cli_process(args, env)

    assert again.returncode == 0, again.stderr[-3000:]
    assert len(json.loads(again.stdout.strip().splitlines()[-1])["images"]) == 1
    assert fal_emulator.stats["accepted"] == accepted + 1  # resumed, not paid twice


def test_a_slow_temporary_server_is_one_line(fal_emulator: FalEmulator, tmp_path: Path) -> None:
    env = _user_env(tmp_path)  # no PREFECT_API_URL: Prefect's temporary server
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "home"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
        }
    )
    submits = fal_emulator.stats["submit"]

    done = run_cli_process(["generate", "a server too slow", "--quality", "low"], env)

    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "temporary API server did not start" in lines[0]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in lines[0]
    assert done.stdout == ""
    assert fal_emulator.stats["submit"] == submits


# -- 2b. what a run prints ---------------------------------------------------------------------


def test_generate_prints_no_info_and_no_path_it_did_not_fill(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    env = _user_env(tmp_path, prefect_harness)
    args = ["generate", f"a quiet heron {unique}", "--quality", "low"]

    done = run_cli_process([*args, "--json"], env)  # no bucket: images stay on disk

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # no INFO line, no "resuming", no server line
    *lines, last = done.stdout.strip().splitlines()
    summary = json.loads(last)
    assert lines == [summary["images"][0]["path"]]  # the image, and no manifest path
    manifest = summary["manifest_uri"]
    assert manifest is None or Path(manifest).stat().st_size > 0

    verbose = run_cli_process([*args, "--verbose"], env)  # the same request, from the cache

    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO" in verbose.stderr
    assert "0 new submits: every image came from the cache (nothing paid)" in verbose.stderr


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_an_invalid_bucket_is_one_line_before_prefect_is_imported(
    fal_emulator: FalEmulator, tmp_path: Path, command: str
) -> None:
    shadow = tmp_path / "no-prefect" / "prefect"  # importing Prefect would fail loudly
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the CLI imported prefect')\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a bucket too bad", "quality": "low"}) + "\n")
    env = {**_user_env(tmp_path), "FAL_KEY": "bucket-key-id:bucket-key-secret"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    args = {
        "generate": ["generate", "a bucket too bad", "--bucket", "My_Bucket!"],
        "batch": ["batch", str(rows), "--bucket", "My_Bucket!"],
    }[command]
    submits = fal_emulator.stats["submit"]

    done = run_cli_process(args, env)

    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "bucket" in lines[0] and "My_Bucket!" in lines[0]
    assert done.stdout == ""
    assert not (tmp_path / "images").exists()
    assert fal_emulator.stats["submit"] == submits


def test_fal_unreachable_is_one_line_within_two_minutes(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], tmp_path: Path
) -> None:
    with FalEmulator() as gone:  # a fal host that refuses every connection once stopped
        host = gone.host
    env = _user_env(tmp_path, prefect_harness)  # the session emulator's CA bundle
    env["FAL_QUEUE_RUN_HOST"] = env["FAL_RUN_HOST"] = host
    env.pop("PREFECT_GPTIMAGE_RETRY_MAX_DELAY", None)  # a user's backoff and retry budget
    started = time.monotonic()

    done = run_cli_process(["generate", "a lighthouse out of reach", "--quality", "low"], env)

    elapsed = time.monotonic() - started
    print(f"fal unreachable ({host}): exit {done.returncode} after {elapsed:.1f}s")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("FAILED:")
    assert elapsed < 120, f"{elapsed:.1f}s: the retry budget was spent more than once"


# -- 2c. a missing fal key --------------------------------------------------------------------


def _keyless_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in _user_env(tmp_path).items() if k not in KEY_VARIABLES}
    env["FAL_HOME_DIR"] = str(tmp_path / "fal-home")  # no `fal auth login` token there
    env["PREFECT_HOME"] = str(tmp_path / "home")
    return env


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_a_missing_key_is_one_line_before_prefect_and_nothing_is_written(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path, command: str
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": f"{unique} keyless", "quality": "low"}) + "\n")
    args = {
        "generate": ["generate", f"an owl {unique}", "--quality", "low"],
        "batch": ["batch", str(rows), "--bucket", "b"],
    }[command]
    submits = fal_emulator.stats["submit"]
    env = _keyless_env(tmp_path)
    shadow = tmp_path / "no-prefect" / "prefect"  # importing Prefect would fail loudly
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the CLI imported prefect')\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    started = time.monotonic()

    done = run_cli_process(args, env)

    elapsed = time.monotonic() - started
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "FAL_KEY" in lines[0] and "fal auth login" in lines[0]
    # before Prefect: not imported (the shadow above), no home (below); the time bound is only a
    # generous deadline for a loaded machine (it used to take 8-13 s idle, now ~1 s)
    assert elapsed < 60, f"{elapsed:.1f}s"
    assert not (tmp_path / "images").exists()
    assert not (tmp_path / "home").exists()  # no Prefect home, database or server
    assert fal_emulator.stats["submit"] == submits


def test_dry_run_needs_no_key(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a dry run without a key", "quality": "low"}) + "\n")

    done = run_cli_process(["batch", str(rows), "--dry-run"], _keyless_env(tmp_path))

    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run: $" in done.stderr
    assert "FAL_KEY" not in done.stderr


def _sample_dry_run(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[int]]:
    """``batch SAMPLE --dry-run --json`` in a fresh process, and the other processes that ran
    with its ``PREFECT_HOME`` meanwhile (a temporary API server would be one of them)."""
    sample = Path(__file__).parent.parent / "prefect_gptimage" / "data" / "sample_prompts.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect_gptimage.cli", "batch", str(sample), "--dry-run", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    needle = f"PREFECT_HOME={env['PREFECT_HOME']}".encode()
    others: set[int] = set()
    while proc.poll() is None:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in (proc.pid, os.getpid()):
                try:
                    if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                        others.add(int(entry))
                except OSError:
                    continue
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), others


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_dry_run_on_a_fresh_home_starts_no_server_and_needs_no_api(tmp_path: Path) -> None:
    env = _keyless_env(tmp_path)  # no PREFECT_API_URL, no key, a Prefect home that is not there
    del env["PREFECT_LOCAL_STORAGE_PATH"]  # the home's own storage: $PREFECT_HOME/storage
    started = time.monotonic()

    done, others = _sample_dry_run(env)

    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert others == set()  # no uvicorn, no `prefect server`: no child at all
    assert "temporary server" not in done.stderr.lower()
    assert not (tmp_path / "home" / "prefect.db").exists()  # no server ran its migrations
    lines = done.stderr.strip().splitlines()
    assert lines[-2].endswith(": 5 requests, 0 cached, estimated cost $0.103"), done.stderr
    assert lines[-1] == "dry run: $0.103 for 5 requests"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["estimated_cost_usd"] == pytest.approx(0.103) and summary["submitted"] == 0
    # ~0.3 s on an idle machine (see README); no server is shown by the checks above, the bound
    # is only a generous deadline for a loaded machine
    assert elapsed < 120, f"{elapsed:.1f}s"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_dry_run_reads_the_local_cache_without_an_api(tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    from prefect_gptimage.engine.plan import plan_cost
    from prefect_gptimage.prompts import load_prompt_file
    from prefect_gptimage.schemas import RequestHandle
    from prefect_gptimage.tasks.cache import submit_cache_key

    sample = Path(__file__).parent.parent / "prefect_gptimage" / "data" / "sample_prompts.jsonl"
    row = load_prompt_file(sample)[0]
    storage = tmp_path / "results"
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(storage)))
    handle = RequestHandle(endpoint=row.request.endpoint, request_id=str(uuid.uuid4()))
    store.write(obj=handle, key=submit_cache_key(row.request, row.variant))
    env = _keyless_env(tmp_path)  # PREFECT_LOCAL_STORAGE_PATH=tmp/results, no API

    done, others = _sample_dry_run(env)

    assert done.returncode == 0, done.stderr[-3000:]
    assert others == set()  # read without asking a (temporary) server for its default store
    assert "5 requests, 1 cached" in done.stderr, done.stderr[-3000:]
    free = round(0.103 - plan_cost([row])[0], 6)  # the cached row is free
    assert f"dry run: ${free:.3f} for 4 requests (1 cached)" in done.stderr


def test_dry_run_without_an_api_says_a_block_store_was_not_read(tmp_path: Path) -> None:
    env = {**_keyless_env(tmp_path), "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/results"}

    done, others = _sample_dry_run(env)

    assert done.returncode == 0, done.stderr[-3000:]
    assert others == set()
    assert "cache not read" in done.stderr and "PREFECT_API_URL" in done.stderr
    assert "dry run: $0.103 for 5 requests" in done.stderr


def test_dry_run_path_imports_no_prefect_boto3_or_httpx() -> None:
    """The dry run shares the request identity and run key with the batch (schemas, prompts),
    and stays fast because none of those modules pulls in Prefect, boto3 or httpx."""
    code = (
        "import sys\n"
        "import prefect_gptimage.cli.dry_run\n"
        "heavy = ('prefect', 'boto3', 'httpx')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def _jwt(exp: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'exp': int(exp)})}.sig"


def test_a_fal_auth_login_token_counts_as_a_key(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    env = {**_keyless_env(tmp_path), "PREFECT_API_URL": str(prefect_harness["api_url"])}
    home = Path(env["FAL_HOME_DIR"])
    home.mkdir()
    (home / "auth0_token").write_text(f"refresh-token\n{_jwt(time.time() + 3600)}\n")

    done = run_cli_process(["generate", f"a crane {unique}", "--quality", "low"], env)

    # fal_client sent the login token (the emulator only takes "Key ..." and answers 401): the
    # CLI did not refuse to start for want of a key
    assert "no fal key found" not in done.stderr
    assert done.returncode == 1
    assert "401" in done.stderr or "authoriz" in done.stderr.lower(), done.stderr[-2000:]


# -- 2d. help is plain text -------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["generate"], ["batch"], ["demo"], ["emulator"]])
def test_help_is_plain_text(command: list[str], tmp_path: Path) -> None:
    done = run_cli_process([*command, "--help"], _user_env(tmp_path))

    assert done.returncode == 0, done.stderr
    assert "usage: prefect-gptimage" in done.stdout
    assert "``" not in done.stdout
    assert ":func:" not in done.stdout and ":class:" not in done.stdout


# -- 2e, 2f. the demo -------------------------------------------------------------------------


def test_demo_without_moto_says_what_to_install(tmp_path: Path) -> None:
    shadow = tmp_path / "no-moto" / "moto"  # what `pip install prefect-gptimage` leaves: no moto
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'moto'\", name='moto')\n"
    )
    env = _user_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    out = tmp_path / "demo-out"

    done = run_cli_process(["demo", "--output-dir", str(out)], env)

    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert 'pip install "prefect-gptimage[demo]"' in lines[0]
    assert not out.exists()


def _images(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".webp")}


def test_demo_twice_pays_once_and_each_run_folder_holds_that_runs_images(tmp_path: Path) -> None:
    from prefect_gptimage.cli.demo import sample_prompt_file
    from prefect_gptimage.prompts import run_key_for

    out = tmp_path / "demo-output"
    run_folder = out / run_key_for(sample_prompt_file(), None)
    run_folder.mkdir(parents=True)  # images an older demo left behind
    (run_folder / "0b10b925-old-request-0.png").write_bytes(b"stale")
    env = {**_user_env(tmp_path), **SLOW_OK}
    for name in ("FAL_QUEUE_RUN_HOST", "FAL_RUN_HOST", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        env.pop(name, None)  # the demo brings its own fal host
    args = ["demo", "--output-dir", str(out), "--latency", "0.05"]

    first = run_cli_process(args, env)

    assert first.returncode == 0, first.stderr[-3000:]
    assert "fal calls: 5 submits" in first.stdout
    images = _images(run_folder)
    assert len(images) == 6  # the sample's 6 images, and nothing older
    manifest = (run_folder / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 6

    second = run_cli_process(args, env)

    assert second.returncode == 0, second.stderr[-3000:]
    assert "0 new submits: every image came from the cache" in second.stdout
    assert "5 cached" in second.stderr  # Prefect's own line agrees
    assert _images(run_folder) == images  # the same files, no new ones
    assert (out / ".prefect").is_dir()  # where the cache lives, with the output
