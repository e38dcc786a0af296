"""Async Prefect tasks in an async flow: several requests at once, each paid once, overlapping."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import flow

from prefect_gptimage.schemas import GenerationResult, GptImageRequest
from prefect_gptimage.tasks.download import adownload_image
from prefect_gptimage.tasks.generate import agenerate_images
from prefect_gptimage.tasks.options import GenerationOptions
from prefect_gptimage.tasks.queue import afetch_result, asubmit_request
from prefect_gptimage.testing import FalEmulator, Fault


def test_four_agenerate_images_overlap_at_fal_and_pay_once(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    fal_emulator.set_latency(1.0)
    requests = [GptImageRequest(prompt=f"tile {i} {unique}", quality="low") for i in range(4)]
    options = GenerationOptions(output_dir=str(tmp_path))

    @flow
    async def tiles() -> list[GenerationResult]:
        return list(await asyncio.gather(*(agenerate_images(r, options) for r in requests)))

    accepted = fal_emulator.stats["accepted"]
    results = asyncio.run(tiles())
    assert fal_emulator.stats["accepted"] == accepted + 4  # each request paid once
    infos = [fal_emulator.request(r.handle.request_id) for r in results]
    assert all(i is not None and i.started_at and i.completed_at for i in infos)
    # all four were running at fal at the same moment: the last start precedes the first end
    assert max(i.started_at for i in infos) < min(i.completed_at for i in infos)  # type: ignore[union-attr,type-var]
    assert [Path(r.images[0].path).exists() for r in results] == [True] * 4

    again = asyncio.run(tiles())  # a re-run is served from the cache: nothing is paid twice
    assert fal_emulator.stats["accepted"] == accepted + 4
    assert all(r.from_cache for r in again)


def test_async_step_tasks_share_the_sync_cache_and_recover_faults(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    request = GptImageRequest(prompt=f"a heron {unique}", quality="low")

    @flow
    async def steps() -> tuple[str, str]:
        handle = await asubmit_request(request)
        fal_emulator.inject(Fault("status", "503_json", count=2))
        output = await afetch_result(handle)
        image = await adownload_image(
            output.images[0], request, handle.request_id, 0, str(tmp_path)
        )
        again = await asubmit_request(request)  # cached: same request id, no new submit
        return again.request_id, image.path

    accepted, fired = fal_emulator.stats["accepted"], fal_emulator.stats["faults_fired"]
    request_id, path = asyncio.run(steps())
    assert fal_emulator.stats["accepted"] == accepted + 1
    assert fal_emulator.stats["faults_fired"] == fired + 2
    assert fal_emulator.request(request_id) is not None and Path(path).exists()
