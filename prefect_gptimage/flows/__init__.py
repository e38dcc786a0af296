"""Ready-made flows composing the tasks: one prompt, a prompt file, an edit chain, a schedule.

The example scripts in the repository's ``flows/`` folder run these and are the deployments'
entrypoints; the CLI runs them too.
"""

from __future__ import annotations

from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.flows.edit import generate_then_edit
from prefect_gptimage.flows.generate import generate_to_s3
from prefect_gptimage.flows.ocr_gate import ocr_gated_batch
from prefect_gptimage.flows.scheduled import scheduled_content

__all__ = [
    "batch_to_s3",
    "generate_then_edit",
    "generate_to_s3",
    "ocr_gated_batch",
    "scheduled_content",
]
