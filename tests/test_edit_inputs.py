"""Edits of the user's own images (issue 19): local files and s3:// objects as inputs, cached by
content, batch edits over a folder or an S3 prefix, lineage, retention headers.

Real services only: the bundled emulator fetches every input over HTTP(S) as fal does and
records the sha256 of what it read; S3 is moto's server; Prefect is the session's harness.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process
from PIL import Image
from prefect.events import Event
from test_ocr_gate import sent_events

from prefect_gptimage.errors import BatchIncomplete, InputImageError, InvalidRequestError
from prefect_gptimage.reporting.manifest import ImageLine, Manifest
from prefect_gptimage.reporting.summary import RunSummary
from prefect_gptimage.schemas import GptImageEditRequest, InputSource, request_fingerprint
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

__all__ = ["sent_events"]  # the events fixture, shared with the OCR gate's tests

MATERIALIZED = "prefect.asset.materialization.succeeded"


def picture(unique: str, seed: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    """A real image whose bytes are this test's own (its colour comes from ``unique``)."""
    digest = hashlib.sha256(f"{unique}-{seed}".encode()).digest()
    img = Image.new("RGB", size, (digest[0], digest[1], digest[2]))
    img.putpixel((seed % size[0], 0), (digest[3], digest[4], digest[5]))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def mask_png(size: tuple[int, int]) -> bytes:
    """A mask: opaque, with a fully transparent square (where the image is edited)."""
    img = Image.new("RGBA", size, (0, 0, 0, 255))
    for x in range(4, 12):
        for y in range(4, 12):
            img.putpixel((x, y), (0, 0, 0, 0))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def summary_of(state: Any) -> RunSummary:
    result = state.result(raise_on_failure=False)
    if isinstance(result, BatchIncomplete):
        result = result.summary
    assert isinstance(result, RunSummary), result
    return result


def ours(emulator: FalEmulator, unique: str) -> list[Any]:
    return [r for r in emulator.requests() if unique in str(r.arguments.get("prompt"))]


