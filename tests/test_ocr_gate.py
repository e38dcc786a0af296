"""The OCR quality gate (issue 10, item 3): the comparison, the emulator's drawn text, the flow.

Needs the ``ocr`` extra (rapidocr-onnxruntime, in ``dev``): skipped without it.
"""

from __future__ import annotations

import doctest
import html
import importlib
import json
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip(
    "rapidocr_onnxruntime", reason='the ocr extra is missing: pip install -e ".[dev]"'
)

from prefect.events.schemas.events import Event
from test_manifest_artifacts import LITERAL_ENTITY, read_artifacts

from prefect_gptimage.errors import ConfigurationError
from prefect_gptimage.quality import (
    judge,
    normalize_text,
    quoted_text,
    read_text,
    text_score,
)
from prefect_gptimage.reporting.artifacts import artifact_key
from prefect_gptimage.reporting.events import BATCH_COMPLETED, IMAGE_STAGED
from prefect_gptimage.reporting.manifest import FailureLine, ImageLine, Manifest
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.images import misspell

MATERIALIZED = "prefect.asset.materialization.succeeded"

SIGNS = [
    "GRAND OPENING",
    "Fresh Bread Daily",
    "Mind the Gap",
    "NO PARKING",
    "Free Coffee",
    "Open Late",
    "Harbor Lights",
    "Exit Only",
    "Sale Today",
    "Night Market",
    "Book Club",
    "Welcome Home",
    "Fish and Chips",
    "Garden Party",
    "Quiet Please",
    "Summer Jazz",
    "Lost and Found",
    "Bike Repair",
    "Main Street",
    "Ticket Office",
]


@pytest.fixture
def misspelling(fal_emulator: FalEmulator) -> Iterator[FalEmulator]:
    """The session's emulator drawing 30% of its quoted texts with a wrong letter."""
    fal_emulator.set_misspell_rate(0.3)
    try:
        yield fal_emulator
    finally:
        fal_emulator.set_misspell_rate(0.0)


# -- the comparison ------------------------------------------------------------------------------


def test_comparison_normalizes_case_spacing_and_punctuation() -> None:
    assert quoted_text('a sign that says "Grand Opening!" and “Free Coffee”') == (
        "Grand Opening! Free Coffee"
    )
    assert quoted_text("no quotes here") == ""
    assert normalize_text(" Grand\nOPENING, 2026! ") == "grandopening2026"
    # OCR merges words and changes case: still a pass
    assert judge("GRAND OPENING", read="GrandOpening").passed
    assert judge("Sale: 50% off!", read="SALE 50 OFF").score == pytest.approx(1.0)
    # other text in the picture does not count against it
    assert judge("Mind the Gap", read="LONDON UNDERGROUND Mind the Gap platform 2").passed
    # one wrong or swapped letter in a sign-length text fails
    for wrong in ("GRAND OPENIMG", "GRAND OPNEING", "GRAND OPENNG"):
        verdict = judge("GRAND OPENING", read=wrong)
        assert not verdict.passed and 0.85 < verdict.score < 0.97, (wrong, verdict.score)
    assert not judge("GRAND OPENING", read="").passed
    # nothing quoted: nothing to check
    assert judge("", read="anything").passed
    # the tolerance is a parameter
    assert judge("GRAND OPENING", read="GRAND OPENIMG", min_score=0.9).passed
    assert judge("Mind the Gap", read="MIND THE GAP", min_score=1.0).passed
    assert not judge("Mind the Gap", read="Mind the Cap", min_score=0.95).passed
    with pytest.raises(ValueError, match="min_score"):
        judge("a", read="a", min_score=1.5)
    # a 1-letter error in n characters scores about 1 - 1/n
    assert text_score("abcdefghij" * 4, "abcdefghij" * 3 + "abcdefghiX") == pytest.approx(0.975)


def test_misspell_changes_one_letter_deterministically() -> None:
    changed = 0
    for k in range(200):
        text = SIGNS[k % len(SIGNS)]
        out = misspell(text, 0.3, f"seed\x00{text}\x00{k}")
        assert out == misspell(text, 0.3, f"seed\x00{text}\x00{k}")
        assert len(out) == len(text)
        if out != text:
            changed += 1
            diffs = [i for i, (a, b) in enumerate(zip(text, out, strict=True)) if a != b]
            assert len(diffs) in (1, 2) and normalize_text(out) != normalize_text(text)
    assert 40 <= changed <= 80  # ~30%
    assert misspell("1234 !", 1.0, "k") == "1234 !"  # no letter: nothing to misspell


