"""Manifests (JSONL round trip, totals) and Prefect artifacts created in real flow runs, read
back through the Prefect client. Images are staged to moto's S3 over HTTP, so the gallery links
are real presigned URLs."""

from __future__ import annotations

import hashlib
import html
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterId,
)
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort
from prefect.context import get_run_context

from prefect_gptimage.errors import PermanentFalError
from prefect_gptimage.reporting.artifacts import (
    TABLE_COLUMNS,
    BatchProgress,
    artifact_key,
    format_duration,
    gallery_markdown,
    publish_results,
    results_table,
    write_html_gallery,
)
from prefect_gptimage.reporting.gallery import HtmlGallery, escape_text
from prefect_gptimage.reporting.manifest import (
    FailureLine,
    ImageLine,
    Manifest,
    ManifestWriter,
    OcrVerdictRecord,
    cost_per_image,
    manifest_parameters,
)
from prefect_gptimage.s3 import S3Target, StagedImage, stage_image
from prefect_gptimage.schemas import (
    CONTENT_TYPES,
    DownloadedImage,
    GptImageEditRequest,
    GptImageRequest,
    request_for_endpoint,
)
from prefect_gptimage.testing.s3 import LocalS3Server


@pytest.fixture(scope="module")
def bucket(s3: LocalS3Server) -> str:
    name = f"artifacts-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


HOSTILE = '<script>alert("x")</script> | **bold** [link](javascript:alert(1)) & `code`\nline2'


