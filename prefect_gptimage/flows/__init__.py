"""Ready-made flows composing the tasks: one prompt, a prompt file, an edit chain, a schedule.

The example scripts in the repository's ``flows/`` folder run these and are the deployments'
entrypoints; the CLI runs them too.
"""

from __future__ import annotations

from prefect_gptimage.flows.batch import batch_to_s3
from prefect_gptimage.flows.generate import generate_to_s3

__all__ = ["batch_to_s3", "generate_to_s3"]
