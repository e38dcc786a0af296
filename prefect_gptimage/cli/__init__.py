"""The ``prefect-gptimage`` command line: ``generate``, ``batch``, ``demo`` and the emulator."""

from __future__ import annotations

from prefect_gptimage.cli.main import main

__all__ = ["main"]