def cli_env(harness: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: the session's Prefect API, this test's result and output dirs."""
    return {
        **os.environ,
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }


# -- the schema: references, identity, masks ----------------------------------------------------


def source(role: str, digest: str, size: tuple[int, int] = (64, 48), index: int = 0) -> InputSource:
    return InputSource.model_validate(
        {
            "role": role,
            "index": index,
            "source": f"/photos/{digest[:6]}.png",
            "sha256": digest,
            "bytes": 10,
            "width": size[0],
            "height": size[1],
            "content_type": "image/png",
            "has_alpha": role == "mask",
        }
    )


def test_an_edit_is_identified_by_its_inputs_bytes_not_their_links() -> None:
    a, b = "a" * 64, "b" * 64
    first = GptImageEditRequest(
        prompt="on white",
        image_urls=["http://s3/bkt/x.png?X-Amz-Signature=1"],
        input_sources=(source("image", a),),
    )
    signed_anew = first.model_copy(
        update={"image_urls": ["https://elsewhere/y.png?X-Amz-Signature=2"]}
    )
    changed = first.model_copy(update={"input_sources": (source("image", b),)})
    assert request_fingerprint(first) == request_fingerprint(signed_anew)
    assert request_fingerprint(first) != request_fingerprint(changed)
    assert "input_sources" not in first.to_arguments()  # never sent to fal


def test_local_paths_and_s3_uris_are_inputs_relative_paths_are_not() -> None:
    request = GptImageEditRequest(
        prompt="on white", image_urls=["/photos/a.png", "s3://bkt/b.png"], mask_image_url="/m.png"
    )
    assert request.unresolved_inputs == ["/photos/a.png", "s3://bkt/b.png", "/m.png"]
    for bad in ("photos/a.png", "s3://bkt/", "s3://"):
        with pytest.raises(ValueError):
            GptImageEditRequest(prompt="on white", image_urls=[bad])


def test_a_mask_must_be_its_images_size() -> None:
    with pytest.raises(ValueError, match="must be the same size"):
        GptImageEditRequest(
            prompt="fix it",
            image_urls=["/a.png"],
            mask_image_url="/m.png",
            input_sources=(source("image", "a" * 64), source("mask", "c" * 64, (32, 32))),
        )


# -- a prompt file with local, relative, s3:// inputs and a mask ---------------------------------


def test_prompt_file_edits_of_local_and_s3_inputs_arrive_byte_for_byte_and_rerun_pays_nothing(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    from prefect_gptimage.flows.batch import batch_to_s3

    photos = tmp_path / "photos"
    photos.mkdir()
    absolute = picture(unique, 1)
    (tmp_path / "absolute.png").write_bytes(absolute)
    relative = picture(unique, 2, fmt="JPEG")
    (photos / "relative.jpg").write_bytes(relative)
    in_s3 = picture(unique, 3, fmt="WEBP")
    source_bucket = f"{s3_bucket}-src"
    local_s3.create_bucket(source_bucket)
    local_s3.client().put_object(Bucket=source_bucket, Key="shop/shoe.webp", Body=in_s3)
    mask = mask_png((64, 48))
    (photos / "mask.png").write_bytes(mask)
    rows = [
        {
            "prompt": f"on white {unique}",
            "quality": "low",
            "image_urls": [str(tmp_path / "absolute.png")],
        },
        {"prompt": f"at night {unique}", "quality": "low", "image_urls": ["photos/relative.jpg"]},
        {
            "prompt": f"in snow {unique}",
            "quality": "low",
            "image_urls": f"s3://{source_bucket}/shop/shoe.webp",
        },
        {
            "prompt": f"together {unique}",
            "quality": "low",
            "image_urls": [str(tmp_path / "absolute.png"), f"s3://{source_bucket}/shop/shoe.webp"],
            "mask_image_url": "photos/mask.png",
        },
    ]
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")

    state = batch_to_s3(str(prompts), bucket=s3_bucket, output_dir=out, return_state=True)
    summary = summary_of(state)
    assert state.is_completed(), summary.failures
    assert summary.staged == 4 and summary.submitted == 4

    # the emulator fetched each input as fal does: the bytes it read are the user's
    read = {r.arguments["prompt"].split(" ")[0]: r.input_sha256 for r in ours(fal_emulator, unique)}
    assert read["on"] == (("image_urls", sha(absolute)),)
    assert read["at"] == (("image_urls", sha(relative)),)
    assert read["in"] == (("image_urls", sha(in_s3)),)
    assert read["together"] == (
        ("image_urls", sha(absolute)),
        ("image_urls", sha(in_s3)),
        ("mask_image_url", sha(mask)),
    )
    # staged once each, by content, in the run's bucket
    keys = {o["Key"] for o in local_s3.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {k for k in keys if "/inputs/" in k} == {
        f"gptimage/inputs/{sha(absolute)}.png",
        f"gptimage/inputs/{sha(relative)}.jpg",
        f"gptimage/inputs/{sha(in_s3)}.webp",
        f"gptimage/inputs/{sha(mask)}.png",
    }
    # lineage in the manifest: each line names its inputs' sources and sha256
    lines = [
        line
        for line in Manifest.from_jsonl(Path(str(summary.gallery)).parent / "manifest.jsonl")
        if isinstance(line, ImageLine)
    ]
    together = next(line for line in lines if line.prompt.startswith("together"))
    assert together.inputs is not None
    assert [(i.role, i.source, i.sha256) for i in together.inputs] == [
        ("image", str(tmp_path / "absolute.png"), sha(absolute)),
        ("image", f"s3://{source_bucket}/shop/shoe.webp", sha(in_s3)),
        ("mask", str(photos / "mask.png"), sha(mask)),
    ]
    relative_line = next(line for line in lines if line.prompt.startswith("at night"))
    assert relative_line.inputs is not None
    assert relative_line.inputs[0].source == str(photos / "relative.jpg")
    # the gallery shows each input beside its output
    gallery = Path(str(summary.gallery)).read_text()
    assert gallery.count("class=pair") == 4 and "absolute.png" in gallery

    # a re-run: new links are signed, nothing is paid
    before = fal_emulator.stats["accepted"]
    again = summary_of(
        batch_to_s3(str(prompts), bucket=s3_bucket, output_dir=out, return_state=True)
    )
    assert again.staged == 4 and again.submitted == 0
    assert fal_emulator.stats["accepted"] == before
    # the CLI's dry run reads the inputs too: every row is known cached, nothing to pay
    from prefect_gptimage.cli.dry_run import plan_dry_run

    plan = plan_dry_run(str(prompts), bucket=s3_bucket)
    assert plan.cached == 4 and plan.estimate == 0


@pytest.mark.parametrize("problem", ["missing file", "missing object", "not an image"])
def test_a_bad_input_is_one_line_naming_it_before_anything_is_paid(
    problem: str,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
) -> None:
    from prefect_gptimage.flows.batch import batch_to_s3

    good = tmp_path / "good.png"
    good.write_bytes(picture(unique, 1))
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    bad = {
        "missing file": str(tmp_path / "gone.png"),
        "missing object": f"s3://{s3_bucket}/nowhere/shoe.png",
        "not an image": str(text),
    }[problem]
    reason = {
        "missing file": "no such file",
        "missing object": "no such S3 object",
        "not an image": "not an image",
    }[problem]
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text(
        json.dumps({"prompt": f"fine {unique}", "image_urls": [str(good)]})
        + "\n"
        + json.dumps({"prompt": f"broken {unique}", "image_urls": [bad]})
        + "\n"
    )
    submits = fal_emulator.stats["submit"]
    with pytest.raises(InvalidRequestError) as info:
        batch_to_s3(str(prompts), bucket=s3_bucket, output_dir=str(tmp_path / "out"))
    message = str(info.value)
    assert "\n" not in message and "line 2: image_urls" in message
    assert bad in message and reason in message, message
    assert fal_emulator.stats["submit"] == submits  # nothing was paid, not even the good row


def test_a_task_takes_a_local_input_inline_without_a_bucket(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    from prefect import flow

    from prefect_gptimage.tasks.generate import generate_images
    from prefect_gptimage.tasks.options import GenerationOptions

    photo = tmp_path / "photo.png"
    photo.write_bytes(picture(unique, 7))

    @flow
    def edit_one() -> str:
        request = GptImageEditRequest(
            prompt=f"inline {unique}", image_urls=[str(photo)], quality="low"
        )
        options = GenerationOptions(output_dir=str(tmp_path / "out"), store_io=False)
        return generate_images(request, options).handle.request_id

    request_id = edit_one()
    info = fal_emulator.request(request_id)
    assert info is not None and info.input_sha256 == (("image_urls", sha(photo.read_bytes())),)
    assert str(info.arguments["image_urls"][0]).startswith("data:image/png;base64,")
    assert dict(info.headers)["x-fal-store-io"] == "0"


# -- batch edits: a folder, an S3 prefix ----------------------------------------------------------


def test_edit_an_s3_prefix_lineage_in_manifest_and_asset_events_and_retention_headers(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    sent_events: Callable[[], list[Event]],
) -> None:
    from prefect_gptimage.flows.edit_batch import edit_folder_to_s3

    source_bucket = f"{s3_bucket}-src"
    local_s3.create_bucket(source_bucket)
    s3 = local_s3.client()
    photos = {f"products/{n}.png": picture(unique, n) for n in range(3)}
    for key, body in photos.items():
        s3.put_object(Bucket=source_bucket, Key=key, Body=body)
    s3.put_object(Bucket=source_bucket, Key="products/readme.txt", Body=b"not listed")
    out = str(tmp_path / "out")
    prompt = f"on a white background {unique}"

    state = edit_folder_to_s3(
        f"s3://{source_bucket}/products/",
        prompt,
        bucket=s3_bucket,
        options={"quality": "low"},
        output_dir=out,
        store_io=False,
        media_expires=86400,
        return_state=True,
    )
    summary = summary_of(state)
    assert state.is_completed(), summary.failures
    assert summary.staged == 3 and summary.submitted == 3
    requests = ours(fal_emulator, unique)
    assert sorted(r.input_sha256[0][1] for r in requests) == sorted(sha(b) for b in photos.values())
    for r in requests:
        headers = dict(r.headers)
        assert headers["x-fal-store-io"] == "0"
        assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {
            "expiration_duration_seconds": 86400
        }
    lines = [
        line
        for line in Manifest.from_jsonl(Path(str(summary.gallery)).parent / "manifest.jsonl")
        if isinstance(line, ImageLine)
    ]
    by_source = {line.inputs[0].source: line for line in lines if line.inputs}
    assert set(by_source) == {f"s3://{source_bucket}/{k}" for k in photos}
    for key, body in photos.items():
        assert by_source[f"s3://{source_bucket}/{key}"].inputs[0].sha256 == sha(body)  # type: ignore[index]
    # each edited image's asset has its source as upstream asset
    events = [e for e in sent_events() if e.event == MATERIALIZED]
    upstream = {
        e.resource.id: [r.id for r in e.related if r.role == "asset"]
        for e in events
        if e.resource.id.startswith(f"s3://{s3_bucket}/") and "/manifests/" not in e.resource.id
    }
    assert {line.s3_uri: [line.inputs[0].source] for line in lines if line.inputs} == upstream

    before = fal_emulator.stats["accepted"]
    again = summary_of(
        edit_folder_to_s3(
            f"s3://{source_bucket}/products/",
            prompt,
            bucket=s3_bucket,
            options={"quality": "low"},
            output_dir=out,
            return_state=True,
        )
    )
    assert again.staged == 3 and again.submitted == 0
    assert fal_emulator.stats["accepted"] == before


@pytest.mark.parametrize("where", ["folder", "s3 prefix"])
def test_cli_edit_over_a_folder_or_prefix_stages_one_edit_per_source_and_rerun_pays_nothing(
    where: str,
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    prefect_harness: dict[str, Any],
) -> None:
    bodies = {"a.png": picture(unique, 1), "shoes/b.jpg": picture(unique, 2, fmt="JPEG")}
    if where == "folder":
        source = str(tmp_path / "catalogue")
        for name, body in bodies.items():
            (tmp_path / "catalogue" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "catalogue" / name).write_bytes(body)
        (tmp_path / "catalogue" / "notes.txt").write_text("skipped")
    else:
        source = f"s3://{s3_bucket}-src/catalogue/"
        local_s3.create_bucket(f"{s3_bucket}-src")
        for name, body in {**bodies, "notes.txt": b"skipped"}.items():
            local_s3.client().put_object(
                Bucket=f"{s3_bucket}-src", Key=f"catalogue/{name}", Body=body
            )
    env = cli_env(prefect_harness, tmp_path)
    args = ["edit", source, "--prompt", f"on white {unique}", "--bucket", s3_bucket]
    args += ["--quality", "low", "--json"]
    done = run_cli_process(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == 2 and summary["submitted"] == 2
    read = sorted(r.input_sha256[0][1] for r in ours(fal_emulator, unique))
    assert read == sorted(sha(b) for b in bodies.values())
    # lineage: each manifest line names its source
    manifest_key = summary["manifest_uri"].removeprefix(f"s3://{s3_bucket}/")
    body = local_s3.client().get_object(Bucket=s3_bucket, Key=manifest_key)["Body"].read()
    lines = [json.loads(line) for line in body.decode().splitlines()]
    named = {line["inputs"][0]["source"]: line["inputs"][0]["sha256"] for line in lines}
    prefix = source.rstrip("/") + "/"
    assert named == {prefix + name: sha(b) for name, b in bodies.items()}

    again = run_cli_process(args, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["submitted"] == 0
    assert len(ours(fal_emulator, unique)) == 2  # nothing paid again


def test_cli_edit_refuses_a_non_image_source_in_one_line(
    fal_emulator: FalEmulator, s3_bucket: str, unique: str, tmp_path: Path, prefect_harness: Any
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "fake.png").write_text("just text")
    env = cli_env(prefect_harness, tmp_path)
    submits = fal_emulator.stats["submit"]
    done = run_cli_process(
        ["edit", str(folder), "--prompt", f"x {unique}", "--bucket", s3_bucket], env
    )
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert str(folder / "fake.png") in line and "not an image" in line
    assert fal_emulator.stats["submit"] == submits


def test_input_image_error_survives_pickling() -> None:
    import pickle

    error = InputImageError("image_urls", "/a.png", "no such file")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) == "image_urls: /a.png: no such file"


def test_too_large_inputs_are_refused_before_anything_is_read_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    from prefect_gptimage.inputs import InputResolver, InputStager

    photo = tmp_path / "big.png"
    photo.write_bytes(picture(unique, 1, size=(256, 256)))
    request = GptImageEditRequest(prompt="on white", image_urls=[str(photo)])
    monkeypatch.setenv("PREFECT_GPTIMAGE_INPUT_MAX_BYTES", "100")
    with pytest.raises(InputImageError, match="more than the 100 bytes") as info:
        InputResolver().resolve(request)
    assert info.value.source == str(photo) and "\n" not in str(info.value)
    monkeypatch.delenv("PREFECT_GPTIMAGE_INPUT_MAX_BYTES")
    inline_only = InputResolver(InputStager(inline_max_bytes=100))
    with pytest.raises(InputImageError, match="give the run a bucket"):
        inline_only.resolve(request)


def test_a_short_media_lifetime_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from prefect_gptimage.engine.options import RunOptions
    from prefect_gptimage.flows._edit_inputs import warn_retention

    log = logging.getLogger("test-edit-inputs")
    with caplog.at_level(logging.WARNING, logger="test-edit-inputs"):
        warn_retention(RunOptions(media_expires=86400, timeout=600), log)
        assert caplog.records == []
        warn_retention(RunOptions(media_expires=300, timeout=600), log)
    [record] = caplog.records
    assert "only 300 s" in record.getMessage() and "pays again" in record.getMessage()


def test_cli_generate_takes_relative_local_inputs_and_names_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str
) -> None:
    from prefect_gptimage.cli.main import build_parser, check_input, request_fields

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shoe.png").write_bytes(picture(unique, 1))
    args = build_parser().parse_args(["generate", "on white", "--edit-image", "shoe.png"])
    assert request_fields(args)["image_urls"] == [str(tmp_path / "shoe.png")]
    assert check_input(args) is None
    args = build_parser().parse_args(["generate", "on white", "--edit-image", "boot.png"])
    assert check_input(args) == f"image_urls: item 0: {tmp_path / 'boot.png'}: no such file"