@pytest.mark.parametrize(
    "module",
    [
        "prefect_gptimage.quality",
        "prefect_gptimage.quality.text",
        "prefect_gptimage.quality.gate",
        "prefect_gptimage.testing.images",
        "prefect_gptimage.flows.ocr_gate",
        "prefect_gptimage.flows._ocr_rows",
    ],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_missing_extra_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_gptimage.quality import ocr

    monkeypatch.setattr(ocr, "_engine", None)
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ConfigurationError) as info:
        read_text(b"not read")
    message = str(info.value)
    assert 'pip install "prefect-gptimage[ocr]"' in message and "\n" not in message


# -- the emulator draws the quoted text ----------------------------------------------------------


def _generate(emu: FalEmulator, prompt: str, **args: Any) -> bytes:
    import fal_client

    out = fal_client.SyncClient(key="emulator-key").subscribe(
        "fal-ai/gpt-image-1.5",
        arguments={"prompt": prompt, "quality": "low", "image_size": "1024x1024", **args},
    )
    url = out["images"][0]["url"]
    tls = ssl.create_default_context(cafile=emu.ca_bundle)
    return httpx.get(url, verify=tls, timeout=30).raise_for_status().content


def test_emulator_draws_the_quoted_text(fal_emulator: FalEmulator, unique: str) -> None:
    prompt = f'a bakery window, {unique}, with a sign that says "Fresh Bread Daily"'
    plain = _generate(fal_emulator, prompt)
    reading = read_text(plain)
    assert normalize_text(reading.text) == "freshbreaddaily", reading
    assert reading.confidence is not None and reading.confidence > 0.8
    # curly quotes, a wide size, JPEG and a transparent background draw it as well
    curly = f"a banner, {unique}, reading “Night Market”"
    for args in (
        {"image_size": "1536x1024", "output_format": "jpeg"},
        {"background": "transparent"},
    ):
        assert judge("Night Market", read=read_text(_generate(fal_emulator, curly, **args)).text)
    # the same request is the same image (media served again reads the same)
    assert _generate(fal_emulator, prompt) == plain

    fal_emulator.set_misspell_rate(1.0)
    try:
        wrong = read_text(_generate(fal_emulator, prompt, num_images=1, output_format="webp"))
    finally:
        fal_emulator.set_misspell_rate(0.0)
    verdict = judge("Fresh Bread Daily", read=wrong.text)
    assert not verdict.passed and verdict.score > 0.85, verdict


def test_prompt_without_quotes_draws_no_text(fal_emulator: FalEmulator, unique: str) -> None:
    data = _generate(fal_emulator, f"a quiet harbour at dusk {unique}")
    text = read_text(data).text  # OCR may see a stray mark in the pattern, never a word
    assert not any(c.isalnum() for c in text), text


# -- the flow ------------------------------------------------------------------------------------


