"""Serve the batch and the scheduled-content deployments from this process (no work pool).

::

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # or Prefect Cloud; FAL_KEY, AWS_* too
    export GPTIMAGE_BUCKET=my-images
    python deployments/serve.py

Then, from anywhere::

    prefect deployment run gptimage-batch-to-s3/batch-to-s3-served \\
        --param prompt_file=/abs/path/prompts.jsonl

Flow runs execute as subprocesses of this one, with its environment. Every setting below is an
environment variable (all optional):

==============================  ==========================================================
``GPTIMAGE_BUCKET``             S3 bucket for both deployments (unset: local files only)
``GPTIMAGE_PROMPT_FILE``        batch prompt file (default: the bundled sample prompts)
``GPTIMAGE_PREFIX``             batch key prefix (default ``gptimage/batch``)
``GPTIMAGE_CONCURRENCY``        batch rows in flight (default 8)
``GPTIMAGE_TEMPLATE``           daily prompt; ``{date}``, ``{weekday}``, ``{month}``
``GPTIMAGE_SCHEDULED_PREFIX``   daily key prefix (default ``gptimage/daily``)
``GPTIMAGE_QUALITY``            daily quality: low, medium, high (default low)
``GPTIMAGE_CRON``               daily schedule (default ``0 6 * * *``)
``GPTIMAGE_TIMEZONE``           timezone of the schedule (default UTC)
``GPTIMAGE_SERVE_LIMIT``        flow runs at once in this process (default: Prefect's)
``GPTIMAGE_BATCH_DEPLOYMENT``   name of the batch deployment (default ``batch-to-s3-served``)
==============================  ==========================================================

The fal request cap is Prefect's global concurrency limit named by
``PREFECT_GPTIMAGE_CONCURRENCY_LIMIT_NAME`` (default ``fal-gpt-image``) if it exists:
``prefect gcl create fal-gpt-image --limit 16``.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from prefect_gptimage.flows import batch_to_s3, scheduled_content

#: Two processes serving one name on one server run each other's flow runs: give each its own
BATCH_DEPLOYMENT = os.environ.get("GPTIMAGE_BATCH_DEPLOYMENT") or "batch-to-s3-served"
SCHEDULED_DEPLOYMENT = "daily-content-served"
DEFAULT_TEMPLATE = "A poster for {weekday}, {date}: autumn in the city, flat illustration"


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def sample_prompt_file() -> str:
    """The prompt file bundled with the package, as an absolute path."""
    return str(resources.files("prefect_gptimage") / "data" / "sample_prompts.jsonl")


def batch_parameters() -> dict[str, Any]:
    """Default parameters of the batch deployment, from the environment."""
    return {
        "prompt_file": _env("GPTIMAGE_PROMPT_FILE", sample_prompt_file()),
        "bucket": os.environ.get("GPTIMAGE_BUCKET") or None,
        "prefix": _env("GPTIMAGE_PREFIX", "gptimage/batch"),
        "concurrency": int(_env("GPTIMAGE_CONCURRENCY", "8")),
    }


def scheduled_parameters() -> dict[str, Any]:
    """Default parameters of the scheduled-content deployment, from the environment."""
    return {
        "template": _env("GPTIMAGE_TEMPLATE", DEFAULT_TEMPLATE),
        "bucket": os.environ.get("GPTIMAGE_BUCKET") or None,
        "prefix": _env("GPTIMAGE_SCHEDULED_PREFIX", "gptimage/daily"),
        "quality": _env("GPTIMAGE_QUALITY", "low"),
    }


def _runner_deployment(value: object) -> RunnerDeployment:
    # ``to_deployment`` is sync-compatible: called from sync code it returns the deployment
    if not isinstance(value, RunnerDeployment):
        raise TypeError(f"expected a RunnerDeployment, got {type(value).__name__}")
    return value


def build_deployments() -> list[RunnerDeployment]:
    """The two deployments. Entrypoints are module paths, so this runs from any directory."""
    batch = batch_to_s3.to_deployment(
        name=BATCH_DEPLOYMENT,
        parameters=batch_parameters(),
        description="Generate every row of a prompt file; stage images and a manifest to S3.",
        tags=["gptimage", "batch"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    daily = scheduled_content.to_deployment(
        name=SCHEDULED_DEPLOYMENT,
        parameters=scheduled_parameters(),
        schedules=[
            Cron(_env("GPTIMAGE_CRON", "0 6 * * *"), timezone=_env("GPTIMAGE_TIMEZONE", "UTC"))
        ],
        description="A templated prompt filled with the run date; idempotent per date.",
        tags=["gptimage", "scheduled"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return [_runner_deployment(batch), _runner_deployment(daily)]


def main() -> None:
    limit = os.environ.get("GPTIMAGE_SERVE_LIMIT")
    serve(*build_deployments(), limit=int(limit) if limit else None)


if __name__ == "__main__":
    main()
