"""The layers in the file list hold: the fal client layer imports nothing from Prefect."""

from __future__ import annotations

import subprocess
import sys


def test_fal_layer_imports_no_prefect_module() -> None:
    code = (
        "import sys\n"
        "import prefect_gptimage.fal.client, prefect_gptimage.fal.async_client\n"
        "import prefect_gptimage.fal.media, prefect_gptimage.retry\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"prefect_gptimage.fal imported: {out.stdout.strip()}"
