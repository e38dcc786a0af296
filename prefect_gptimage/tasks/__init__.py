"""Prefect tasks over the fal client layer: the paid steps cached, each image verified.

* :mod:`~prefect_gptimage.tasks.queue`: submit, wait, fetch result, cancel;
* :mod:`~prefect_gptimage.tasks.download`: download and verify one image;
* :mod:`~prefect_gptimage.tasks.generate`: the whole path for one request;
* :mod:`~prefect_gptimage.tasks.options`: how one request is generated (one frozen object);
* :mod:`~prefect_gptimage.tasks.rows`: one request generated and staged, the unit pipelines fan out;
* :mod:`~prefect_gptimage.tasks.cache`: cache keys and cache reads;
* :mod:`~prefect_gptimage.tasks.concurrency`: the cap on fal requests in flight;
* :mod:`~prefect_gptimage.tasks.window`: a bounded, ordered fan-out over a task runner;
"""

from __future__ import annotations

from prefect_gptimage.tasks.download import download_image
from prefect_gptimage.tasks.generate import generate_images
from prefect_gptimage.tasks.queue import (
    cancel_request,
    fetch_result,
    submit_request,
    wait_for_request,
)

__all__ = [
    "cancel_request",
    "download_image",
    "fetch_result",
    "generate_images",
    "submit_request",
    "wait_for_request",
]