def test_gate_flow_stages_only_passing_images(
    misspelling: FalEmulator, unique: str, tmp_path: Path, s3: Any, s3_bucket: str
) -> None:
    from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
    from prefect_gptimage.pricing import price_per_image
    from prefect_gptimage.s3 import get_s3_client

    prompts = tmp_path / "signs.jsonl"
    rows = [
        {"prompt": f'a street sign {unique}-{i} that says "{text}"', "quality": "low"}
        for i, text in enumerate(SIGNS)
    ]
    prompts.write_text("".join(json.dumps(r | {"image_size": "1024x1024"}) + "\n" for r in rows))
    before = misspelling.stats

    start = time.perf_counter()
    summary = ocr_gated_batch(
        str(prompts), bucket=s3_bucket, max_attempts=3, output_dir=str(tmp_path / "out")
    )
    elapsed = time.perf_counter() - start

    after = misspelling.stats
    submitted = after.accepted - before.accepted
    assert summary.rows == 20 and summary.passed == 20 and summary.failed == 0
    assert summary.staged == 20
    # 30% misspelled: some rows needed a second (or third) request, each a new variant
    assert summary.regenerations > 0
    assert submitted == 20 + summary.regenerations
    assert after.duplicate_submits - before.duplicate_submits == summary.regenerations
    price = price_per_image("low", "1024x1024")
    assert summary.cost == pytest.approx(submitted * price)
    assert summary.regeneration_cost == pytest.approx(summary.regenerations * price)
    assert summary.cost_this_run == pytest.approx(summary.cost)

    misread = 0
    for row, text in zip(summary.results, SIGNS, strict=True):
        assert row.passed and row.expected == text and len(row.staged) == 1
        assert [a.variant for a in row.attempts] == list(range(len(row.attempts)))
        last = row.attempts[-1].verdicts[0]
        assert last.passed and normalize_text(last.read_text) == normalize_text(text)
        assert row.staged[0].sha256 == row.images[0].sha256 == last.sha256
        for attempt in row.attempts[:-1]:  # each rejected image read as drawn: misspelled
            verdict = attempt.verdicts[0]
            assert not verdict.passed and verdict.read_text and verdict.score < 0.97
            misread += 1
    assert misread == summary.regenerations

    # it reports like a batch: a manifest with one line per staged image, each with its verdict
    out = tmp_path / "out" / summary.run_key
    lines = Manifest.from_jsonl(out / "manifest.jsonl").lines
    assert len(lines) == 20
    for line, row, text in zip(lines, summary.results, SIGNS, strict=True):
        assert isinstance(line, ImageLine) and line.s3_uri == row.staged[0].s3_uri
        ocr = line.ocr
        assert ocr is not None and ocr.passed and ocr.expected == text
        assert normalize_text(ocr.read_text) == normalize_text(text)
        assert ocr.min_score == pytest.approx(0.97) and ocr.score >= ocr.min_score
        assert (ocr.attempt, ocr.max_attempts) == (len(row.attempts), 3)
        assert ocr.variant == row.attempts[-1].variant
    assert {line.ocr.attempt for line in lines if line.ocr} != {1}  # regenerated images listed
    # ... staged to S3 beside the images (and nothing else: rejected images stay on disk)
    s3_client = get_s3_client()
    assert summary.manifest_uri is not None
    bucket, manifest_key = summary.manifest_uri.removeprefix("s3://").split("/", 1)
    assert bucket == s3_bucket
    staged_manifest = s3_client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
    assert staged_manifest == (out / "manifest.jsonl").read_bytes()
    listed = s3_client.list_objects_v2(Bucket=s3_bucket)
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    assert keys == sorted([manifest_key, *(row.staged[0].key for row in summary.results)])
    assert len(list(out.glob("*.png"))) == 20 + summary.regenerations  # rejected ones too
    # ... an HTML gallery showing each verdict
    assert summary.gallery == str(out / "index.html")
    page = Path(summary.gallery).read_text()
    assert page.count("<figure>") == 20
    assert all(line.ocr and html.escape(line.ocr.label()) in page for line in lines)
    # ... and the results table artifact: each verdict in its status, the regenerations and cost
    table = _latest_artifact(artifact_key(summary.run_key, "results"))
    cells = json.loads(table.data)
    assert len(cells) == 20 and all(len(cell) == 5 for cell in cells)  # still 5 columns
    for cell, line in zip(cells, lines, strict=True):
        assert line.ocr is not None
        assert cell["status"].startswith("ok · OCR 1.00: ")
        assert line.ocr.read_text in cell["status"]
        assert f"attempt {line.ocr.attempt}/3" in cell["status"]
    regenerated = (
        f"regenerations: {summary.regenerations}, costing ${summary.regeneration_cost:.3f} "
        f"of ${summary.cost:.3f}"
    )
    assert regenerated in (table.description or "").replace("\\$", "$")  # "\$" draws as "$"
    gallery = _latest_artifact(artifact_key(summary.run_key, "gallery")).data
    assert regenerated in gallery.replace("\\$", "$") and gallery.count("OCR 1.00: ") == 20
    assert not LITERAL_ENTITY.search(gallery)

    per_image = summary.ocr_seconds / (20 + summary.regenerations)
    print(
        f"\nOCR gate: 20 rows, {summary.regenerations} regenerations "
        f"(${summary.regeneration_cost}), {elapsed:.1f} s in all, OCR {per_image:.2f} s per image"
    )

    # a re-run pays for nothing and reaches the same verdicts
    again = ocr_gated_batch(
        str(prompts), bucket=s3_bucket, max_attempts=3, output_dir=str(tmp_path / "out")
    )
    assert misspelling.stats.accepted == after.accepted
    assert again.passed == 20 and again.regenerations == summary.regenerations
    assert again.cost_this_run == 0 and again.cost == pytest.approx(summary.cost)


@pytest.fixture
def sent_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[Event]]]:
    """The events this test's runs send to the Prefect API (they still reach it), read after
    the worker has delivered them all."""
    from prefect.events.clients import AssertingPassthroughEventsClient
    from prefect.events.worker import EventsWorker

    AssertingPassthroughEventsClient.reset()
    worker = EventsWorker.instance(AssertingPassthroughEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)

    def delivered() -> list[Event]:
        worker.drain()
        return [e for c in AssertingPassthroughEventsClient.all for e in c.events]

    yield delivered
    AssertingPassthroughEventsClient.reset()