def make_image(
    folder: Path, *, request_id: str, index: int = 0, fmt: str = "png"
) -> DownloadedImage:
    path = folder / f"{request_id}-{index}.{fmt}"
    Image.new("RGB", (32, 24), (10 * index, 120, 200)).save(
        path, format="JPEG" if fmt == "jpeg" else fmt.upper()
    )
    data = path.read_bytes()
    return DownloadedImage(
        path=str(path),
        source_url=f"https://v3.fal.media/files/{request_id}.{fmt}",
        request_id=request_id,
        endpoint="fal-ai/gpt-image-1.5",
        index=index,
        content_type=CONTENT_TYPES[fmt],
        format=fmt,  # type: ignore[arg-type]
        width=32,
        height=24,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


@pytest.fixture(scope="module")
def batch(
    s3: LocalS3Server, bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Three staged images over two requests (one with a hostile prompt) and one failure."""
    folder = tmp_path_factory.mktemp("images")
    requests = {
        "req-a": GptImageRequest(prompt="a calm lake", quality="low", image_size="1024x1024"),
        "req-b": GptImageRequest(prompt=HOSTILE, quality="high", image_size="1536x1024"),
    }
    downloaded = [
        make_image(folder, request_id="req-a", index=0),
        make_image(folder, request_id="req-a", index=1),
        make_image(folder, request_id="req-b", index=0, fmt="jpeg"),
    ]
    target = S3Target(bucket=bucket, presign_expires=3600)
    staged = [
        stage_image(
            d,
            prompt=requests[d.request_id].prompt,
            request=requests[d.request_id],
            target=target,
        )
        for d in downloaded
    ]
    failure = FailureLine(
        prompt="<b>refused</b> prompt",
        parameters={"quality": "low"},
        endpoint="fal-ai/gpt-image-1.5",
        request_id="req-c",
        reason="content policy <violation>",
        error_type="content_policy_violation",
    )
    return {
        "requests": requests,
        "downloaded": downloaded,
        "staged": staged,
        "failures": [failure],
        "folder": folder,
    }


def read_artifacts(artifact_filter: ArtifactFilter) -> list[Artifact]:
    """Artifacts from the Prefect API through the Prefect client.

    ``client.read_artifacts()`` of 3.8.8 sends ``"task_runs": null``, which the server (with
    fastapi 0.154) rejects with a 422, and an empty task-run filter would hide artifacts made
    outside tasks; so the client's ``request`` posts the filter body itself.
    """
    body = {
        "artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True),
        "limit": 200,
        "offset": 0,
        "sort": ArtifactSort.CREATED_DESC.value,
    }
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json=body)
    response.raise_for_status()
    return Artifact.model_validate_list(response.json())


def flow_artifacts(flow_run_id: Any) -> list[Any]:
    return read_artifacts(ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def test_manifest_round_trip_and_totals(batch: dict[str, Any], tmp_path: Path) -> None:
    manifest = Manifest()
    for staged in batch["staged"]:
        request = batch["requests"][staged.request_id]
        line = manifest.add_image(staged, request.prompt, request)
        assert "prompt" not in line.parameters
    manifest.add_failure(
        "bad prompt",
        GptImageRequest(prompt="bad prompt", quality="low"),
        reason=PermanentFalError("refused", request_id="req-x", error_type="content_policy"),
    )
    manifest.add_failure(
        "never sent", GptImageRequest(prompt="never sent"), reason="invalid request"
    )

    path = manifest.write(tmp_path / "out" / "manifest.jsonl")
    raw = path.read_text().splitlines()
    assert len(raw) == 5
    assert [json.loads(r)["kind"] for r in raw] == ["image"] * 3 + ["failure"] * 2

    back = Manifest.from_jsonl(path)
    assert [line.model_dump() for line in back] == [line.model_dump() for line in manifest]
    totals = back.totals()
    assert totals.images == 3 and totals.failures == 2
    assert totals.estimated_cost_usd == pytest.approx(0.009 * 2 + 0.199)
    assert totals.bytes == sum(s.bytes for s in batch["staged"])

    first = back.lines[0]
    assert isinstance(first, ImageLine)
    assert first.s3_uri == batch["staged"][0].s3_uri
    assert first.estimated_cost_usd == pytest.approx(0.009)
    failure = back.lines[3]
    assert isinstance(failure, FailureLine)
    assert (failure.request_id, failure.error_type) == ("req-x", "PermanentFalError")
    unsent = back.lines[4]
    assert isinstance(unsent, FailureLine)
    assert unsent.request_id is None and unsent.endpoint == "fal-ai/gpt-image-1.5"
    assert "X-Amz-Signature" not in path.read_text()  # presigned output URLs are not stored


def test_manifest_writer_streams_the_same_file_and_totals(
    batch: dict[str, Any], tmp_path: Path
) -> None:
    in_memory, writer = Manifest(), ManifestWriter(tmp_path / "streamed" / "manifest.jsonl")
    for sink in (in_memory, writer):
        for staged in batch["staged"]:
            request = batch["requests"][staged.request_id]
            sink.add_image(staged, request.prompt, request)
        sink.add_failure(
            "never sent", GptImageRequest(prompt="never sent"), reason="invalid request"
        )
    assert not writer.path.exists()  # only a finished manifest is ever at its path

    path = writer.close()

    assert path.read_text() == in_memory.write(tmp_path / "memory.jsonl").read_text()
    assert writer.totals() == in_memory.totals()
    assert [p.name for p in path.parent.iterdir()] == ["manifest.jsonl"]  # no temp file left


def test_manifest_lines_store_the_request_as_fals_arguments(tmp_path: Path) -> None:
    """The typed request is serialized at the edge: a line holds its arguments (minus the
    prompt) and its endpoint, and reads back into the same request."""
    request = GptImageEditRequest(
        prompt="make it night", image_urls=["https://a/b.png"], quality="low"
    )
    manifest = Manifest()
    manifest.add_failure(request.prompt, request, reason="refused")
    (raw,) = manifest.write(tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(raw) == {
        "kind": "failure",
        "prompt": "make it night",
        "parameters": {
            "image_urls": ["https://a/b.png"],
            "image_size": "auto",
            "input_fidelity": "high",
            "background": "auto",
            "quality": "low",
            "num_images": 1,
            "output_format": "png",
            "sync_mode": False,
        },
        "endpoint": "fal-ai/gpt-image-1.5/edit",
        "request_id": None,
        "reason": "refused",
        "error_type": None,
    }
    (line,) = Manifest.from_jsonl(tmp_path / "m.jsonl")
    back = request_for_endpoint(line.endpoint, {"prompt": line.prompt, **line.parameters})
    assert back == request


def test_manifest_parameters_redact_data_uris_and_signatures() -> None:
    data_uri = "data:image/png;base64," + "A" * 100_000
    params = manifest_parameters(
        {
            "prompt": "p",
            "image_urls": [data_uri, "https://b.s3.amazonaws.com/x.png?X-Amz-Signature=abc&x=1"],
            "quality": "low",
        }
    )
    assert "prompt" not in params
    assert len(json.dumps(params)) < 300
    assert params["image_urls"][0].startswith("data:image/png;base64,<")
    assert params["image_urls"][1] == "https://b.s3.amazonaws.com/x.png?<presigned query redacted>"
    edit = GptImageEditRequest(
        prompt="pp",
        quality="medium",
        image_size="auto",
        image_urls=["https://a/u.png"],
    )
    assert cost_per_image(edit) == pytest.approx(0.051)
    assert cost_per_image(GptImageRequest.model_construct(prompt="pp", quality="ultra")) is None


def test_manifest_bad_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '\n{"kind": "failure", "prompt": "p", "parameters": {}, "endpoint": "e", '
        '"reason": "r"}\n{"kind": "other"}\n'
    )
    with pytest.raises(ValueError, match=r"m\.jsonl:3"):
        Manifest.from_jsonl(path)


def test_manifest_is_thread_safe(batch: dict[str, Any]) -> None:
    manifest = Manifest()
    staged = batch["staged"][0]

    def add() -> None:
        for _ in range(200):
            manifest.add_image(staged, "p", GptImageRequest(prompt="pp", quality="low"))

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert manifest.totals().images == 1600


# ---------------------------------------------------------------------------------------------
# Artifact keys and content
# ---------------------------------------------------------------------------------------------

KEY_RULE = re.compile(r"^[a-z0-9-]+$")


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("Nightly Batch", "2026-11-24"), "nightly-batch-2026-11-24"),
        (("../../etc", "passwd"), "etc-passwd"),
        (("日本語",), "gptimage"),  # nothing left after folding: the package's default
        (("Ünïcode_UPPER", 7), "unicode-upper-7"),
        # cut to 100: 91 kept, a dash, 8 hex digits of the full key's SHA-256
        (("x" * 500,), "x" * 91 + "-" + hashlib.sha256(b"x" * 500).hexdigest()[:8]),
        (("",), "gptimage"),
        (("--a--", "--b--"), "a-b"),
    ],
)
def test_artifact_key_follows_prefects_rule(parts: tuple[object, ...], expected: str) -> None:
    key = artifact_key(*parts)
    assert KEY_RULE.match(key), key
    assert len(key) <= 100
    assert not key.startswith("-") and not key.endswith("-")
    assert key == expected  # the same key on every run: a re-run updates the same artifact


def test_artifact_key_truncation_keeps_keys_distinct() -> None:
    assert artifact_key("a" * 300 + "1") != artifact_key("a" * 300 + "2")
    assert artifact_key("Nightly Batch", "gallery") == "nightly-batch-gallery"


#: A "|" that splits a GFM table row: one after an even number of backslashes.
_CELL_BAR = re.compile(r"(?<!\\)(?:\\\\)*\|")


def cell_bars(line: str) -> int:
    """How many cell separators a markdown table row has (an escaped ``\\|`` is text)."""
    return len(_CELL_BAR.findall(line))


def test_markdown_specials_are_escaped_to_show_as_themselves() -> None:
    """Each is drawn as the plain character by both Prefect UIs (benchmarks/ui_escapes.py):
    a backslash escape, ``&lt; &gt; &amp;`` for HTML, never ``¦`` nor a numeric entity."""
    assert escape_text("Cats | dogs") == "Cats \\| dogs"
    assert escape_text("a|b", in_table=False) == escape_text("a|b") == "a\\|b"
    assert escape_text("a \\| b") == "a \\\\\\| b"  # backslash, then pipe: both escaped
    assert escape_text("*x* _y_ `z` [l](u) #1 ~s~ $5 !") == (
        "\\*x\\* \\_y\\_ \\`z\\` \\[l\\]\\(u\\) \\#1 \\~s\\~ \\$5 \\!"
    )
    assert escape_text("<b>R&D</b>") == "&lt;b&gt;R&amp;D&lt;/b&gt;"
    assert escape_text("1. first") == "1\\. first" and escape_text("- dash-ed") == "\\- dash-ed"
    assert escape_text("well-known 2. x") == "well-known 2. x"  # mid-line: no list, no escape
    for text in ("a | b | c", "x \\| y", "\\\\|"):
        assert cell_bars(f"| {escape_text(text)} |") == 2, text


def test_gallery_markdown_escapes_prompts(batch: dict[str, Any]) -> None:
    md = gallery_markdown(batch["staged"], batch["failures"], requests=batch["requests"])
    assert "<script" not in md and "&lt;script&gt;" in md
    assert "<b>" not in md and "&lt;b&gt;refused&lt;/b&gt;" in md
    assert "**bold**" not in md and "[link](javascript" not in md
    assert md.count("<img ") == 3
    assert md.count('width="160"') == 3
    assert md.count("<a href=") == 3
    rows = [line for line in md.splitlines() if line.startswith("| <a href=")]
    assert len(rows) == 3
    assert all(cell_bars(row) == 4 for row in rows)  # a prompt's "|" cannot add a column
    for staged in batch["staged"]:
        assert staged.url.replace("&", "&amp;") in md


def test_gallery_refuses_non_http_urls(batch: dict[str, Any]) -> None:
    evil = batch["staged"][0].model_copy(update={"url": "javascript:alert(1)"})
    md = gallery_markdown([evil])
    assert "javascript:" not in md
    assert 'src="#"' in md


def test_results_table_rows(batch: dict[str, Any]) -> None:
    """Five short columns a 1400 px screen shows whole; the details are in the manifest."""
    rows = results_table(batch["staged"], batch["failures"], requests=batch["requests"])
    assert [r["status"].split(":")[0] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert all(tuple(r) == TABLE_COLUMNS for r in rows) and len(TABLE_COLUMNS) <= 5
    assert rows[0]["size"] == "32x24 low png" and rows[0]["cost_usd"] == pytest.approx(0.009)
    assert rows[2]["size"] == "32x24 high jpeg" and rows[2]["cost_usd"] == pytest.approx(0.199)
    # a link named by the S3 object: the index and the prompt's slug, as found in the bucket
    assert rows[0]["image"] == f"[00-a-calm-lake.png]({batch['staged'][0].url})"
    assert rows[0]["image"].startswith(f"[{batch['staged'][0].key.rsplit('/', 1)[1]}]")
    assert rows[3]["status"] == "failed: content policy &lt;violation&gt;"
    assert all(len(html.unescape(r["prompt"].replace("\\", ""))) <= 60 for r in rows)
    assert results_table(batch["staged"], requests=batch["requests"], max_rows=2) == rows[:2]


#: An entity the Prefect UI would show literally: it decodes only &amp; &lt; &gt; &quot;.
def test_ocr_verdicts_in_manifest_table_and_galleries(
    batch: dict[str, Any], tmp_path: Path
) -> None:
    """A gated run's verdict rides on its manifest lines and is shown, escaped, in one short
    line of the table's status and of both galleries; a line without one has no ``ocr`` key."""
    first, second = batch["staged"][:2]
    request = batch["requests"][first.request_id]
    misread = "GRAND <OPEN|NG> & *co*"
    verdict = OcrVerdictRecord(
        passed=True,
        read_text=misread,
        expected="GRAND OPENING",
        score=0.9695,
        min_score=0.9,
        attempt=2,
        max_attempts=3,
        variant=7,
    )
    manifest = Manifest()
    manifest.add_image(first, request.prompt, request, ocr=verdict)
    manifest.add_image(second, request.prompt, request)
    manifest.add_failure("p", request, reason="0 of 1 passed", ocr=verdict)
    path = manifest.write(tmp_path / "m.jsonl")
    gated, plain, failed = (json.loads(raw) for raw in path.read_text().splitlines())
    assert gated["ocr"]["read_text"] == misread and gated["ocr"]["attempt"] == 2
    assert "ocr" not in plain  # a batch's manifest is what it was
    assert failed["ocr"]["variant"] == 7
    assert [line.ocr for line in Manifest.from_jsonl(path)] == [verdict, None, verdict]

    assert verdict.label() == "OCR 0.96: GRAND <OPEN|NG> & *co* (attempt 2/3)"  # rounded down
    verdicts = {(first.request_id, first.index): verdict}
    rows = results_table([first, second], requests=batch["requests"], verdicts=verdicts)
    assert [len(row) for row in rows] == [5, 5]  # folded into status: no new column
    assert rows[0]["status"] == (
        "ok · OCR 0.96: GRAND &lt;OPEN\\|NG&gt; &amp; \\*co\\* \\(attempt 2/3\\)"
    )
    assert rows[1]["status"] == "ok"

    note = "OCR gate: 1 of 1 rows passed; regenerations: 1, costing $0.009"
    markdown = gallery_markdown(
        [first, second], requests=batch["requests"], verdicts=verdicts, note=note
    )
    assert note.replace("$", "\\$") in markdown and markdown.count("OCR 0.96: ") == 1
    assert "GRAND &lt;OPEN\\|NG&gt; &amp; \\*co\\*" in markdown  # the pipe cannot split the row
    assert not LITERAL_ENTITY.search(markdown)

    page = HtmlGallery(tmp_path / "index.html", "gated")
    page.add_image(first, request.prompt, request, ocr=verdict)
    html_text = page.close().read_text()
    assert html.escape(verdict.label()) in html_text and misread not in html_text


LITERAL_ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-f]+|(?!(?:amp|lt|gt|quot);)[a-z][a-z0-9]*);", re.I)
SPECIAL_PROMPTS = [
    "Cats | dogs & <birds> #1 -- 50% *off* `code` [x](y) \\ back",
    "R&D &middot; &#35; <script>alert('x')</script> | \"quoted\" #hash & amp;",
]


