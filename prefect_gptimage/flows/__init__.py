"""Ready-made flows composing the tasks: one prompt, a prompt file, an edit chain, a folder of
edits, a schedule.

The example scripts in the repository's ``flows/`` folder run these and are the deployments'
entrypoints; the CLI runs them too.

Each flow is imported on first use (PEP 562, :func:`prefect_gptimage._lazy.lazy_exports`):
defining a flow costs Prefect a parameter-schema build, so ``prefect-gptimage batch`` (which
imports ``prefect_gptimage.flows.batch``) does not pay for the four flows it does not run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect_gptimage._lazy import lazy_exports

__all__ = [
    "batch_to_s3",
    "edit_folder_to_s3",
    "generate_then_edit",
    "generate_to_s3",
    "ocr_gated_batch",
    "scheduled_content",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "batch_to_s3": "batch",
        "edit_folder_to_s3": "edit_batch",
        "generate_then_edit": "edit",
        "generate_to_s3": "generate",
        "ocr_gated_batch": "ocr_gate",
        "scheduled_content": "scheduled",
    },
)

if TYPE_CHECKING:
    from prefect_gptimage.flows.batch import batch_to_s3
    from prefect_gptimage.flows.edit import generate_then_edit
    from prefect_gptimage.flows.edit_batch import edit_folder_to_s3
    from prefect_gptimage.flows.generate import generate_to_s3
    from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
    from prefect_gptimage.flows.scheduled import scheduled_content
