"""The key stays ours: never echoed into messages, never sent to a host a reply merely names.

Faults injected into the bundled emulator: a 401 whose body repeats the Authorization header it
was sent (a careless proxy), and a submit reply whose status/result/cancel URLs name another
host. Nothing in fal_client or httpx is patched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_gptimage.errors import PermanentDownloadError, PermanentFalError
from prefect_gptimage.fal.client import FalQueueClient
from prefect_gptimage.fal.media import MediaPolicy, download_image_file
from prefect_gptimage.retry import RetryPolicy
from prefect_gptimage.schemas import GptImageRequest, ImageFile
from prefect_gptimage.testing import FalEmulator, Fault

KEY = "key-id-1234:very-secret-key-5678"
FAST = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.02)


@pytest.mark.parametrize("operation", ["submit", "status"])
def test_an_echoed_key_is_redacted_from_the_error(
    fal_emulator: FalEmulator, unique: str, operation: str
) -> None:
    client = FalQueueClient(KEY, retry=FAST)
    request = GptImageRequest(prompt=f"a key {unique}", quality="low")
    handle = client.submit(request) if operation == "status" else None
    fal_emulator.inject(Fault(operation, "echo_key", count=1))  # type: ignore[arg-type]
    with pytest.raises(PermanentFalError) as info:
        client.status(handle) if handle else client.submit(request)
    text = f"{info.value} {info.value.detail!r}"
    assert "invalid credentials" in text  # fal's (the proxy's) words still reach the user
    for part in (KEY, "key-id-1234", "very-secret-key-5678"):
        assert part not in text


def test_queue_urls_on_another_host_are_never_followed(
    fal_emulator: FalEmulator, unique: str
) -> None:
    client = FalQueueClient(KEY, retry=FAST)
    fal_emulator.inject(Fault("submit", "foreign_urls", count=1))
    statuses = fal_emulator.stats["status"]
    handle, output = client.run(GptImageRequest(prompt=f"a host {unique}", quality="low"))
    assert handle.status_url and "foreign.invalid" in handle.status_url  # what the reply said
    assert output.images  # ...yet status and result went to the configured queue host
    assert fal_emulator.stats["status"] > statuses


def test_media_urls_with_credentials_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PermanentDownloadError, match="credentials"):
        download_image_file(
            ImageFile(url="https://user:pass@v3.fal.media/files/x.png"),
            dest_dir=tmp_path,
            request_id="r1",
            endpoint="fal-ai/gpt-image-1.5",
            index=0,
            expected_format="png",
            policy=MediaPolicy(),
        )