def test_gate_flow_stages_nothing_that_never_passes(
    fal_emulator: FalEmulator,
    unique: str,
    tmp_path: Path,
    s3: Any,
    s3_bucket: str,
    sent_events: Callable[[], list[Event]],
) -> None:
    from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
    from prefect_gptimage.s3 import get_s3_client

    prompts = tmp_path / "typos.csv"
    prompts.write_text(
        "prompt,quality,image_size\n"
        f'"a door sign {unique} that says ""Staff Only""",low,1024x1024\n'
        f"a quiet harbour {unique} at dusk,low,1024x1024\n"
    )
    fal_emulator.set_misspell_rate(1.0)
    try:
        summary = ocr_gated_batch(
            str(prompts), bucket=s3_bucket, max_attempts=2, output_dir=str(tmp_path / "out")
        )
    finally:
        fal_emulator.set_misspell_rate(0.0)
    sign, plain = summary.results
    assert not sign.passed and sign.staged == [] and len(sign.attempts) == 2
    assert sign.error is not None and "0 of 1 image(s) passed OCR in 2 attempt(s)" in sign.error
    assert all(not a.verdicts[0].passed for a in sign.attempts)
    # a prompt that quotes nothing has nothing to check: it passes unread, at the first attempt
    assert plain.passed and plain.expected == "" and len(plain.attempts) == 1
    assert plain.attempts[0].verdicts[0].read_text == ""
    assert (summary.passed, summary.failed, summary.staged, summary.regenerations) == (1, 1, 1, 1)
    assert summary.manifest_uri is not None
    manifest_key = summary.manifest_uri.removeprefix(f"s3://{s3_bucket}/")
    listed = get_s3_client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert sorted(o["Key"] for o in listed) == sorted([plain.staged[0].key, manifest_key])
    # the manifest, in file order: the failed row naming what was expected and read, the image
    failure, image = Manifest.from_jsonl(tmp_path / "out" / summary.run_key / "manifest.jsonl")
    assert isinstance(image, ImageLine) and image.s3_uri == plain.staged[0].s3_uri
    assert image.ocr is not None and image.ocr.expected == "" and image.ocr.attempt == 1
    assert isinstance(failure, FailureLine) and failure.error_type == "ocr_mismatch"
    last = sign.attempts[-1].verdicts[0]
    assert f"expected 'Staff Only', read {last.read_text!r}" in failure.reason
    assert failure.request_id == sign.attempts[-1].request_id
    assert failure.ocr is not None and not failure.ocr.passed
    assert (failure.ocr.attempt, failure.ocr.max_attempts) == (2, 2)
    # the results table lists the failed row with what was expected and what was read
    cells = json.loads(_latest_artifact(artifact_key(summary.run_key, "results")).data)
    assert [cell["status"][:6] for cell in cells] == ["ok · O", "failed"]
    assert f"expected 'Staff Only', read '{last.read_text}'" in cells[1]["status"]
    # Prefect hears of the staged image only, and of the run, as it does of a batch
    events = sent_events()
    staged = [e for e in events if e.event == IMAGE_STAGED]
    assert [e.resource.id for e in staged] == [plain.staged[0].s3_uri]
    (completed,) = [e for e in events if e.event == BATCH_COMPLETED]
    assert completed.resource.id == summary.manifest_uri
    assert completed.payload["failed"] == 1 and completed.payload["ok"] is False
    assert completed.payload["cost_usd"] == pytest.approx(summary.cost_this_run)
    materialized = {e.resource.id for e in events if e.event == MATERIALIZED}
    assert materialized == {plain.staged[0].s3_uri, summary.manifest_uri}


def _latest_artifact(key: str) -> Any:
    """The newest version of the artifact ``key``, read back through the Prefect client."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    found = read_artifacts(ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key!r}"
    return found[0]  # newest first


def test_gate_budget_refuses_the_run_or_stops_the_regenerations(
    fal_emulator: FalEmulator, unique: str, tmp_path: Path
) -> None:
    """max_cost covers the first attempts before anything is paid, then each regeneration."""
    from prefect_gptimage.errors import BatchIncomplete
    from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
    from prefect_gptimage.pricing import price_per_image

    price = price_per_image("low", "1024x1024")
    prompts = tmp_path / "sign.csv"
    prompts.write_text(
        "prompt,quality,image_size\n"
        f'"a door sign {unique} that says ""Staff Only""",low,1024x1024\n'
    )
    accepted = fal_emulator.stats["accepted"]
    with pytest.raises(BatchIncomplete, match="exceeds max_cost"):
        ocr_gated_batch(str(prompts), max_cost=price / 2, output_dir=str(tmp_path / "out"))
    assert fal_emulator.stats["accepted"] == accepted  # refused: nothing submitted

    fal_emulator.set_misspell_rate(1.0)
    try:
        summary = ocr_gated_batch(
            str(prompts), max_attempts=3, max_cost=price * 1.5, output_dir=str(tmp_path / "out")
        )
    finally:
        fal_emulator.set_misspell_rate(0.0)
    (row,) = summary.results
    assert not row.passed and len(row.attempts) == 1  # the first regeneration would exceed it
    assert row.error_type == "over_budget" and "max_cost" in (row.error or "")
    assert fal_emulator.stats["accepted"] == accepted + 1
    assert summary.failed == 1 and summary.failures[0].error_type == "over_budget"
