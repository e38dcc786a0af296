"""`prefect-gptimage generate` as a user runs it: a subprocess configured only by environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli_process
from PIL import Image

from prefect_gptimage.testing import FalEmulator, Fault

SECRET = "cli-key-id:very-secret-cli-key-value"


def run_cli(
    args: list[str], harness: dict[str, Any], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FAL_KEY": SECRET,
        "PREFECT_API_URL": str(harness["api_url"]),
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
        "PREFECT_GPTIMAGE_OUTPUT_DIR": str(tmp_path / "images"),
    }
    return run_cli_process(args, env)


def test_generate_survives_faults_with_one_submit(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    before = fal_emulator.stats["accepted"]
    for op in ("status", "result"):
        fal_emulator.inject(Fault(op, "500_json", count=2))  # type: ignore[arg-type]
        fal_emulator.inject(Fault(op, "503_json", count=2))  # type: ignore[arg-type]
        fal_emulator.inject(Fault(op, "429", count=2))  # type: ignore[arg-type]
    proc = run_cli(
        [
            "generate",
            f"a windmill {unique}",
            "--num-images",
            "3",
            "--quality",
            "low",
            "--image-size",
            "1536x1024",
            "--output-format",
            "jpeg",
            "--json",
        ],
        prefect_harness,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["images"]) == 3 and summary["failures"] == []
    for img in summary["images"]:
        with Image.open(img["path"]) as im:
            assert (im.format, im.size) == ("JPEG", (1536, 1024))
    assert fal_emulator.stats["accepted"] == before + 1
    assert SECRET not in proc.stdout + proc.stderr
    assert SECRET.split(":")[1] not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["generate", "ok prompt", "--num-images", "9"], "num_images"),
        (["generate", "ok prompt", "--num-images", "two"], "--num-images"),
        (["generate", "ok prompt", "--quality", "ultra"], "quality"),
        (["generate", "ok prompt", "--image-size", "auto"], "image_size"),
        (["generate", ""], "prompt"),
    ],
)
def test_invalid_input_exits_2_and_submits_nothing(
    fal_emulator: FalEmulator,
    prefect_harness: dict[str, Any],
    tmp_path: Path,
    args: list[str],
    field: str,
) -> None:
    before = fal_emulator.stats["submit"]
    proc = run_cli(args, prefect_harness, tmp_path)
    assert proc.returncode == 2
    assert field in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert fal_emulator.stats["submit"] == before


def test_failed_image_gives_nonzero_exit(
    fal_emulator: FalEmulator, prefect_harness: dict[str, Any], unique: str, tmp_path: Path
) -> None:
    fal_emulator.inject(Fault("submit", "fail", status_code=422, match=unique))
    proc = run_cli(
        ["generate", f"forbidden {unique}", "--quality", "low", "--json"], prefect_harness, tmp_path
    )
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failures"][0]["error_type"] == "content_policy_violation"


def test_emulator_command_takes_its_options(tmp_path: Path) -> None:
    """`prefect-gptimage emulator --port P --latency L` starts and prints what to export."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect_gptimage.cli",
            "emulator",
            "--port",
            str(port),
            "--latency",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert any(f"FAL_QUEUE_RUN_HOST=localhost:{port}" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(timeout=60)
