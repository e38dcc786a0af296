"""The example scripts in ``flows/`` run as a person runs them, and say where their output went."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from prefect_gptimage.testing import FalEmulator
from prefect_gptimage.testing.s3 import LocalS3Server

ROOT = Path(__file__).resolve().parent.parent


def test_edit_pipeline_prints_where_its_images_went(
    fal_emulator: FalEmulator,
    local_s3: LocalS3Server,
    s3_bucket: str,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder is relative to it
    script = ROOT / "flows" / "edit_pipeline.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), f"a quiet harbour {unique}", f"at night {unique}", s3_bucket]
    )
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    for label in ("generated", "edited"):
        uri, _, local = lines[label].partition(" (local copy: ")
        assert uri.startswith(f"s3://{s3_bucket}/"), out
        assert Path(local.rstrip(")")).is_file(), out
    manifest = lines["manifest"]
    assert manifest.startswith(f"s3://{s3_bucket}/") and manifest.endswith(".jsonl"), out
    assert Path(lines["gallery"]).is_file(), out
