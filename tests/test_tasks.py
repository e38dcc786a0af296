"""Prefect tasks on the real Prefect engine against the emulator: retries, caching, downloads."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
from PIL import Image
from prefect import flow

from prefect_gptimage.errors import FalRequestFailed, FalRequestTimeout
from prefect_gptimage.schemas import GenerationResult, GptImageEditRequest, GptImageRequest
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.queue import submit_request
from prefect_gptimage.testing import FalEmulator, Fault


def req(unique: str, **kw: object) -> GptImageRequest:
    return GptImageRequest(prompt=f"a red kite {unique}", quality="low", **kw)  # type: ignore[arg-type]


@flow
def one(
    request: GptImageRequest | GptImageEditRequest, output_dir: str, timeout: float | None = None
) -> GenerationResult:
    return generate_images(request, GenerationOptions(output_dir=output_dir, timeout=timeout))


def test_generate_downloads_verified_images(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    result = one(
        req(unique, num_images=2, image_size="1024x1536", output_format="webp"), str(tmp_path)
    )
    assert len(result.images) == 2
    for img in result.images:
        with Image.open(img.path) as im:
            assert (im.format, im.size) == ("WEBP", (1024, 1536))
        assert len(img.sha256) == 64 and img.bytes == Path(img.path).stat().st_size
    assert not result.from_cache


def test_second_run_is_served_from_cache(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    request = req(unique)
    first = one(request, str(tmp_path))
    accepted = fal_emulator.stats["accepted"]
    second = one(request, str(tmp_path / "again"))
    assert fal_emulator.stats["accepted"] == accepted  # nothing paid twice
    assert second.from_cache and second.handle.request_id == first.handle.request_id
    assert Path(second.images[0].path).exists()
    # the same prompt with other parameters is another paid request
    one(req(unique, output_format="jpeg"), str(tmp_path))
    assert fal_emulator.stats["accepted"] == accepted + 1


def test_flow_retry_resumes_instead_of_submitting_again(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    attempts: list[int] = []

    @flow(retries=1, retry_delay_seconds=0)
    def flaky() -> str:
        result = generate_images(req(unique), GenerationOptions(output_dir=str(tmp_path)))
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("something after generation failed")
        return result.handle.request_id

    before = fal_emulator.stats["accepted"]
    flaky()
    assert len(attempts) == 2
    assert fal_emulator.stats["accepted"] == before + 1


def test_transient_faults_on_every_step_are_recovered_by_one_layer(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    before, fired = fal_emulator.stats["accepted"], fal_emulator.stats["faults_fired"]
    statuses = fal_emulator.stats["status"]
    fal_emulator.inject(Fault("status", "500_json", count=4))
    fal_emulator.inject(Fault("result", "503_json", count=2))
    fal_emulator.inject(Fault("media", "503_json", count=2))
    result = one(req(unique), str(tmp_path))
    assert len(result.images) == 1
    assert fal_emulator.stats["faults_fired"] == fired + 8  # every fault met, and recovered
    assert fal_emulator.stats["accepted"] == before + 1  # paid once
    # one layer retries: each refused status call is made once more, not once per layer
    assert fal_emulator.stats["status"] - statuses <= 4 + 3


def test_permanent_failure_fails_at_once_with_fals_message(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=unique))
    before = fal_emulator.stats
    started = time.monotonic()
    with pytest.raises(FalRequestFailed, match="content_policy_violation"):
        one(req(unique), str(tmp_path))
    after = fal_emulator.stats
    assert after["accepted"] == before["accepted"] + 1  # not resubmitted
    assert after["submit"] == before["submit"] + 1
    # no backoff-retry rounds: fal's answer is read once and believed
    assert after["result"] == before["result"] + 1
    assert time.monotonic() - started < 60  # a generous deadline for a loaded machine


def test_server_side_failure_is_resubmitted_once(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("submit", "fail", count=1, match=unique))  # 500 runner_server_error
    before = fal_emulator.stats["accepted"]
    result = one(req(unique), str(tmp_path))
    assert len(result.images) == 1
    assert fal_emulator.stats["accepted"] == before + 2
    # the fresh request replaced the failed one in the cache: a re-run pays nothing
    one(req(unique), str(tmp_path))
    assert fal_emulator.stats["accepted"] == before + 2


def test_sync_mode_data_uris(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    media = fal_emulator.stats["media"]
    result = one(req(unique, sync_mode=True, output_format="jpeg"), str(tmp_path))
    assert result.output.images[0].url.startswith("data:image/jpeg;base64,")
    assert result.images[0].source_url == "data:"
    with Image.open(result.images[0].path) as im:
        assert im.format == "JPEG"
    assert fal_emulator.stats["media"] == media  # no media fetch needed


def test_edit_endpoint(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "navy").save(buf, "PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    edit = GptImageEditRequest(
        prompt=f"add a moon {unique}", image_urls=[data_uri], image_size="1024x1024", quality="low"
    )
    result = one(edit, str(tmp_path))
    assert result.handle.endpoint == "fal-ai/gpt-image-1.5/edit"
    assert (result.images[0].width, result.images[0].height) == (1024, 1024)


def test_deadline_cancels_at_fal(fal_emulator: FalEmulator, unique: str, tmp_path: Path) -> None:
    fal_emulator.set_latency(10.0)
    cancelled = fal_emulator.stats["cancelled"]
    with pytest.raises(FalRequestTimeout):
        one(req(unique), str(tmp_path), timeout=0.5)
    assert fal_emulator.stats["cancelled"] == cancelled + 1


def test_submit_task_cache_key_ignores_credentials(fal_emulator: FalEmulator, unique: str) -> None:
    from pydantic import SecretStr

    from prefect_gptimage.credentials import FalCredentials

    @flow
    def twice() -> tuple[str, str]:
        a = submit_request(req(unique))
        b = submit_request(req(unique), FalCredentials(api_key=SecretStr("another-key:secret")))
        return a.request_id, b.request_id

    first, second = twice()
    assert first == second
