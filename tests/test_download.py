"""Download guards: only https on allowed hosts, bounded size, bytes that decode as promised."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from prefect_gptimage.errors import PermanentDownloadError, TransientDownloadError
from prefect_gptimage.fal.client import FalQueueClient, RetryPolicy
from prefect_gptimage.fal.media import MediaPolicy, download_image_file, host_allowed
from prefect_gptimage.schemas import GptImageRequest, ImageFile
from prefect_gptimage.tasks.policies import media_policy
from prefect_gptimage.testing import FalEmulator, Fault

FAST = RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.02)


def _image(emulator: FalEmulator, unique: str, fmt: str = "png") -> ImageFile:
    client = FalQueueClient(retry=FAST)
    request = GptImageRequest(prompt=f"a fox {unique}", quality="low", output_format=fmt)  # type: ignore[arg-type]
    return client.run(request)[1].images[0]


def _get(
    image: ImageFile, tmp_path: Path, policy: MediaPolicy | None = None, fmt: str = "png"
) -> Path:
    got = download_image_file(
        image,
        dest_dir=tmp_path,
        request_id="req-1",
        endpoint="fal-ai/gpt-image-1.5",
        index=0,
        expected_format=fmt,
        expected_size=(1024, 1024),
        policy=policy or media_policy(),
        retry=FAST,  # type: ignore[arg-type]
    )
    return Path(got.path)


def test_host_patterns() -> None:
    assert host_allowed("v3.fal.media", ["*.fal.media"])
    assert host_allowed("v3b.fal.media", ["*.fal.media"])
    assert not host_allowed("fal.media.evil.com", ["*.fal.media"])
    assert not host_allowed("evilfal.media", ["*.fal.media"])


def test_refuses_http_and_unknown_hosts(tmp_path: Path) -> None:
    with pytest.raises(PermanentDownloadError, match="only https"):
        _get(ImageFile(url="http://v3.fal.media/files/a.png"), tmp_path)
    with pytest.raises(PermanentDownloadError, match="not in PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS"):
        _get(ImageFile(url="https://example.com/a.png"), tmp_path)


def test_refuses_oversized_bodies(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    small = media_policy().model_copy(update={"max_bytes": 1000})
    with pytest.raises(PermanentDownloadError, match="limit"):
        _get(_image(fal_emulator, unique), tmp_path, small)
    assert not list(tmp_path.glob("*"))  # no partial file left behind


def test_wrong_format_is_permanent(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    image = _image(fal_emulator, unique)
    fal_emulator.inject(Fault("media", "wrong_format", count=None))
    with pytest.raises(PermanentDownloadError, match="expected a png"):
        _get(image, tmp_path)


def test_truncated_body_is_retried(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    image = _image(fal_emulator, unique)
    fal_emulator.inject(Fault("media", "truncate", count=1))
    path = _get(image, tmp_path)
    with Image.open(path) as im:
        assert im.size == (1024, 1024)


def test_persistent_truncation_is_transient(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    image = _image(fal_emulator, unique)
    fal_emulator.inject(Fault("media", "truncate", count=None))
    with pytest.raises(TransientDownloadError):
        _get(image, tmp_path)


def test_missing_media_is_permanent(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    image = _image(fal_emulator, unique)
    fal_emulator.inject(Fault("media", "404", count=None))
    with pytest.raises(PermanentDownloadError, match="gone"):
        _get(image, tmp_path)


def test_existing_file_is_reused_without_network(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    image = _image(fal_emulator, unique)
    first = _get(image, tmp_path)
    media = fal_emulator.stats["media"]
    assert _get(image, tmp_path) == first
    assert fal_emulator.stats["media"] == media


def test_trickled_media_body_hits_its_time_limit(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """httpx's timeout is per read: a body trickled at 64 B/s must still end (body_timeout)."""
    image = _image(fal_emulator, unique)
    fal_emulator.inject(Fault("media", "trickle", count=None, delay=0.05))
    policy = media_policy().model_copy(update={"body_timeout": 0.5})
    media = fal_emulator.stats["media"]
    started = time.monotonic()
    with pytest.raises(TransientDownloadError, match="body too slow"):
        _get(image, tmp_path, policy)
    assert fal_emulator.stats["media"] - media == 3  # 3 attempts (FAST), each cut, then given up
    # each read was cut at 0.5 s rather than trickled to the end (the 1024x1024 PNG at 20 B/s
    # would take hours): a generous deadline for a loaded machine
    assert time.monotonic() - started < 60
    assert not list(tmp_path.glob(".part-*"))


def test_corrupt_image_without_a_length_to_check_is_refused(tmp_path: Path) -> None:
    import base64
    import io

    buf = io.BytesIO()
    Image.effect_noise((1024, 1024), 60).convert("RGB").save(buf, "PNG")
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]  # a data: URI has no Content-Length
    image = ImageFile(url="data:image/png;base64," + base64.b64encode(cut).decode())
    with pytest.raises(PermanentDownloadError, match="not a readable image"):
        _get(image, tmp_path)


def test_a_killed_runs_parts_are_swept_by_the_next_download(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    import os
    import time

    stale, fresh = tmp_path / ".part-killed", tmp_path / ".part-live"
    for part in (stale, fresh):
        part.write_bytes(b"half an image")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    _get(_image(fal_emulator, unique), tmp_path)
    assert not stale.exists()  # left by a kill -9: removed
    assert fresh.exists()  # could be another download in progress: kept


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_images_manifest_and_page_get_the_umasks_mode(
    tmp_path: Path, umask: int, mode: int
) -> None:
    """A downloaded image, the manifest and index.html beside it: one mode, the umask's (like
    ``open(path, "w")``), not 0600 for the images only."""
    import base64
    import io
    import os
    import stat

    from prefect_gptimage.reporting.gallery import HtmlGallery
    from prefect_gptimage.reporting.manifest import ManifestWriter

    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), "teal").save(buf, "PNG")
    image = ImageFile(url="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    previous = os.umask(umask)
    try:
        written = [
            _get(image, tmp_path),
            ManifestWriter(tmp_path / "manifest.jsonl").close(),
            HtmlGallery(tmp_path / "index.html", "modes").close(),
        ]
    finally:
        os.umask(previous)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {
        p.name: oct(mode) for p in written
    }
