"""Link lifetimes said where links are shown (issue 18, item 6).

A batch runs in-process against the emulator, the moto S3 server and the session's Prefect API.
By default the results table, the gallery and each link state when their presigned links
expire. With ``PREFECT_GPTIMAGE_PUBLIC_BASE_URL`` (here the moto server's path-style URL of a
bucket made public-read by a bucket policy) every link is ``<base>/<key>``, works without a
signature, is written to the manifest, and is said not to expire.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_manifest_artifacts import flow_artifacts

from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.reporting.artifacts import artifact_key
from prefect_gptimage.s3 import keys
from prefect_gptimage.settings import GptImageSettings
from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

BASE_URL = "PREFECT_GPTIMAGE_PUBLIC_BASE_URL"


@pytest.fixture
def public_base(local_s3: LocalS3Server, s3_bucket: str) -> Iterator[str]:
    """The bucket's public base URL, set for this test only; the bucket made public-read by a
    bucket policy, as a public bucket is (its objects stay private otherwise: 403)."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{s3_bucket}/*",
            }
        ],
    }
    local_s3.client().put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(policy))
    base = f"{local_s3.endpoint_url.rstrip('/')}/{s3_bucket}"
    os.environ[BASE_URL] = base + "/"  # a trailing slash is dropped
    try:
        yield base
    finally:
        os.environ.pop(BASE_URL, None)


def _run(unique: str, bucket: str, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """A two-row batch; (its summary, its artifacts by key)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"link row {i} {unique}"}) + "\n" for i in range(2))
    )
    state = batch_to_s3(
        prompt_file=str(path), bucket=bucket, output_dir=str(tmp_path / "out"), return_state=True
    )
    assert state.is_completed(), state.message
    (manifest,) = (tmp_path / "out").glob("*/manifest.jsonl")
    run_key = manifest.parent.name
    artifacts = {a.key: a for a in flow_artifacts(state.state_details.flow_run_id) if a.key}
    return state.result(), {
        "table": artifacts[artifact_key(run_key, "results")],
        "gallery": artifacts[artifact_key(run_key, "gallery")],
        "manifest": manifest,
    }


def _table_links(table: Any) -> list[str]:
    rows = json.loads(table.data)
    return [re.sub(r"^\[.*?\]\((.*)\)$", r"\1", r["image"]) for r in rows]


def test_presigned_links_state_their_expiry_in_the_table_and_the_gallery(
    fal_emulator: FalEmulator, local_s3: LocalS3Server, s3_bucket: str, unique: str, tmp_path: Path
) -> None:
    summary, shown = _run(unique, s3_bucket, tmp_path)

    assert summary.staged == 2
    expiry = re.compile(r"presigned links valid until \d{4}-\d\d-\d\d \d\d:\d\d UTC")
    assert expiry.search(shown["table"].description or ""), shown["table"].description
    assert expiry.search(shown["gallery"].description or ""), shown["gallery"].description
    assert "valid until" in shown["gallery"].data
    assert all("X-Amz-Signature=" in link for link in _table_links(shown["table"]))
    lines = [json.loads(x) for x in shown["manifest"].read_text().splitlines()]
    assert all("url" not in line for line in lines)  # expiring links are not kept


def test_a_public_base_url_gives_links_that_do_not_expire(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    public_base: str,
    unique: str,
    tmp_path: Path,
) -> None:
    summary, shown = _run(unique, s3_bucket, tmp_path)

    assert summary.staged == 2
    for where in ("table", "gallery"):
        description = shown[where].description or ""
        assert "do not expire" in description and "valid until" not in description, description
    assert "do not expire" in shown["gallery"].data
    links = _table_links(shown["table"])
    assert len(links) == 2
    lines = [json.loads(x) for x in shown["manifest"].read_text().splitlines()]
    for link, line in zip(sorted(links), sorted(lines, key=lambda x: x["url"]), strict=True):
        assert link.startswith(public_base + "/") and "X-Amz" not in link
        key = line["s3_uri"].removeprefix(f"s3://{s3_bucket}/")
        assert link == line["url"] == f"{public_base}/{key}"
        assert httpx.get(link, timeout=10).status_code == 200  # served, no signature
        assert f'src="{link}"' in shown["gallery"].data


def test_the_base_url_setting_is_checked() -> None:
    assert GptImageSettings(public_base_url="https://cdn.example.com/imgs/").public_base_url == (
        "https://cdn.example.com/imgs"
    )
    assert GptImageSettings(public_base_url="").public_base_url is None
    for bad in ("cdn.example.com", "ftp://x", "https://x/?sig=1"):
        with pytest.raises(ValueError, match="http"):
            GptImageSettings(public_base_url=bad)


def test_no_html_gallery_key_is_documented_that_is_never_written() -> None:
    assert not hasattr(keys, "gallery_key")
    assert ".html" not in (keys.__doc__ or "").split("No HTML gallery")[0]