def test_artifacts_have_no_literal_entities_and_pipes_keep_the_table(
    batch: dict[str, Any],
) -> None:
    staged = batch["staged"][:2]
    prompts = {staged[0].request_id: SPECIAL_PROMPTS[0], "req-b": SPECIAL_PROMPTS[1]}
    staged = [staged[0], batch["staged"][2]]
    failure = FailureLine(
        prompt=SPECIAL_PROMPTS[1], parameters={}, endpoint="e", reason="bad | <input> #2 & more"
    )
    md = gallery_markdown(staged, [failure], prompts=prompts, requests=batch["requests"])
    rows = results_table(staged, [failure], prompts=prompts, requests=batch["requests"])
    cells = " ".join(str(v) for r in rows for v in r.values())

    for text in (md, cells):
        # the prompts' own "&middot;" and "&#35;" arrive escaped (&amp;...), so they show as typed
        assert not LITERAL_ENTITY.search(text), LITERAL_ENTITY.findall(text)
        assert "<script" not in text and "<birds>" not in text
        assert "&lt;script&gt;" in text and "&amp;middot;" in text
        assert "\\#1" in text and "\\*off\\*" in text and "\\[x\\]\\(y\\)" in text
    assert "·" in md  # the separator is the plain character, not &middot;
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 3  # header and two images
    assert all(cell_bars(line) == 4 for line in table)  # a prompt's "|" adds no column
    assert "Cats \\| dogs" in md and "¦" not in md  # drawn as "|" (docs/img/ui-escapes-*.png)
    assert rows[0]["prompt"].startswith("Cats \\| dogs")  # a table artifact cell: escaped pipe
    assert "valid until" in md and "UTC" in md  # when the thumbnails stop working


