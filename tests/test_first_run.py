"""What a new user meets on a first run (issue 11), run as the user runs it where it can be.

* the host fal_client is configured for (``FAL_QUEUE_RUN_HOST`` / ``FAL_RUN_HOST``) serves images
  that are downloaded with no other setting; anything else is still refused, hop by hop;
* the temporary Prefect API the CLI starts prints nothing and leaves nothing in the temp folder;
* a missing fal key is one line, before Prefect, with nothing written;
* help is plain text;
* the demo says what to install when moto is missing, and shows the cache on a second run.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process

from prefect_gptimage.errors import PermanentDownloadError
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.media import download_image_file
from prefect_gptimage.schemas import GptImageRequest, ImageFile
from prefect_gptimage.tasks.policies import media_policy
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.certs import shared_tls

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