# ---------------------------------------------------------------------------------------------
# Artifacts in a real flow run
# ---------------------------------------------------------------------------------------------


def test_publish_results_creates_artifacts(prefect_api: None, batch: dict[str, Any]) -> None:
    prefix = f"Batch {uuid.uuid4().hex[:6]}"

    @flow
    def publish_flow() -> tuple[Any, Any]:
        published = publish_results(
            batch["staged"],
            batch["failures"],
            key_prefix=prefix,
            requests=batch["requests"],
            max_links=2,
        )
        return published, get_run_context().flow_run.id  # type: ignore[union-attr]

    published, flow_run_id = publish_flow()
    assert published.table_key == artifact_key(prefix, "results")
    assert published.gallery_key == artifact_key(prefix, "gallery")
    assert len(published.link_ids) == 2 and published.links_omitted == 1

    artifacts = flow_artifacts(flow_run_id)
    by_key = {a.key: a for a in artifacts if a.key}
    assert all(a.key for a in artifacts)  # no unnamed cards: each link has its own key
    link_keys = {artifact_key(prefix, "image", s.request_id, s.index) for s in batch["staged"][:2]}
    assert set(by_key) == {published.table_key, published.gallery_key} | link_keys

    table = by_key[published.table_key]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert len(rows) == 4
    links_in_table = {re.sub(r"^\[.*?\]\((.*)\)$", r"\1", r["image"]) for r in rows[:3]}
    assert links_in_table == {s.url for s in batch["staged"]}
    assert "manifest" in (table.description or "")  # where the details went

    gallery = by_key[published.gallery_key]
    assert gallery.type == "markdown"
    assert gallery.data.count("<img ") == 3
    assert "&lt;script&gt;" in gallery.data and "<script" not in gallery.data

    links = [a for a in artifacts if a.id in set(published.link_ids)]
    assert len(links) == 2
    for link in links:
        assert link.type == "markdown"
        url = re.search(r"\]\((http[^)]+)\)$", link.data)
        assert url is not None
        assert httpx.get(url.group(1), timeout=10).status_code == 200  # the link works


def test_publish_results_by_default_makes_two_keyed_artifacts(
    prefect_api: None, batch: dict[str, Any]
) -> None:
    """Per-image links are folded into the table and the gallery, not one card per image."""
    prefix = f"Folded {uuid.uuid4().hex[:6]}"

    @flow
    def publish_flow() -> tuple[Any, Any]:
        published = publish_results(
            batch["staged"], batch["failures"], key_prefix=prefix, requests=batch["requests"]
        )
        return published, get_run_context().flow_run.id  # type: ignore[union-attr]

    published, flow_run_id = publish_flow()
    assert published.link_ids == [] and published.links_omitted == 0
    artifacts = flow_artifacts(flow_run_id)
    assert sorted(a.key for a in artifacts) == sorted([published.table_key, published.gallery_key])
    gallery = next(a for a in artifacts if a.key == published.gallery_key)
    assert gallery.data.count("<a href=") == 3  # each thumbnail links to its image
    assert not LITERAL_ENTITY.search(gallery.data)


def test_batch_progress_throttles_and_reaches_100(prefect_api: None) -> None:
    total = 1000

    @flow
    def progress_flow() -> tuple[Any, int, str]:
        progress = BatchProgress().start(total, f"progress-{uuid.uuid4().hex[:6]}")

        def work() -> None:
            for _ in range(total // 8):
                progress.advance()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = progress.status()
        progress.finish()
        return progress.artifact_id, progress.updates, status

    artifact_id, updates, status = progress_flow()
    assert 1 <= updates <= 52  # ~every 2 %, not once per item
    assert status.startswith("1000/1000 (100.0%)")
    (artifact,) = read_artifacts(ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    assert artifact.type == "progress"
    assert float(str(artifact.data)) == pytest.approx(100.0)


def test_batch_progress_eta_and_time_based_updates(prefect_api: None) -> None:
    now = [1000.0]

    @flow
    def timed_flow() -> None:
        progress = BatchProgress(clock=lambda: now[0])
        assert progress.eta() == "done"  # nothing to do yet
        progress.start(200, "eta-progress-test")
        assert progress.artifact_id is not None
        assert progress.eta() == "ETA unknown"
        now[0] += 10
        progress.advance(50)  # 25 % in 10 s -> 30 s left
        assert progress.eta_seconds() == pytest.approx(30.0)
        assert progress.eta() == "ETA 30s"
        progress.settle()  # the update runs in its own thread
        sent = progress.updates
        progress.advance(1)  # +0.5 %, 0 s later: not due
        progress.settle()
        assert progress.updates == sent
        now[0] += 2.5
        progress.advance(1)  # +0.5 %, 2.5 s later: due by time
        progress.settle()
        assert progress.updates == sent + 1
        progress.finish()
        assert progress.percent == pytest.approx(100.0) and progress.eta() == "done"

    timed_flow()
    assert format_duration(3725) == "1h02m05s"


def test_outside_a_run_progress_is_local_and_publish_refuses(batch: dict[str, Any]) -> None:
    progress = BatchProgress().start(10, "no-run")
    progress.advance(5)
    assert progress.artifact_id is None and progress.percent == pytest.approx(50.0)
    assert progress.status().startswith("5/10 (50.0%)")
    with pytest.raises(RuntimeError, match="inside a Prefect flow"):
        publish_results(batch["staged"], key_prefix="x")


# ---------------------------------------------------------------------------------------------
# Local HTML gallery
# ---------------------------------------------------------------------------------------------


def test_html_gallery_local_and_presigned(batch: dict[str, Any], tmp_path: Path) -> None:
    downloaded: list[DownloadedImage] = batch["downloaded"]
    page = write_html_gallery(
        downloaded,
        batch["folder"] / "index.html",
        "Local <gallery>",
        requests=batch["requests"],
        failures=batch["failures"],
    )
    html = page.read_text()
    assert "<title>Local &lt;gallery&gt;</title>" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 3
    for src, image in zip(srcs, downloaded, strict=True):
        assert not src.startswith(("/", "http"))  # relative to the page
        assert (page.parent / src).resolve() == Path(image.path).resolve()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "content policy &lt;violation&gt;" in html

    staged: list[StagedImage] = batch["staged"]
    remote = write_html_gallery(staged, tmp_path / "sub" / "remote.html", "Remote")
    remote_srcs = re.findall(r'<img src="([^"]+)"', remote.read_text())
    assert [s.replace("&amp;", "&") for s in remote_srcs] == [s.url for s in staged]
